"""RoIPool against the definition (normkit.ops.roi_pool_reference), hand-computed values and torch.library checks."""
import pytest
import torch

from conftest import DEVICES
from normkit.ops import roi_pool, roi_pool_reference
from roi_helpers import edge_case_rois, random_rois, rois_to_list

IMAGE_H, IMAGE_W = 96, 128


def sample_rois(batch=2, dtype=torch.float32, device="cpu"):
    return torch.cat([random_rois(8, batch, IMAGE_H, IMAGE_W), edge_case_rois(batch, IMAGE_H, IMAGE_W)]).to(
        dtype=dtype, device=device)


def feature_map(scale, batch=2, channels=3, dtype=torch.float32, device="cpu"):
    # Distinct values so that the argmax, and thus the gradient, is unambiguous.
    h, w = max(int(IMAGE_H * scale), 1) + 1, max(int(IMAGE_W * scale), 1) + 1
    return torch.randperm(batch * channels * h * w).reshape(batch, channels, h, w).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 1 / 4, 1 / 8, 1 / 16, 1 / 32])
@pytest.mark.parametrize("output_size", [(2, 3), (7, 7)])
def test_matches_reference(device, scale, output_size):
    x = feature_map(scale, device=device)
    rois = sample_rois(device=device)
    out = roi_pool(x, rois, output_size, scale)
    torch.testing.assert_close(out, roi_pool_reference(x, rois, output_size, scale), atol=0, rtol=0)


def test_hand_computed():
    x = torch.arange(30.0).reshape(1, 1, 5, 6)
    # Box (0.6, 0.4)-(3.4, 2.6) rounds to cells x 1..3, y 0..3: a 4x3 (h x w) region. 2x2 bins: bin heights
    # 2 -> rows [0, 2) and [2, 4); bin width 1.5 -> columns [1 + 0, 1 + 2) and [1 + 1, 1 + 3).
    out = roi_pool(x, torch.tensor([[0, 0.6, 0.4, 3.4, 2.6]]), 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[x[0, 0, 1, 2], x[0, 0, 1, 3]],
                                                        [x[0, 0, 3, 2], x[0, 0, 3, 3]]]))
    # Rounding is half away from zero: 0.5 -> 1, -0.5 -> -1 (then clipped to the map).
    out = roi_pool(x, torch.tensor([[0, 0.5, 0.5, 0.5, 0.5], [0, -0.5, -0.5, -0.5, -0.5]]), 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([7.0, 0.0]))


def test_empty_bins_and_nan_boxes_give_zero():
    x = torch.randn(1, 2, 6, 6)
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor([[0, 10.0, 10, 12, 12], [0, nan, 0, 3, 3], [0, 0, 0, inf, 3], [0, -9, -9, -7, -7]])
    out = roi_pool(x, rois, 2)
    assert torch.equal(out, torch.zeros_like(out))
    _, argmax = torch.ops.normkit.roi_pool(x, rois, 1.0, 2, 2)
    assert torch.equal(argmax, torch.full_like(argmax, -1))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    assert roi_pool(x, torch.zeros(0, 5, device=device), (2, 3)).shape == (0, 3, 2, 3)
    rois = torch.tensor([[1, 0.0, 0.0, 4.0, 4.0]], device=device)
    out = roi_pool(torch.randn(2, 3, 0, 8, device=device), rois, 2)
    assert out.shape == (1, 3, 2, 2) and torch.equal(out, torch.zeros_like(out))
    x.requires_grad_(True)
    roi_pool(x, torch.zeros(0, 5, device=device), 2).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_non_contiguous_and_list_boxes(device):
    x = feature_map(1 / 4, channels=4, device=device)
    rois = sample_rois(device=device)
    expected = roi_pool_reference(x, rois, 3, 1 / 4)
    torch.testing.assert_close(roi_pool(x.to(memory_format=torch.channels_last), rois, 3, 1 / 4), expected)
    torch.testing.assert_close(roi_pool(torch.cat([x, x], 1)[:, ::2], rois, 3, 1 / 4),
                               roi_pool_reference(torch.cat([x, x], 1)[:, ::2].contiguous(), rois, 3, 1 / 4))
    per_image, order = rois_to_list(rois, 2)
    torch.testing.assert_close(roi_pool(x, per_image, 3, 1 / 4), expected[order])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(device, dtype):
    x = torch.randn(2, 3, 25, 33, device=device).to(dtype)
    rois = sample_rois(device=device).to(dtype)
    out = roi_pool(x, rois, 3, 1 / 4)
    assert out.dtype == dtype
    torch.testing.assert_close(out, roi_pool_reference(x, rois, 3, 1 / 4), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    x = feature_map(1 / 4, device=device).requires_grad_(True)
    rois = torch.cat([sample_rois(device=device)] * 2)  # overlapping boxes add into the same cells
    grad = torch.randn(rois.shape[0], 3, 3, 3, device=device)
    roi_pool(x, rois, 3, 1 / 4).backward(grad)
    y = x.detach().clone().requires_grad_(True)
    roi_pool_reference(y, rois, 3, 1 / 4).backward(grad)
    torch.testing.assert_close(x.grad, y.grad)


def test_backward_on_several_threads_matches_reference():
    # The CPU backward splits the channels over the intra-op threads, each adding into its own channels only.
    x = feature_map(1 / 4, channels=5).requires_grad_(True)
    rois = torch.cat([sample_rois()] * 2)
    grad = torch.randn(rois.shape[0], 5, 3, 3)
    expected = x.detach().clone().requires_grad_(True)
    roi_pool_reference(expected, rois, 3, 1 / 4).backward(grad)
    threads = torch.get_num_threads()
    try:
        for count in (2, 3):
            torch.set_num_threads(count)
            x.grad = None
            roi_pool(x, rois, 3, 1 / 4).backward(grad)
            torch.testing.assert_close(x.grad, expected.grad)
    finally:
        torch.set_num_threads(threads)


def test_ties_send_the_gradient_to_the_first_maximum():
    # Equal values in a bin (a ReLU's zeros, quantized maps): the maximum taken is the first in row-major order,
    # as in torchvision, and the gradient goes to that cell. The top-left cell holds the map's largest value, so
    # every bin that covers it sends its gradient to cell 0.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (2, 3, 25, 33), generator=g).float()
    x[:, :, 0, 0] = 5.0
    x.requires_grad_(True)
    rois = torch.cat([sample_rois(), torch.tensor([[0, 0.0, 0.0, 40.0, 30.0], [1, -8.0, -8.0, 12.0, 12.0]])])
    grad = torch.rand(rois.shape[0], 3, 3, 3, generator=g) + 1
    out = roi_pool(x, rois, 3, 1 / 4)
    out.backward(grad)
    expected = x.detach().clone().requires_grad_(True)
    ref = roi_pool_reference(expected, rois, 3, 1 / 4)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, expected.grad)
    assert (x.grad[:, :, 0, 0] > 0).all()


