import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not CUDA_AVAILABLE, reason="needs a CUDA device")])]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
