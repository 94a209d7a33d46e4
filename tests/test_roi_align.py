"""RoIAlign against the definition (normkit.ops.roi_align_reference), hand-computed values and torch.library checks."""
import pytest
import torch

from conftest import DEVICES
from normkit.ops import roi_align, roi_align_reference
from roi_helpers import edge_case_rois, random_rois, rois_to_list

IMAGE_H, IMAGE_W = 96, 128
SCALES = [1.0, 1 / 4, 1 / 8, 1 / 16, 1 / 32]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def feature_map(scale, batch=2, channels=3, dtype=torch.float32, device="cpu"):
    # A map covering the image at this stride, plus one cell as backbones with padding produce.
    h, w = int(IMAGE_H * scale), int(IMAGE_W * scale)
    return torch.randn(batch, channels, max(h, 1) + 1, max(w, 1) + 1, dtype=dtype, device=device)


def sample_rois(batch=2, dtype=torch.float32, device="cpu"):
    return torch.cat([random_rois(8, batch, IMAGE_H, IMAGE_W), edge_case_rois(batch, IMAGE_H, IMAGE_W)]).to(
        dtype=dtype, device=device)


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, equal_nan=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("scale", SCALES)
def test_matches_reference(device, aligned, sampling_ratio, scale):
    x = feature_map(scale, device=device)
    rois = sample_rois(device=device)
    out = roi_align(x, rois, (3, 4), scale, sampling_ratio, aligned)
    expected = roi_align_reference(x, rois, (3, 4), scale, sampling_ratio, aligned)
    assert out.shape == (rois.shape[0], 3, 3, 4)
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float32)


def test_linear_map_gives_bin_centre_values():
    # Bilinear interpolation reproduces a linear function exactly, and the samples of a bin are symmetric
    # about its centre, so each output is f(bin centre). Hand-computed: aligned box (1.5, 2.5)-(5.5, 6.5) starts
    # at (x, y) = (1, 2) and spans 4x4 cells; 2x2 bins have centres y in {3, 5}, x in {2, 4}.
    ys, xs = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    x = (2 * ys + 3 * xs)[None, None]
    out = roi_align(x, torch.tensor([[0, 1.5, 2.5, 5.5, 6.5]]), 2, 1.0, 2, aligned=True)
    expected = torch.tensor([[2 * 3 + 3 * 2, 2 * 3 + 3 * 4], [2 * 5 + 3 * 2, 2 * 5 + 3 * 4]])
    torch.testing.assert_close(out[0, 0], expected.float())
    # Not aligned: the same box starts half a cell later, at (1.5, 2.5).
    out = roi_align(x, torch.tensor([[0, 1.5, 2.5, 5.5, 6.5]]), 2, 1.0, 2, aligned=False)
    torch.testing.assert_close(out[0, 0], expected.float() + 2 * 0.5 + 3 * 0.5)


def test_sample_outside_map_counts_as_zero_and_border_clamps():
    x = torch.full((1, 1, 4, 4), 8.0)
    # One sample per bin: at y = 3.5 (between the last row and the border) it clamps to row 3 -> 8;
    # at y = 4.5 (> H) it is outside -> 0. A 1x2 output over x in [0, 4) samples x = 1 and 3.
    rois = torch.tensor([[0, 0.0, 3.0, 4.0, 4.0], [0, 0.0, 4.0, 4.0, 5.0]])
    out = roi_align(x, rois, (1, 2), 1.0, 1, aligned=False)
    torch.testing.assert_close(out.flatten(), torch.tensor([8.0, 8.0, 0.0, 0.0]))


def test_samples_exactly_on_the_outer_limits_are_inside():
    # A sample at y = H (or x = W) or at -1 still counts (it sits on the border cell, as in torchvision); just
    # beyond, it is outside. One sample per bin, at the box centre.
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0, 3.0, 3.0, 5.0, 5.0],        # (4, 4): clamps to cell (3, 3) = 16
                         [0, -2.0, -2.0, 0.0, 0.0],      # (-1, -1): clamps to cell (0, 0) = 1
                         [0, 3.0, -2.0, 5.0, 0.0],       # x = 4, y = -1: cell (0, 3) = 4
                         [0, 3.002, 3.0, 5.002, 5.0],    # x = 4.002 > W: outside
                         [0, -2.002, 1.0, -0.002, 3.0]])  # x = -1.002 < -1: outside
    expected = torch.tensor([16.0, 1.0, 4.0, 0.0, 0.0])
    for fn in (roi_align, roi_align_reference):
        torch.testing.assert_close(fn(x, rois, 1, 1.0, 1, False).flatten(), expected)