def test_gradcheck():
    x = torch.randperm(2 * 2 * 6 * 7).reshape(2, 2, 6, 7).double().requires_grad_(True)
    rois = random_rois(5, 2, 12, 14, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (2, 3), 0.5), (x,))


def test_autocast_computes_in_float32_and_returns_input_dtype():
    x = torch.randn(2, 3, 12, 16)
    rois = random_rois(5, 2, 48, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_pool(x.bfloat16(), rois, 2, 0.25)
    assert out.dtype == torch.bfloat16  # torchvision casts the float32 result back to the features' dtype
    torch.testing.assert_close(out, roi_pool_reference(x.bfloat16().float(), rois, 2, 0.25).bfloat16())


def test_opcheck_and_compile():
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = random_rois(5, 2, 20, 24, dtype=torch.float64)
    torch.library.opcheck(torch.ops.normkit.roi_pool.default, (x, rois, 0.5, 2, 3))
    compiled = torch.compile(lambda t, r: roi_pool(t, r, 2, 0.5).sum(), fullgraph=True)
    compiled(x, rois).backward()
    expected = x.detach().clone().requires_grad_(True)
    roi_pool_reference(expected, rois, 2, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, expected.grad)


@pytest.mark.parametrize("boxes, message", [
    (torch.zeros(3, 4), r"Tensor\[K, 5\].*got Tensor\[3, 4\]"),
    ([torch.zeros(2, 3)], r"boxes\[0\] must be Tensor\[L, 4\]"),
    (torch.tensor([[5.0, 0, 0, 1, 1]]), r"batch indices in \[0, 2\)"),
    (torch.tensor([[float("nan"), 0, 0, 1, 1]]), r"batch indices"),
    (torch.zeros(1, 5, dtype=torch.float16), r"same dtype as input"),
])
def test_bad_input(boxes, message):
    with pytest.raises(ValueError, match=message):
        roi_pool(torch.randn(2, 3, 8, 8), boxes, 2)
    with pytest.raises(ValueError, match="output_size must be positive"):
        roi_pool(torch.randn(2, 3, 8, 8), torch.zeros(1, 5), (2, -1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_equals_cpu(dtype):
    x = feature_map(1 / 8, channels=16, dtype=dtype)
    rois = sample_rois(dtype=dtype)
    grad = torch.randn(rois.shape[0], 16, 7, 7, dtype=dtype)
    results = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_(True)
        out = roi_pool(xd, rois.to(device), 7, 1 / 8)
        out.backward(grad.to(device))
        results.append((out.cpu(), xd.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    torch.testing.assert_close(results[1][1].double(), results[0][1].double(), atol=1e-2, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ops_called_directly_refuse_or_zero_what_the_cpu_refuses():
    x = feature_map(1.0, channels=2, device="cuda")
    # A fractional batch index: the CPU op raises; the CUDA op, which cannot raise, gives that RoI zeros.
    rois = torch.tensor([[0.5, 0.0, 0.0, 20.0, 20.0], [1.0, 0.0, 0.0, 20.0, 20.0]], device="cuda")
    out, argmax = torch.ops.normkit.roi_pool(x, rois, 1.0, 2, 2)
    assert torch.equal(out[0].cpu(), torch.zeros(2, 2, 2)) and (argmax[0] == -1).all()
    assert (out[1] != 0).any()
    out = torch.ops.normkit.roi_align(x, rois, 1.0, 2, 2, 2, True)
    assert torch.equal(out[0].cpu(), torch.zeros(2, 2, 2)) and (out[1] != 0).any()
    # argmax on another device than grad would hand the kernel a host pointer
    with pytest.raises(RuntimeError, match="argmax must be on the device of grad"):
        torch.ops.normkit._roi_pool_backward(torch.ones(2, 2, 2, 2, device="cuda"), rois, argmax.cpu(), 1.0, 2, 2,
                                             *x.shape)
