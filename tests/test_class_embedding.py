"""normkit.ops.class_embedding against the official CondNet formulation (softmax + bmm)."""
import pytest
import torch

from conftest import DEVICES
from cond_classifier_testing import PAST_CACHE_BLOCKS, intra_op_threads, single_thread  # noqa: F401  (fixtures)
from normkit.ops import class_embedding, class_embedding_reference

# (B, K, C, H, W): K < C, K > C, K not dividing C and vice versa, H*W = 1, B = 1, odd pixel counts. The CPU
# kernel handles 128 KiB of class values at a time; K = 150 with 255 pixels is 208 + 47 pixels in fp32,
# fp16 and bf16 (float accumulation) and 96 + 96 + 63 in fp64, the other shapes fit in one block.
SHAPES = [(2, 5, 7, 4, 3), (1, 9, 4, 1, 1), (3, 4, 6, 9, 15), (2, 19, 8, 8, 9), (2, 150, 3, 15, 17)]
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
              torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def sample_inputs(shape, dtype=torch.float64, device="cpu", channels_last=False, scale=3.0):
    b, k, c, h, w = shape
    guidance = (torch.randn(b, k, h, w, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    features = torch.randn(b, c, h, w, dtype=torch.float64).to(device=device, dtype=dtype)
    if channels_last:
        guidance = guidance.to(memory_format=torch.channels_last)
        features = features.to(memory_format=torch.channels_last)
    return guidance.requires_grad_(), features.requires_grad_()


def forward_backward(fn, guidance, features, grad):
    out = fn(guidance, features)
    gg, gf = torch.autograd.grad(out, (guidance, features), grad)
    return out, gg, gf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(device, dtype, shape, channels_last):
    guidance, features = sample_inputs(shape, dtype, device, channels_last)
    grad = torch.randn(shape[0], shape[1], shape[2], dtype=torch.float64, device=device)
    out, gg, gf = forward_backward(class_embedding, guidance, features, grad.to(dtype))
    # The oracle always runs in fp64 so low-precision results are judged against the exact values.
    g64, f64 = (t.detach().double().requires_grad_() for t in (guidance, features))
    ref, ref_gg, ref_gf = forward_backward(class_embedding_reference, g64, f64, grad)
    rtol, atol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == (shape[0], shape[1], shape[2])
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(gg.double(), ref_gg, rtol=rtol, atol=atol)
    torch.testing.assert_close(gf.double(), ref_gf, rtol=rtol, atol=atol)
    assert gf.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_past_cache_blocks(channels_last, intra_op_threads):
    guidance, features = sample_inputs(PAST_CACHE_BLOCKS, torch.float32, channels_last=channels_last)
    b, k, c = PAST_CACHE_BLOCKS[:3]
    grad = torch.randn(b, k, c, dtype=torch.float64)
    results = forward_backward(class_embedding, guidance, features, grad.float())
    expected = forward_backward(class_embedding_reference, *(t.detach().double().requires_grad_()
                                                             for t in (guidance, features)), grad)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_outputs_on_several_threads(dtype, channels_last, intra_op_threads):
    # One sample whose GEMM outputs are too small to cut into a tile per thread: on 2 and 3 threads the CPU op hands
    # them to the library's batched GEMM (at::baddbmm), the 1/N mean as its alpha.
    shape = (1, 9, 4, 5, 3)
    guidance, features = sample_inputs(shape, dtype, channels_last=channels_last)
    grad = torch.randn(1, 9, 4, dtype=torch.float64)
    results = forward_backward(class_embedding, guidance, features, grad.to(dtype))
    expected = forward_backward(class_embedding_reference,
                                *(t.detach().double().requires_grad_() for t in (guidance, features)), grad)
    rtol, atol = TOLERANCES[dtype]
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(2, 3, 4, 2, 3), (1, 4, 3, 1, 1)])
def test_gradcheck(shape, single_thread):
    guidance, features = sample_inputs(shape, scale=1.0)
    assert torch.autograd.gradcheck(class_embedding, (guidance, features))
    cl_guidance, cl_features = sample_inputs(shape, scale=1.0, channels_last=True)
    assert torch.autograd.gradcheck(class_embedding, (cl_guidance, cl_features), fast_mode=True)