def test_nan_and_inf_boxes_give_zero():
    x = torch.randn(1, 2, 8, 8)
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor([[0, nan, 1, 4, 4], [0, 1, nan, 4, 4], [0, 1, 1, inf, 4], [0, -inf, 1, 4, inf],
                         [0, nan, nan, nan, nan]])
    for sampling_ratio in (-1, 2):
        for aligned in (False, True):
            out = roi_align(x, rois, 3, 1.0, sampling_ratio, aligned)
            assert torch.equal(out, torch.zeros_like(out))


def large_grid_rois():
    """Boxes whose sample grids exceed 8 per axis (searched for their samples on the map): reaching far past an
    11 x 9 map, inverted (aligned=True samples run backwards), and three whose unit-spaced samples (grid 20 over a
    width of 20 in one bin) land exactly on -1 and on the map's width and height, the last inverted: with
    aligned=True it samples 14, 13, ..., -5."""
    return torch.tensor([[0, -40.3, -30.1, 20.2, 15.7],
                         [1, -5.0, 2.0, 300.0, 8.0],
                         [0, 12.0, 40.0, -20.0, -3.0],
                         [1, -1000.5, -900.25, 2000.0, 1500.0],
                         [0, -5.5, -5.5, 14.5, 14.5],
                         [1, -14.5, -14.5, 5.5, 5.5],
                         [0, 15.0, 15.0, -5.0, -5.0]], dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
def test_large_sample_grids_keep_every_sample_on_the_map(device, aligned):
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, device=device)
    rois = large_grid_rois().to(device)
    for output_size, sampling_ratio in (((3, 2), 0), ((3, 2), 13), (1, 20)):
        b = x.clone().requires_grad_(True)
        expected = roi_align_reference(b, rois, output_size, 1.0, sampling_ratio, aligned)
        grad = torch.randn_like(expected)
        expected.backward(grad)
        for deterministic in (False, True):  # CUDA: atomic and listed backward
            a = x.clone().requires_grad_(True)
            out = roi_align(a, rois, output_size, 1.0, sampling_ratio, aligned, deterministic=deterministic)
            assert_close(out, expected, torch.float64)
            out.backward(grad)
            assert_close(a.grad, b.grad, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    no_rois = torch.zeros(0, 5, device=device)
    assert roi_align(x, no_rois, (2, 3)).shape == (0, 3, 2, 3)
    assert roi_align(x, [torch.zeros(0, 4, device=device)] * 2, 2).shape == (0, 3, 2, 2)
    rois = torch.tensor([[1, 0.0, 0.0, 4.0, 4.0]], device=device)
    for empty_map in (torch.randn(2, 3, 0, 8, device=device), torch.randn(2, 3, 8, 0, device=device)):
        out = roi_align(empty_map, rois, 2)
        assert out.shape == (1, 3, 2, 2) and torch.equal(out, torch.zeros_like(out))
    assert roi_align(torch.randn(2, 0, 8, 8, device=device), rois, 2).shape == (1, 0, 2, 2)
    # Backward through empties gives correctly shaped zero gradients.
    x.requires_grad_(True)
    roi_align(x, no_rois, 2).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
def test_channels_last_and_non_contiguous(device, aligned):
    x = feature_map(1 / 8, channels=5, device=device)
    rois = sample_rois(device=device)
    expected = roi_align_reference(x, rois, 3, 1 / 8, -1, aligned)
    out = roi_align(x.to(memory_format=torch.channels_last), rois, 3, 1 / 8, -1, aligned)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected, torch.float32)
    wide = torch.randn(2, 10, x.shape[2], x.shape[3] * 2, device=device)
    strided = wide[:, ::2, :, ::2]  # non-contiguous in C and W
    assert_close(roi_align(strided, rois, 3, 1 / 8, -1, aligned),
                 roi_align_reference(strided.contiguous(), rois, 3, 1 / 8, -1, aligned), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(device, dtype):
    x = feature_map(1 / 4, device=device)
    rois = sample_rois(device=device)
    out = roi_align(x.to(dtype), rois.to(dtype), 3, 1 / 4, 2, True)
    assert out.dtype == dtype
    # Low-precision outputs are compared with the float32 result of the same low-precision values.
    expected = roi_align_reference(x.to(dtype).double(), rois.to(dtype).double(), 3, 1 / 4, 2, True)
    assert_close(out.double(), expected, dtype)


def test_list_of_boxes_equals_tensor_form():
    x = torch.randn(3, 2, 12, 16)
    rois = random_rois(9, 3, 48, 64)
    per_image, order = rois_to_list(rois, 3)
    torch.testing.assert_close(roi_align(x, per_image, 2, 0.25, 2), roi_align(x, rois[order], 2, 0.25, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_reference(device, channels_last):
    x = feature_map(1 / 4, channels=4, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = sample_rois(device=device)
    grad = torch.randn(rois.shape[0], 4, 3, 3, device=device)
    if channels_last:  # as autograd usually delivers it: laid out like the (channels_last) output
        grad = grad.contiguous(memory_format=torch.channels_last)
    for aligned, sampling_ratio in ((False, -1), (True, 2)):
        a = x.detach().clone().requires_grad_(True)
        roi_align(a, rois, 3, 1 / 4, sampling_ratio, aligned).backward(grad)
        b = x.detach().clone().requires_grad_(True)
        roi_align_reference(b, rois, 3, 1 / 4, sampling_ratio, aligned).backward(grad)
        assert_close(a.grad, b.grad, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_on_several_threads_matches_reference(channels_last):
    # The CPU backward splits the channels over the intra-op threads, each adding into its own channels only: with
    # 2 and 3 threads over 5 channels every thread gets a range that does not start at channel 0.
    x = feature_map(1 / 4, channels=5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = torch.cat([sample_rois()] * 2)  # overlapping boxes add into the same cells
    grad = torch.randn(rois.shape[0], 5, 3, 3)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    expected = x.detach().clone().requires_grad_(True)
    roi_align_reference(expected, rois, 3, 1 / 4, 2, True).backward(grad)
    threads = torch.get_num_threads()
    try:
        for count in (2, 3):
            torch.set_num_threads(count)
            a = x.detach().clone().requires_grad_(True)
            roi_align(a, rois, 3, 1 / 4, 2, True).backward(grad)
            assert_close(a.grad, expected.grad, torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(seed, aligned):
    torch.manual_seed(seed)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.cat([random_rois(4, 2, 12, 14, dtype=torch.float64),
                      torch.tensor([[1, -3.0, -2.0, 5.0, 20.0]], dtype=torch.float64)])
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 0.5, 0, aligned), (x,))
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 0.5, 2, aligned), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_equals_default(device):
    x = feature_map(1 / 8, channels=6, device=device).requires_grad_(True)
    rois = torch.cat([sample_rois(device=device)] * 4)  # repeated boxes add into the same cells
    grad = torch.randn(rois.shape[0], 6, 7, 7, device=device)
    grads = []
    for deterministic in (False, True, True):
        x.grad = None
        roi_align(x, rois, 7, 1 / 8, -1, True, deterministic=deterministic).backward(grad)
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(grads[1], grads[2])  # bitwise reproducible
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x.grad = None
        roi_align(x, rois, 7, 1 / 8, -1, True).backward(grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(x.grad, grads[1])


def test_autocast_computes_in_float32_and_returns_input_dtype():
    x = torch.randn(2, 3, 12, 16)
    rois = random_rois(5, 2, 48, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(x.bfloat16(), rois, 2, 0.25, 2)
    assert out.dtype == torch.bfloat16  # torchvision casts the float32 result back to the features' dtype
    assert_close(out, roi_align_reference(x.bfloat16().float(), rois, 2, 0.25, 2).bfloat16(), torch.bfloat16)


def test_opcheck():
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    rois = random_rois(5, 2, 20, 24, dtype=torch.float64)
    for args in ((x, rois, 0.5, 2, 3, 2, True, False), (x.to(memory_format=torch.channels_last), rois, 0.25, 3, 3, -1,
                                                         False, True)):
        torch.library.opcheck(torch.ops.normkit.roi_align.default, args)


def test_torch_compile_smoke():
    x = torch.randn(2, 3, 10, 12, requires_grad=True)
    rois = random_rois(6, 2, 20, 24)
    compiled = torch.compile(lambda t, r: roi_align(t, r, 2, 0.5, 2, True).sum(), fullgraph=True)
    compiled(x, rois).backward()
    expected = x.detach().clone().requires_grad_(True)
    roi_align_reference(expected, rois, 2, 0.5, 2, True).sum().backward()
    assert_close(x.grad, expected.grad, torch.float32)


@pytest.mark.parametrize("boxes, message", [
    (torch.zeros(3, 4), r"Tensor\[K, 5\].*got Tensor\[3, 4\]"),
    (torch.zeros(3, 5, 1), r"Tensor\[K, 5\]"),
    ([torch.zeros(2, 5)], r"boxes\[0\] must be Tensor\[L, 4\]"),
    (torch.tensor([[2.0, 0, 0, 1, 1]]), r"batch indices in \[0, 2\).*got 2"),
    (torch.tensor([[-1.0, 0, 0, 1, 1]]), r"batch indices in \[0, 2\)"),
    (torch.tensor([[0.5, 0, 0, 1, 1]]), r"integer batch indices"),
    (torch.zeros(1, 5, dtype=torch.float64), r"same dtype as input \(torch.float32\), got torch.float64"),
    (torch.zeros(1, 5, device="meta"), r"same device as input"),
    ([torch.zeros(1, 4)] * 3, r"3 box tensors for an input batch of 2"),
    ("boxes", r"Tensor\[K, 5\] or a list"),
])
def test_bad_boxes(boxes, message):
    with pytest.raises(ValueError, match=message):
        roi_align(torch.randn(2, 3, 8, 8), boxes, 2)


def test_bad_arguments():
    x, rois = torch.randn(2, 3, 8, 8), torch.zeros(1, 5)
    with pytest.raises(ValueError, match="output_size must be positive"):
        roi_align(x, rois, (0, 2))
    with pytest.raises(ValueError, match="output_size must be an int or a pair"):
        roi_align(x, rois, (2, 2, 2))
    with pytest.raises(ValueError, match="spatial_scale must be a positive finite"):
        roi_align(x, rois, 2, spatial_scale=0.0)
    with pytest.raises(ValueError, match=r"input must be Tensor\[N, C, H, W\]"):
        roi_align(torch.randn(3, 8, 8), rois, 2)
    with pytest.raises(ValueError, match="floating-point"):
        roi_align(torch.zeros(2, 3, 8, 8, dtype=torch.long), rois.long(), 2)
    # The raw op checks too (no Python front end in between).
    with pytest.raises(RuntimeError, match=r"rois must be Tensor\[K, 5\]"):
        torch.ops.normkit.roi_align(x, torch.zeros(1, 4), 1.0, 2, 2, -1, False)
    with pytest.raises(RuntimeError, match=r"batch indices in \[0, 2\)"):
        torch.ops.normkit.roi_align(x, torch.tensor([[7.0, 0, 0, 1, 1]]), 1.0, 2, 2, -1, False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_equals_cpu(dtype, channels_last):
    x = feature_map(1 / 8, channels=16, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = sample_rois(dtype=dtype)
    grad = torch.randn(rois.shape[0], 16, 7, 7, dtype=dtype)
    outs, grads = [], []
    for device in ("cpu", "cuda"):
        xd = x.to(device).detach().requires_grad_(True)
        out = roi_align(xd, rois.to(device), 7, 1 / 8, -1, True)
        out.backward(grad.to(device))
        outs.append(out.cpu().double())
        grads.append(xd.grad.cpu().double())
    assert_close(outs[1], outs[0], dtype)
    assert_close(grads[1], grads[0], dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_deterministic_backward_in_chunks(channels_last):
    # 12 RoIs of 7 * 7 bins * 64 * 64 samples: 9.6M contributions, more than one chunk (2^22) of the
    # deterministic backward, with overlapping boxes so cells collect sums from several chunks.
    x = torch.randn(2, 3, 160, 160, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = torch.tensor([[k % 2, 4.0 * k, 2.0 * k, 100.0 + 3 * k, 90.0 + 4 * k] for k in range(12)],
                        dtype=torch.float64)
    grad = torch.randn(12, 3, 7, 7, dtype=torch.float64)
    if channels_last:  # the backward kernel follows the layout of the incoming gradient
        grad = grad.contiguous(memory_format=torch.channels_last)
    grads = {}
    for device, deterministic in (("cpu", True), ("cuda", True), ("cuda", False), ("cuda", True)):
        xd = x.to(device).requires_grad_(True)
        roi_align(xd, rois.to(device), 7, 1.0, 64, True, deterministic=deterministic).backward(grad.to(device))
        result = xd.grad.cpu()
        if (device, deterministic) == ("cuda", True) and (device, True) in grads:
            assert torch.equal(result, grads[device, True])  # bitwise reproducible across chunks
        grads[device, deterministic] = result
    torch.testing.assert_close(grads["cuda", True], grads["cpu", True], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grads["cuda", False], grads["cpu", True], atol=1e-10, rtol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_huge_boxes_visit_only_their_samples_on_the_map():
    # Adaptive grids stop at 65536 samples per axis: a thread walking every sample of these bins would take
    # 4e9 steps (the kernel would seem to hang), and the deterministic backward listing every sample would need
    # terabytes; the searched ranges hold the few samples on the 50 x 50 map.
    x = torch.randn(1, 8, 50, 50)
    rois = torch.tensor([[0, -1e8, -1e8, 1e8, 1e8], [0, 0.0, 0.0, 1e7, 30.0]])
    grad = torch.randn(2, 8, 7, 7)
    results = []
    for device, deterministic in (("cpu", True), ("cuda", False), ("cuda", True)):  # listed: 4 entries per sample
        xd = x.to(device).requires_grad_(True)
        out = roi_align(xd, rois.to(device), 7, 1 / 16, 0, True, deterministic=deterministic)
        out.backward(grad.to(device))
        results.append((out.cpu(), xd.grad.cpu()))
    for out, grad_input in results[1:]:
        assert_close(out, results[0][0], torch.float32)
        assert_close(grad_input, results[0][1], torch.float32)
