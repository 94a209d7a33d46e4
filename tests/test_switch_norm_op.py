"""normkit.ops.switch_norm against the pure-PyTorch official formulation (OpTester style)."""
import itertools

import pytest
import torch

from conftest import DEVICES
from normkit.ops import switch_norm, switch_norm_reference
from normkit.ops.switch_norm import num_mixture_weights

# (has_instance, shape): SN2d/3d on 4D/5D, SN1d on (N, C) and (N, C, L); odd sizes on purpose.
CASES = [(True, (3, 5, 4, 6)), (True, (2, 4, 3, 2, 5)), (True, (2, 3, 1, 1)), (False, (6, 5)), (False, (3, 4, 7))]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def sample_inputs(shape, has_instance, using_bn, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    k = num_mixture_weights(using_bn, has_instance)

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(device)

    return dict(input=rand(*shape, scale=2.0, shift=0.5).to(dtype), weight=rand(c, shift=1.0), bias=rand(c),
                mean_weight=rand(k), var_weight=rand(k), running_mean=rand(c), running_var=rand(c).abs() + 0.5)


def run(fn, inputs, training, using_bn, has_instance, requires_grad=(), momentum=0.1, moving=True, eps=1e-5):
    args = {k: (v.clone().requires_grad_(k in requires_grad) if v is not None else None) for k, v in inputs.items()}
    out = fn(args["input"], args["weight"], args["bias"], args["mean_weight"], args["var_weight"],
             args["running_mean"], args["running_var"], training, momentum, eps, moving, using_bn, has_instance)
    return out, args


def compare_with_reference(inputs, training, using_bn, has_instance, grads):
    """The kernel's output and the gradients named in `grads` against the reference's; returns both runs' args."""
    out, args = run(switch_norm, inputs, training, using_bn, has_instance, grads)
    ref, ref_args = run(switch_norm_reference, inputs, training, using_bn, has_instance, grads)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [args[k] for k in grads], g)
    want = torch.autograd.grad(ref, [ref_args[k] for k in grads], g)
    for name, a, b in zip(grads, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")
    return args, ref_args


@pytest.mark.parametrize("has_instance,shape", CASES)
@pytest.mark.parametrize("using_bn,training", [(True, True), (True, False), (False, True), (False, False)])
def test_gradcheck_against_reference(has_instance, shape, using_bn, training):
    inputs = sample_inputs(shape, has_instance, using_bn)
    grads = ("input", "weight", "bias", "mean_weight", "var_weight")
    args, ref_args = compare_with_reference(inputs, training, using_bn, has_instance, grads)
    torch.testing.assert_close(args["running_mean"], ref_args["running_mean"])
    torch.testing.assert_close(args["running_var"], ref_args["running_var"])

    def op(x, w, b, mw, vw):
        return switch_norm(x, w, b, mw, vw, inputs["running_mean"].clone(), inputs["running_var"].clone(), training,
                           0.1, 1e-5, True, using_bn, has_instance)

    gc_inputs = [inputs[k].clone().requires_grad_() for k in grads]
    assert torch.autograd.gradcheck(op, gc_inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_instance,shape", [(True, (4, 6, 9, 7)), (False, (5, 6, 8))])
def test_low_precision_matches_float64_reference(device, dtype, has_instance, shape):
    inputs = sample_inputs(shape, has_instance, True, dtype=dtype, device=device)
    out, args = run(switch_norm, inputs, True, True, has_instance, ("input", "weight"))
    ref_inputs = {k: v.double() for k, v in inputs.items()}
    ref, ref_args = run(switch_norm_reference, ref_inputs, True, True, has_instance, ("input", "weight"))
    assert out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    gx, gw = torch.autograd.grad(out, [args["input"], args["weight"]], g.to(dtype))
    rgx, rgw = torch.autograd.grad(ref, [ref_args["input"], ref_args["weight"]], g)
    torch.testing.assert_close(gx.double(), rgx, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(gw.double(), rgw, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_equals_planar(device, dim, training):
    shape = (3, 5, 6, 7) if dim == 4 else (2, 5, 3, 4, 6)
    fmt = torch.channels_last if dim == 4 else torch.channels_last_3d
    inputs = sample_inputs(shape, True, True, dtype=torch.float32, device=device)
    planar, pa = run(switch_norm, inputs, training, True, True, ("input", "weight", "mean_weight"))
    cl_inputs = dict(inputs, input=inputs["input"].contiguous(memory_format=fmt))
    cl, ca = run(switch_norm, cl_inputs, training, True, True, ("input", "weight", "mean_weight"))
    assert cl.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(cl, planar, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(planar)
    got = torch.autograd.grad(cl, [ca["input"], ca["weight"], ca["mean_weight"]], g.contiguous(memory_format=fmt))
    want = torch.autograd.grad(planar, [pa["input"], pa["weight"], pa["mean_weight"]], g)
    assert got[0].is_contiguous(memory_format=fmt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_non_contiguous_input():
    inputs = sample_inputs((3, 4, 10, 12), True, True)
    strided = dict(inputs, input=inputs["input"][:, :, ::2, 1::3])
    out, _ = run(switch_norm, strided, True, True, True)
    ref, _ = run(switch_norm_reference, strided, True, True, True)
    torch.testing.assert_close(out, ref)


def test_single_element_planes_are_finite():
    # Official SN returns NaN for N x C x 1 x 1 (unbiased variance of one value); normkit returns finite output.
    inputs = sample_inputs((4, 6, 1, 1), True, True, dtype=torch.float32)
    out, args = run(switch_norm, inputs, True, True, True, ("input",))
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), args["input"])
    assert torch.isfinite(grad).all()


def test_hand_computed_instance_only():
    # With all mixture weight on IN (logits -inf elsewhere) SN is instance norm with the unbiased variance.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]], dtype=torch.float64)  # mean 3, unbiased var 14/3
    big = torch.tensor([50.0, -50.0, -50.0], dtype=torch.float64)
    y = switch_norm(x, None, None, big, big, None, None, True)
    expected = (x - 3.0) / (14.0 / 3.0 + 1e-5) ** 0.5
    torch.testing.assert_close(y, expected)


def test_eval_uses_running_stats_and_leaves_them():
    inputs = sample_inputs((3, 4, 5, 5), True, True)
    before = (inputs["running_mean"].clone(), inputs["running_var"].clone())
    out, args = run(switch_norm, inputs, False, True, True)
    torch.testing.assert_close(args["running_mean"], before[0])
    # Changing the running stats changes the eval output through the BN component only.
    inputs2 = dict(inputs, running_mean=inputs["running_mean"] + 1.0)
    out2, _ = run(switch_norm, inputs2, False, True, True)
    assert not torch.allclose(out, out2)


@pytest.mark.parametrize("shape", [(3,), (1, 3, 1)])  # normkit's and the official checkpoints' buffer shapes
def test_training_updates_the_callers_running_buffers_in_place(shape):
    inputs = sample_inputs((4, 3, 5, 5), True, True)
    running_mean = inputs["running_mean"].clone().reshape(shape)
    running_var = inputs["running_var"].clone().reshape(shape)
    versions = running_mean._version, running_var._version
    switch_norm(inputs["input"].requires_grad_(), inputs["weight"], inputs["bias"], inputs["mean_weight"],
                inputs["var_weight"], running_mean, running_var, True, 0.25)
    x = inputs["input"].detach().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(running_mean.reshape(-1), 0.75 * inputs["running_mean"] + 0.25 * x.mean(1))
    # the BN variance of the official formulas: mean over n of (var_in + mean_in^2), minus mean_bn^2 (biased in n)
    planes = inputs["input"].detach().reshape(4, 3, -1)
    var_bn = (planes.var(-1) + planes.mean(-1) ** 2).mean(0) - x.mean(1) ** 2
    torch.testing.assert_close(running_var.reshape(-1), 0.75 * inputs["running_var"] + 0.25 * var_bn)
    # autograd sees the in-place update, as for BatchNorm's buffers
    assert running_mean._version > versions[0] and running_var._version > versions[1]


def test_batch_average_mode_accumulates_sums():
    inputs = sample_inputs((4, 3, 5, 5), True, True)
    inputs["running_mean"].zero_()
    inputs["running_var"].zero_()
    _, args = run(switch_norm, inputs, True, True, True, moving=False)
    x = inputs["input"].reshape(4, 3, -1)
    mean_in, var_in = x.mean(-1), x.var(-1)
    mean_bn = mean_in.mean(0)
    var_bn = (var_in + mean_in ** 2).mean(0) - mean_bn ** 2
    torch.testing.assert_close(args["running_mean"], mean_bn)
    torch.testing.assert_close(args["running_var"], var_bn + mean_bn ** 2)


@pytest.mark.parametrize("has_instance,shape", [(True, (4, 3, 5, 5)), (False, (6, 3, 4))])
def test_reference_batch_average_mode_matches_the_kernel_and_the_official_sums(has_instance, shape):
    # The benchmarks' and the modules' "reference" implementation must accumulate what the kernel does:
    # sums of E[x] and of E[x^2] = var + mean^2 (official batch-average mode), not of the variances.
    inputs = sample_inputs(shape, has_instance, True)
    inputs["running_mean"].fill_(0.5)
    inputs["running_var"].fill_(2.0)
    _, args = run(switch_norm, inputs, True, True, has_instance, moving=False)
    _, ref_args = run(switch_norm_reference, inputs, True, True, has_instance, moving=False)
    c = shape[1]
    x = inputs["input"].transpose(0, 1).reshape(c, -1)
    if has_instance:  # BN variance of the official formulas, from unbiased instance variances
        planes = inputs["input"].reshape(shape[0], c, -1)
        mean_bn = planes.mean(-1).mean(0)
        var_bn = (planes.var(-1) + planes.mean(-1) ** 2).mean(0) - mean_bn ** 2
    else:
        mean_bn, var_bn = x.mean(1), x.var(1)
    for got in (args, ref_args):
        torch.testing.assert_close(got["running_mean"], 0.5 + mean_bn)
        torch.testing.assert_close(got["running_var"], 2.0 + var_bn + mean_bn ** 2)


@pytest.mark.parametrize("has_instance,shape", [(True, (3, 4, 5, 6)), (False, (5, 4, 3))])
def test_eval_without_running_buffers_uses_batch_statistics_in_kernel_and_reference(has_instance, shape):
    inputs = dict(sample_inputs(shape, has_instance, True), running_mean=None, running_var=None)
    train, _ = run(switch_norm, inputs, True, True, has_instance)
    for fn in (switch_norm, switch_norm_reference):
        out, _ = run(fn, inputs, False, True, has_instance)
        torch.testing.assert_close(out, train)


def test_empty_batch():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    y = switch_norm(x, torch.ones(4), torch.zeros(4), torch.ones(3), torch.ones(3), torch.zeros(4), torch.ones(4), True)
    assert y.shape == x.shape
    y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_leaves_the_running_statistics_through_the_op(device):
    # the dispatcher op itself (torch.compile and direct callers skip the Python early return)
    x = torch.randn(0, 4, 5, 5, device=device)
    running_mean, running_var = torch.zeros(4, device=device), torch.ones(4, device=device)
    torch.ops.normkit.switch_norm(x, None, None, torch.ones(3, device=device), torch.ones(3, device=device),
                                  running_mean, running_var, True, 0.1, True, True, 1e-5)
    assert torch.equal(running_mean.cpu(), torch.zeros(4)) and torch.equal(running_var.cpu(), torch.ones(4))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_statistics_are_zero_on_every_device(device):
    # CPU and CUDA agree: an empty batch has no BN statistics to report (0 / 0 would give NaN)
    moments = torch.ops.normkit._switch_norm_moments(torch.randn(0, 4, 5, 5, device=device))
    coef, bn_used = torch.ops.normkit._switch_norm_forward_coefficients(
        moments, None, None, torch.ones(3, device=device), torch.ones(3, device=device), None, 25, True, 1e-5)
    assert coef.shape == (0, 4, 2)
    assert torch.equal(bn_used.cpu(), torch.zeros(3, 4))


@pytest.mark.parametrize("has_instance,shape,using_bn,training",
                         [(True, (2, 3, 4, 5), True, True), (True, (2, 3, 4, 5), True, False),
                          (False, (4, 3), True, True), (True, (2, 3, 4, 5), False, True)])
def test_opcheck(has_instance, shape, using_bn, training):
    inputs = sample_inputs(shape, has_instance, using_bn)
    args = (inputs["input"].requires_grad_(), inputs["weight"].requires_grad_(), inputs["bias"],
            inputs["mean_weight"].requires_grad_(), inputs["var_weight"], inputs["running_mean"],
            inputs["running_var"], training, 0.1, True, has_instance, 1e-5)
    torch.library.opcheck(torch.ops.normkit.switch_norm.default, args)
    n, c = shape[:2]
    moments = torch.ops.normkit._switch_norm_moments(inputs["input"].detach())
    torch.library.opcheck(torch.ops.normkit._switch_norm_moments.default, (inputs["input"].detach(),))
    torch.library.opcheck(torch.ops.normkit._switch_norm_grad_moments.default,
                          (torch.randn(shape, dtype=torch.float64), inputs["input"].detach()))
    coef = torch.randn(n, c, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.normkit._switch_norm_affine.default, (inputs["input"].detach(), coef))
    assert moments.shape == (n, c, 2)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_float32_sums_over_large_planes_stay_accurate_in_both_layouts(memory_format):
    # 512 x 512 planes: summed in one running float32 total, the channels-last rows lost 150x the planar accuracy
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 512, 512, generator=g, dtype=torch.float64) + 3.0
    dy = torch.randn(1, 4, 512, 512, generator=g, dtype=torch.float64)
    w = torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)  # instance statistics: one plane's sums decide it all
    xr = x.clone().requires_grad_()
    ref = switch_norm_reference(xr, None, None, w, w, training=True)
    (ref_grad,) = torch.autograd.grad(ref, xr, dy)
    x32 = x.float().contiguous(memory_format=memory_format).requires_grad_()
    out = switch_norm(x32, None, None, w.float(), w.float(), training=True)
    (grad,) = torch.autograd.grad(out, x32, dy.float().contiguous(memory_format=memory_format))
    assert (out.double() - ref).abs().max() < 1e-5
    assert (grad.double() - ref_grad).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["permuted", "transposed_spatial", "channels_last", "planes_of_one"])
def test_fake_kernels_give_the_layouts_the_kernels_write(layout):
    # torch.compile checks a fake kernel's strides against the real one's: a permuted input is copied to NCHW by
    # the kernels, a channels-last one kept.
    x = {"permuted": torch.randn(3, 2, 4, 5).transpose(0, 1),
         "transposed_spatial": torch.randn(2, 3, 5, 4).transpose(-1, -2),
         "channels_last": torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
         "planes_of_one": torch.randn(2, 3, 1, 1)}[layout]
    coefficients = torch.randn(2, 3, 2)
    torch.library.opcheck(torch.ops.normkit._switch_norm_affine.default, (x, coefficients))
    torch.library.opcheck(torch.ops.normkit._switch_norm_affine_backward.default,
                          (torch.randn_like(x), x, torch.randn(2, 3, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [3, 196, 1100])  # shorter than a vector; a partial last vector; two chunks
def test_cpu_plane_sums_independent_of_position(dtype, length):
    # The CPU reductions read a plane's last partial vector with a full load ending at the plane's end (or, for
    # planes shorter than a vector, element by element), whatever the plane's alignment; a plane's sums must not
    # depend on where it lies in the tensor, nor on which plane comes before it.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 9, length, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    dy = torch.randn(1, 9, length, generator=g, dtype=torch.float64).to(dtype)
    ops = torch.ops.normkit
    whole, shifted = ops._switch_norm_moments(x), ops._switch_norm_moments(x[:, 1:].contiguous())
    assert torch.equal(whole[:, 1:], shifted)
    whole = ops._switch_norm_grad_moments(dy, x)
    shifted = ops._switch_norm_grad_moments(dy[:, 1:].contiguous(), x[:, 1:].contiguous())
    assert torch.equal(whole[:, 1:], shifted)
    # And they are the plane's sums: the exact mean and M2, the sums of dy and dy * x (float64 references).
    x64, dy64 = x.double(), dy.double()
    mean = x64.mean(-1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops._switch_norm_moments(x).double(),
                               torch.stack([mean, ((x64 - mean[..., None]) ** 2).sum(-1)], -1), **tol)
    torch.testing.assert_close(ops._switch_norm_grad_moments(dy, x).double(),
                               torch.stack([dy64.sum(-1), (dy64 * x64).sum(-1)], -1), **tol)


@pytest.mark.parametrize("offset", [0.0, 1.5, 3.0, 1e3])
def test_cpu_moments_accurate_whatever_the_mean(offset):
    # The CPU moments take M2 from one pass (sum x^2 - sum x * mean) while |mean| <= 2 std, and from squared
    # deviations otherwise: either way M2 must stay accurate. At offset 1e3 (std 1) the one-pass form alone would be
    # off by ~10% in float32.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 14, 14, generator=g, dtype=torch.float64) + offset
    x[0, :3] *= 0.01  # some planes with a tiny spread around the offset
    moments = torch.ops.normkit._switch_norm_moments(x.float()).double()
    flat = x.float().double().flatten(2)
    mean = flat.mean(-1)
    m2 = ((flat - mean[..., None]) ** 2).sum(-1)
    torch.testing.assert_close(moments[..., 0], mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moments[..., 1], m2, rtol=2e-5, atol=0)


def test_cpu_results_independent_of_thread_count():
    # 32 x 257 planes: the streaming passes and the O(N*C) coefficient steps (grain 4096 planes) both split over
    # threads; every sum keeps one order, so one and two threads must agree bit for bit.
    inputs = sample_inputs((32, 257, 3, 3), True, True, dtype=torch.float32)
    grad = torch.randn(32, 257, 3, 3, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out, args = run(switch_norm, inputs, True, True, True,
                            requires_grad=("input", "weight", "bias", "mean_weight", "var_weight"))
            out.backward(grad)
            results.append([out.detach()] + [args[k].grad for k in ("input", "weight", "bias", "mean_weight",
                                                                     "var_weight")] + [args["running_mean"]])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("training", [True, False])
def test_cpu_channels_last_past_one_channel_block_matches_reference(training):
    # The CPU channels-last passes (moments, gradient moments, affine and its backward) take 256 channels per task:
    # 300 channels make a full block and a partial one, whose statistics and coefficients sit at channel offset 256.
    shape = (2, 300, 3, 5)
    inputs = sample_inputs(shape, True, True)
    grads = ("input", "weight", "bias", "mean_weight", "var_weight")
    cl_inputs = dict(inputs, input=inputs["input"].contiguous(memory_format=torch.channels_last))
    out, args = run(switch_norm, cl_inputs, training, True, True, grads)
    ref, ref_args = run(switch_norm_reference, inputs, training, True, True, grads)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [args[k] for k in grads], g.contiguous(memory_format=torch.channels_last))
    want = torch.autograd.grad(ref, [ref_args[k] for k in grads], g)
    for name, a, b in zip(grads, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("given", ["weight", "bias"])
def test_weight_without_bias_and_bias_without_weight(given):
    # Each affine parameter gets its gradient whether or not the other one is given.
    inputs = sample_inputs((3, 4, 5, 6), True, True)
    inputs["bias" if given == "weight" else "weight"] = None
    compare_with_reference(inputs, True, True, True, ("input", given, "mean_weight", "var_weight"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input

def _call(**overrides):
    inputs = sample_inputs((2, 4, 3, 3), True, True, dtype=torch.float32)
    inputs.update(overrides)
    return switch_norm(inputs["input"], inputs["weight"], inputs["bias"], inputs["mean_weight"],
                       inputs["var_weight"], inputs["running_mean"], inputs["running_var"], True)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(input=torch.randn(4)), ValueError, "must be \\(N, C, \\*\\)"),
    (dict(input=torch.ones(2, 4, 3, 3, dtype=torch.int64)), TypeError, "float16, bfloat16, float32 or float64"),
    (dict(weight=torch.ones(5)), ValueError, "weight must have 4 elements"),
    (dict(mean_weight=torch.ones(2)), ValueError, "mean_weight must have 3 elements"),
    (dict(var_weight=torch.ones(4)), ValueError, "var_weight must have 3 elements"),
    (dict(mean_weight=torch.ones(1, 3)), ValueError, "mean_weight and var_weight must be 1-D of length 3"),
    (dict(running_mean=torch.zeros(3)), ValueError, "running_mean must have 4 elements"),
    (dict(running_var=None), ValueError, "both running_mean and running_var"),
    (dict(weight=torch.ones(4, device="meta")), RuntimeError, "weight is on meta but input is on cpu"),
])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.slow
def test_torch_compile_smoke():
    inputs = sample_inputs((2, 4, 6, 6), True, True, dtype=torch.float32)
    x = inputs["input"].requires_grad_()

    buffers = {"compiled": (inputs["running_mean"].clone(), inputs["running_var"].clone()),
               "eager": (inputs["running_mean"].clone(), inputs["running_var"].clone())}

    def f(x, running_mean, running_var):
        return switch_norm(x, inputs["weight"], inputs["bias"], inputs["mean_weight"], inputs["var_weight"],
                           running_mean, running_var, True).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    (g1,) = torch.autograd.grad(compiled(x, *buffers["compiled"]), x)
    (g2,) = torch.autograd.grad(f(x, *buffers["eager"]), x)
    torch.testing.assert_close(g1, g2)
    # the running statistics' in-place update survives functionalization
    assert not torch.equal(buffers["eager"][0], inputs["running_mean"])
    torch.testing.assert_close(buffers["compiled"], buffers["eager"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("has_instance,shape", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_cuda_matches_cpu(has_instance, shape, training):
    for using_bn, layout in itertools.product([True, False], ["planar", "channels_last"]):
        inputs = sample_inputs(shape, has_instance, using_bn)
        if layout == "channels_last" and len(shape) == 4:
            inputs["input"] = inputs["input"].contiguous(memory_format=torch.channels_last)
        grads = ("input", "weight", "bias", "mean_weight", "var_weight")
        cpu, ca = run(switch_norm, inputs, training, using_bn, has_instance, grads)
        cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
        gpu, ga = run(switch_norm, cuda_inputs, training, using_bn, has_instance, grads)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
        g = torch.randn_like(cpu)
        for a, b in zip(torch.autograd.grad(gpu, [ga[k] for k in grads], g.cuda()),
                        torch.autograd.grad(cpu, [ca[k] for k in grads], g)):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(ga["running_var"].cpu(), ca["running_var"])



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_more_samples_than_a_grid_dimension():
    # SwitchNorm1d's (N, C) input takes the channels-last reduction, whose grid has one row per sample, capped at
    # 65535 rows: larger batches (tokens of a long sequence) loop over the samples.
    inputs = sample_inputs((70_000, 8), False, True, dtype=torch.float32)
    grads = ("input", "weight", "bias", "mean_weight", "var_weight")
    cpu, ca = run(switch_norm, inputs, True, True, False, grads)
    gpu, ga = run(switch_norm, {k: v.cuda() for k, v in inputs.items()}, True, True, False, grads)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(cpu)
    for a, b in zip(torch.autograd.grad(gpu, [ga[k] for k in grads], g.cuda()),
                    torch.autograd.grad(cpu, [ca[k] for k in grads], g)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 60 * 2 ** 30,
                    reason="needs a CUDA device with 60 GiB")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cuda_more_than_2_31_elements(memory_format):
    # 2 * 64 * 4096 * 4097 > 2^31 elements: the last plane straddles element 2^31, so 32-bit offsets anywhere in the
    # reductions or the affine passes would corrupt it. Instance-only mixture weights (softmax(50, -50) is 1 to
    # float precision) make each plane's output depend on that plane alone, so the float64 reference of the last
    # channel's two planes checks the kernels' values there.
    x = torch.randn(2, 64, 4096, 4097, device="cuda").contiguous(memory_format=memory_format).requires_grad_(True)
    weight = torch.rand(64, device="cuda", requires_grad=True)
    bias = torch.randn(64, device="cuda", requires_grad=True)
    mixture = torch.tensor([50.0, -50.0], device="cuda")
    out = switch_norm(x, weight, bias, mixture, mixture, None, None, True, 0.1, 1e-5, True, False, True)
    grad_out = torch.randn_like(out)
    grad_x, grad_weight, grad_bias = torch.autograd.grad(out, (x, weight, bias), grad_out)
    last = slice(63, 64)
    x_ref = x.detach()[:, last].double().requires_grad_(True)
    w_ref = weight.detach()[last].double().requires_grad_(True)
    b_ref = bias.detach()[last].double().requires_grad_(True)
    ref = switch_norm_reference(x_ref, w_ref, b_ref, mixture.double(), mixture.double(), None, None, True, 0.1, 1e-5,
                                True, False, True)
    ref_grads = torch.autograd.grad(ref, (x_ref, w_ref, b_ref), grad_out[:, last].double())
    torch.testing.assert_close(out.detach()[:, last].double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_x[:, last].double(), ref_grads[0], rtol=1e-4, atol=1e-4)
    # sums over 33.5M float32 terms: about 0.01-0.03 of rounding
    torch.testing.assert_close(grad_weight[last].double(), ref_grads[1], rtol=1e-4, atol=0.2)
    torch.testing.assert_close(grad_bias[last].double(), ref_grads[2], rtol=1e-4, atol=0.2)
    del x, out, grad_out, grad_x
    torch.cuda.empty_cache()
