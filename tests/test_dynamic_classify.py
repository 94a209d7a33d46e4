"""normkit.ops.dynamic_classify against the official CondNet formulation (grouped conv, groups = B)."""
import pytest
import torch

from conftest import DEVICES
from cond_classifier_testing import PAST_CACHE_BLOCKS, intra_op_threads, single_thread  # noqa: F401  (fixtures)
from normkit.ops import dynamic_classify, dynamic_classify_reference

# (B, K, C, H, W): K not dividing C and vice versa, H*W = 1, B = 1.
SHAPES = [(2, 5, 7, 4, 3), (1, 9, 4, 1, 1), (3, 4, 6, 9, 15), (2, 19, 8, 8, 9)]
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
              torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def sample_inputs(shape, dtype=torch.float64, device="cpu", channels_last=False):
    b, k, c, h, w = shape
    features = torch.randn(b, c, h, w, dtype=torch.float64)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)
    weight = torch.randn(b, k, c, dtype=torch.float64) / c ** 0.5
    bias = torch.randn(b, k, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_() for t in (features, weight, bias))


def forward_backward(fn, features, weight, bias, grad):
    out = fn(features, weight, bias)
    inputs = (features, weight) if bias is None else (features, weight, bias)
    return (out,) + torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(device, dtype, shape, with_bias, channels_last):
    features, weight, bias = sample_inputs(shape, dtype, device, channels_last)
    bias = bias if with_bias else None
    b, k, c, h, w = shape
    grad = torch.randn(b, k, h, w, dtype=torch.float64, device=device)
    results = forward_backward(dynamic_classify, features, weight, bias, grad.to(dtype))
    # The oracle runs in fp64 so low-precision results are judged against the exact values.
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in (features, weight, bias)]
    expected = forward_backward(dynamic_classify_reference, *ref_inputs, grad)
    rtol, atol = TOLERANCES[dtype]
    assert results[0].dtype == dtype and results[0].shape == (b, k, h, w)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert results[0].is_contiguous(memory_format=layout) and results[1].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_past_cache_blocks(with_bias, channels_last, intra_op_threads):
    features, weight, bias = sample_inputs(PAST_CACHE_BLOCKS, torch.float32, channels_last=channels_last)
    bias = bias if with_bias else None
    b, k, c, h, w = PAST_CACHE_BLOCKS
    grad = torch.randn(b, k, h, w, dtype=torch.float64)
    results = forward_backward(dynamic_classify, features, weight, bias, grad.float())
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in (features, weight, bias)]
    expected = forward_backward(dynamic_classify_reference, *ref_inputs, grad)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # One weight row for every class: a weight whose rows are zero-stride views is read correctly.
    shared = weight.detach()[:, :1].expand(b, k, c)
    torch.testing.assert_close(dynamic_classify(features, shared, bias).double(),
                               dynamic_classify_reference(*ref_inputs[:1], shared.double(), ref_inputs[2]),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_outputs_on_several_threads(dtype, channels_last, intra_op_threads):
    # One sample whose output is too small to cut into a tile per thread: on 2 and 3 threads the CPU op hands the
    # GEMMs to the library's batched GEMM (at::baddbmm), bias included.
    shape = (1, 9, 4, 5, 3)
    features, weight, bias = sample_inputs(shape, dtype, channels_last=channels_last)
    grad = torch.randn(1, 9, 5, 3, dtype=torch.float64)
    ref_inputs = [t.detach().double().requires_grad_() for t in (features, weight, bias)]
    for with_bias in (True, False):
        results = forward_backward(dynamic_classify, features, weight, bias if with_bias else None, grad.to(dtype))
        expected = forward_backward(dynamic_classify_reference, ref_inputs[0], ref_inputs[1],
                                    ref_inputs[2] if with_bias else None, grad)
        rtol, atol = TOLERANCES[dtype]
        for got, want in zip(results, expected):
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def test_hand_computed():
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # B=1, C=2, H=1, W=2
    weight = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.5, -1.0]]])  # K=3
    bias = torch.tensor([[0.0, 1.0, -1.0]])
    expected = torch.tensor([[[[4.0, 1.0]], [[3.0, 5.0]], [[-3.5, 1.0]]]])
    torch.testing.assert_close(dynamic_classify(features, weight, bias), expected)