def test_hand_computed():
    # One sample, two classes, two pixels, one channel: logits (0, 0) at pixel 0 give P = (1/2, 1/2);
    # logits (ln 3, 0) at pixel 1 give P = (3/4, 1/4). Features 2 and 4.
    guidance = torch.tensor([[[[0.0, torch.log(torch.tensor(3.0))]], [[0.0, 0.0]]]])
    features = torch.tensor([[[[2.0, 4.0]]]])
    expected = torch.tensor([[[(0.5 * 2 + 0.75 * 4) / 2], [(0.5 * 2 + 0.25 * 4) / 2]]])
    torch.testing.assert_close(class_embedding(guidance, features), expected)


def test_large_logits_stay_finite():
    guidance, features = sample_inputs((2, 6, 5, 3, 4), torch.float32, scale=1e4)
    out, gg, gf = forward_backward(class_embedding, guidance, features, torch.ones(2, 6, 5))
    assert torch.isfinite(out).all() and torch.isfinite(gg).all() and torch.isfinite(gf).all()
    torch.testing.assert_close(out, class_embedding_reference(guidance, features))


def test_saves_only_inputs():
    # The reference keeps the (B, K, N) probabilities (softmax output and matmul input); the op keeps
    # nothing but its two inputs and recomputes the softmax in backward.
    guidance, features = sample_inputs((2, 5, 7, 4, 3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        class_embedding(guidance, features)
    assert {t.data_ptr() for t in saved} == {guidance.data_ptr(), features.data_ptr()}


def test_empty_batch_and_classes():
    assert class_embedding(torch.randn(0, 3, 2, 2), torch.randn(0, 4, 2, 2)).shape == (0, 3, 4)
    guidance, features = torch.randn(2, 0, 2, 2, requires_grad=True), torch.randn(2, 4, 2, 2, requires_grad=True)
    out = class_embedding(guidance, features)
    assert out.shape == (2, 0, 4)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last, single_thread):
    guidance, features = sample_inputs((2, 5, 7, 4, 3), torch.float32, channels_last=channels_last)
    torch.library.opcheck(torch.ops.normkit.class_embedding, (guidance, features))


@pytest.mark.parametrize("guidance_shape, features_shape, dtype, match", [
    ((2, 5, 4, 3), (3, 7, 4, 3), torch.float32, "batch|match features"),
    ((2, 5, 4, 4), (2, 7, 4, 3), torch.float32, "match features"),
    ((2, 5, 12), (2, 7, 4, 3), torch.float32, r"guidance must be Tensor\[B, K, H, W\]"),
    ((2, 5, 0, 3), (2, 7, 0, 3), torch.float32, "H\\*W > 0"),
    ((2, 5, 4, 3), (2, 7, 4, 3), torch.int64, "float16, bfloat16, float32 or float64"),
])
def test_bad_inputs(guidance_shape, features_shape, dtype, match):
    guidance = torch.zeros(guidance_shape, dtype=dtype)
    features = torch.zeros(features_shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        class_embedding(guidance, features)


def test_dtype_mismatch():
    with pytest.raises(ValueError, match="dtype"):
        class_embedding(torch.randn(2, 5, 4, 3), torch.randn(2, 7, 4, 3, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    guidance, features = sample_inputs((2, 19, 8, 17, 13), dtype)
    grad = torch.randn(2, 19, 8, dtype=dtype)
    cpu = forward_backward(class_embedding, guidance, features, grad)
    g, f = (t.detach().cuda().requires_grad_() for t in (guidance, features))
    cuda = forward_backward(class_embedding, g, f, grad.cuda())
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=rtol, atol=atol)


def test_fp16_mean_over_many_pixels_does_not_overflow():
    # 4096 pixels of value 200 sum to 819200 > fp16's 65504: the official matmul-then-scale overflows to
    # inf; the op applies 1/N inside the GEMM's fp32 accumulation.
    guidance = torch.zeros(1, 3, 64, 64, dtype=torch.float16)
    features = torch.full((1, 5, 64, 64), 200.0, dtype=torch.float16)
    out = class_embedding(guidance, features)
    torch.testing.assert_close(out.float(), torch.full((1, 3, 5), 200.0 / 3), rtol=1e-3, atol=0)


@pytest.mark.slow
def test_torch_compile():
    from normkit.ops import dynamic_classify

    def head(guidance, features, weight):
        return dynamic_classify(features, weight + class_embedding(guidance, features))

    guidance, features = sample_inputs((2, 5, 7, 4, 3), torch.float32)
    weight = torch.randn(2, 5, 7)
    compiled = torch.compile(head, fullgraph=True)
    torch.testing.assert_close(compiled(guidance, features, weight), head(guidance, features, weight))
