"""Helpers shared by the conditional-classifier tests."""
import pytest
import torch


@pytest.fixture
def single_thread():
    """Runs a test that makes hundreds of tiny op calls (gradcheck, opcheck) on one intra-op thread.

    On a loaded shared machine every OpenMP parallel region of a tiny op can wait milliseconds for a
    descheduled worker; one thread keeps those tests fast. The threaded path is covered by the others.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