@pytest.mark.parametrize("shape", [(2, 3, 4, 2, 3), (1, 4, 3, 1, 1)])
def test_gradcheck(shape, single_thread):
    features, weight, bias = sample_inputs(shape)
    assert torch.autograd.gradcheck(dynamic_classify, (features, weight, bias))
    assert torch.autograd.gradcheck(dynamic_classify, (features, weight))
    cl_features, weight, bias = sample_inputs(shape, channels_last=True)
    assert torch.autograd.gradcheck(dynamic_classify, (cl_features, weight, bias), fast_mode=True)


def test_saves_no_output_sized_tensor():
    features, weight, bias = sample_inputs((2, 5, 7, 4, 3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dynamic_classify(features, weight, bias)
    assert {t.data_ptr() for t in saved} == {features.data_ptr(), weight.data_ptr()}


def test_empty():
    assert dynamic_classify(torch.randn(0, 4, 2, 2), torch.randn(0, 3, 4)).shape == (0, 3, 2, 2)
    assert dynamic_classify(torch.randn(2, 4, 0, 3), torch.randn(2, 3, 4), torch.randn(2, 3)).shape == (2, 3, 0, 3)
    # No channels: the logits are the biases (or zero), for every layout and dtype the CPU GEMMs treat apart.
    bias = torch.randn(2, 3, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        for layout in (torch.contiguous_format, torch.channels_last):
            features = torch.randn(2, 0, 4, 5, dtype=dtype).to(memory_format=layout)
            weight = torch.randn(2, 3, 0, dtype=dtype)
            torch.testing.assert_close(dynamic_classify(features, weight, bias.to(dtype)),
                                       bias.to(dtype)[:, :, None, None].expand(2, 3, 4, 5))
            assert torch.equal(dynamic_classify(features, weight), torch.zeros(2, 3, 4, 5, dtype=dtype))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(with_bias, channels_last, single_thread):
    features, weight, bias = sample_inputs((2, 5, 7, 4, 3), torch.float32, channels_last=channels_last)
    torch.library.opcheck(torch.ops.normkit.dynamic_classify, (features, weight, bias if with_bias else None))


@pytest.mark.parametrize("features_shape, weight_shape, bias_shape, match", [
    ((2, 7, 4, 3), (3, 5, 7), None, r"weight must be Tensor\[B, K, C\] = \[2, K, 7\]"),
    ((2, 7, 4, 3), (2, 5, 6), None, r"weight must be Tensor\[B, K, C\] = \[2, K, 7\]"),
    ((2, 7, 4, 3), (2, 5, 7), (2, 4), r"bias must be Tensor\[B, K\] = \[2, 5\]"),
    ((2, 7, 12), (2, 5, 7), None, r"features must be Tensor\[B, C, H, W\]"),
])
def test_bad_inputs(features_shape, weight_shape, bias_shape, match):
    bias = torch.zeros(bias_shape) if bias_shape is not None else None
    with pytest.raises(ValueError, match=match):
        dynamic_classify(torch.zeros(features_shape), torch.zeros(weight_shape), bias)


def test_registered_op_rejects_other_dtypes():
    # The C++ op checks dtypes itself, for callers of torch.ops.normkit that skip the Python wrapper.
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        torch.ops.normkit.dynamic_classify(torch.zeros(2, 7, 4, 3, dtype=torch.int32),
                                           torch.zeros(2, 5, 7, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        torch.ops.normkit.class_embedding(torch.zeros(2, 5, 4, 3, dtype=torch.float8_e4m3fn),
                                          torch.zeros(2, 7, 4, 3, dtype=torch.float8_e4m3fn))


def test_dtype_mismatch():
    with pytest.raises(ValueError, match="dtype"):
        dynamic_classify(torch.randn(2, 7, 4, 3), torch.randn(2, 5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        dynamic_classify(torch.randn(2, 7, 4, 3), torch.randn(2, 5, 7), torch.randn(2, 5, dtype=torch.float16))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(dtype, channels_last):
    features, weight, bias = sample_inputs((2, 19, 8, 17, 13), dtype, channels_last=channels_last)
    grad = torch.randn(2, 19, 17, 13, dtype=dtype)
    cpu = forward_backward(dynamic_classify, features, weight, bias, grad)
    cuda_inputs = [t.detach().cuda().requires_grad_() for t in (features, weight, bias)]
    cuda = forward_backward(dynamic_classify, *cuda_inputs, grad.cuda())
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=rtol, atol=atol)
