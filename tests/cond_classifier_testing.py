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


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}-threads")
def intra_op_threads(request):
    """Runs a test at 1, 2 and 3 intra-op threads: the CPU GEMMs cut their output into per-thread tiles (three
    threads and two samples give uneven cuts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(threads)


# K, C and H*W past the CPU GEMMs' 256-wide cache blocks and not multiples of them: every block edge, every copied
# (transposed) operand block and the per-thread output tiles are crossed.
PAST_CACHE_BLOCKS = (2, 300, 520, 23, 29)
