"""SwitchNorm modules against a transcription of the official layers, state-dict compatibility, norm factory."""
import pytest
import torch
from torch import nn

from normkit.nn import (FrozenBatchNorm2d, NORM_NAMES, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm,
                        build_norm, convert_sync_switchnorm, recompute_batch_stats)


class OfficialSwitchNorm2d(nn.Module):
    """The official SwitchNorm2d forward, transcribed op for op (official momentum convention m = 0.997)."""

    def __init__(self, c, eps=1e-5, momentum=0.997, using_moving_average=True, using_bn=True):
        super().__init__()
        self.eps, self.momentum, self.using_moving_average, self.using_bn = (eps, momentum, using_moving_average,
                                                                             using_bn)
        self.weight = nn.Parameter(torch.ones(1, c, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        k = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(k))
        self.var_weight = nn.Parameter(torch.ones(k))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(1, c, 1))
            self.register_buffer("running_var", torch.zeros(1, c, 1))

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in ** 2
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
                if self.using_moving_average:
                    self.running_mean.mul_(self.momentum)
                    self.running_mean.add_((1 - self.momentum) * mean_bn.data)
                    self.running_var.mul_(self.momentum)
                    self.running_var.add_((1 - self.momentum) * var_bn.data)
                else:
                    self.running_mean.add_(mean_bn.data)
                    self.running_var.add_(mean_bn.data ** 2 + var_bn.data)
            else:
                mean_bn = self.running_mean
                var_bn = self.running_var
        softmax = nn.Softmax(0)
        mean_weight = softmax(self.mean_weight)
        var_weight = softmax(self.var_weight)
        if self.using_bn:
            mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln + mean_weight[2] * mean_bn
            var = var_weight[0] * var_in + var_weight[1] * var_ln + var_weight[2] * var_bn
        else:
            mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln
            var = var_weight[0] * var_in + var_weight[1] * var_ln
        x = (x - mean) / (var + self.eps).sqrt()
        x = x.view(n, c, h, w)
        return x * self.weight + self.bias


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("using_bn", [True, False])
@pytest.mark.parametrize("using_moving_average", [True, False])
def test_switchnorm2d_equals_official_over_training_and_eval(using_bn, using_moving_average):
    torch.manual_seed(0)
    official = OfficialSwitchNorm2d(6, using_bn=using_bn, using_moving_average=using_moving_average).double()
    _randomize(official)
    ours = SwitchNorm2d(6, momentum=1 - 0.997, using_bn=using_bn, using_moving_average=using_moving_average).double()
    ours.load_state_dict(official.state_dict())  # official (1, C, 1, 1) / (1, C, 1) shapes load
    for step in range(3):
        x = torch.randn(4, 6, 5, 7, dtype=torch.float64) * (step + 1) + step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_off, y_ours = official(x1), ours(x2)
        torch.testing.assert_close(y_ours, y_off)
        g = torch.randn_like(x)
        y_off.backward(g)
        y_ours.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad)
        for name, p in official.named_parameters():
            torch.testing.assert_close(dict(ours.named_parameters())[name].grad, p.grad.reshape(-1))
        if using_bn:
            torch.testing.assert_close(ours.running_mean, official.running_mean.reshape(-1))
            torch.testing.assert_close(ours.running_var, official.running_var.reshape(-1))
    if using_bn and not using_moving_average:
        return  # official eval of batch-average buffers needs recompute_batch_stats first
    official.eval()
    ours.eval()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(x), official(x))


def test_switchnorm1d_formulas():
    torch.manual_seed(0)
    m = SwitchNorm1d(5, momentum=0.5).double()
    _randomize(m)
    x = torch.randn(7, 5, dtype=torch.float64)
    y = m(x)
    # Official SwitchNorm1d: LN = unbiased over C per sample, BN = unbiased over N per channel.
    mw, vw = m.mean_weight.softmax(0), m.var_weight.softmax(0)
    mean = mw[0] * x.mean(1, keepdim=True) + mw[1] * x.mean(0, keepdim=True)
    var = vw[0] * x.var(1, keepdim=True) + vw[1] * x.var(0, keepdim=True)
    expected = (x - mean) / (var + 1e-5).sqrt() * m.weight + m.bias
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(m.running_var, 0.5 * x.var(0))
    # (N, C, L): LN over (C, L), BN over (N, L), as BatchNorm1d treats L.
    x3 = torch.randn(4, 5, 6, dtype=torch.float64)
    m.eval()
    m.train()
    y3 = m(x3)
    mean = mw[0] * x3.mean((1, 2), keepdim=True) + mw[1] * x3.mean((0, 2), keepdim=True)
    var = (vw[0] * x3.reshape(4, -1).var(1).view(4, 1, 1)
           + vw[1] * x3.transpose(0, 1).reshape(5, -1).var(1).view(1, 5, 1))
    expected = (x3 - mean) / (var + 1e-5).sqrt() * m.weight.view(1, 5, 1) + m.bias.view(1, 5, 1)
    torch.testing.assert_close(y3, expected)


def test_switchnorm3d_matches_2d_on_flattened_input():
    torch.manual_seed(0)
    m3, m2 = SwitchNorm3d(4).double(), SwitchNorm2d(4).double()
    _randomize(m3)
    m2.load_state_dict(m3.state_dict())
    x = torch.randn(3, 4, 2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(m3(x), m2(x.reshape(3, 4, 6, 5)).reshape(x.shape))


@pytest.mark.parametrize("using_moving_average", [True, False])
def test_reference_implementation_runs_the_pure_pytorch_formulation(using_moving_average):
    # implementation = "reference" (benchmarks, debugging) must run switch_norm_reference, which computes the same
    # outputs and running statistics as the kernels, and is an ordinary autograd graph (second derivatives work,
    # where the fused op refuses them).
    torch.manual_seed(0)
    fused = SwitchNorm2d(5, momentum=0.2, using_moving_average=using_moving_average).double()
    _randomize(fused)
    reference = SwitchNorm2d(5, momentum=0.2, using_moving_average=using_moving_average).double()
    reference.load_state_dict(fused.state_dict())
    reference.implementation = "reference"
    for step in range(2):
        x = torch.randn(3, 5, 4, 6, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(reference(x), fused(x))
        torch.testing.assert_close(reference.running_mean, fused.running_mean)
        torch.testing.assert_close(reference.running_var, fused.running_var)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(reference(x).square().sum(), x, create_graph=True)
    grad.sum().backward()
    with pytest.raises(RuntimeError, match="double backward"):
        (grad,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
        grad.sum().backward()


def test_official_switchnorm1d_state_dict_loads():
    # Official SwitchNorm1d stores weight, bias, running_mean and running_var as (1, C).
    torch.manual_seed(0)
    src = SwitchNorm1d(4)
    _randomize(src)
    src.running_mean.uniform_()
    src.running_var.uniform_(0.5, 1.5)
    official = {k: (v.reshape(1, 4) if v.numel() == 4 else v) for k, v in src.state_dict().items()}
    assert official["weight"].shape == (1, 4) and official["mean_weight"].shape == (2,)
    dst = SwitchNorm1d(4)
    dst.load_state_dict(official)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_last_gamma_and_initial_state():
    m = SwitchNorm2d(8, last_gamma=True)
    assert torch.equal(m.weight, torch.zeros(8)) and torch.equal(m.mean_weight, torch.ones(3))
    assert torch.equal(m.running_var, torch.zeros(8))
    assert list(SwitchNorm2d(8, using_bn=False).state_dict()) == ["weight", "bias", "mean_weight", "var_weight"]
    assert list(m.state_dict()) == ["weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var"]
    assert m.momentum == 0.003


def test_state_dict_round_trip_and_official_layout_with_prefix():
    src = SwitchNorm2d(6)
    _randomize(src)
    src.running_mean.uniform_()
    dst = SwitchNorm2d(6)
    dst.load_state_dict(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    # Official checkpoint: (1,C,1,1) weight/bias, (1,C,1) running stats, under a DataParallel 'module.' prefix.
    official = {f"module.sn.{k}": (v.reshape(1, 6, 1, 1) if k in ("weight", "bias") else
                                   v.reshape(1, 6, 1) if k.startswith("running") else v)
                for k, v in src.state_dict().items()}
    stripped = {k[len("module.sn."):]: v for k, v in official.items()}
    fresh = SwitchNorm2d(6)
    fresh.load_state_dict(stripped)
    for k, v in src.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_module_bad_input():
    m = SwitchNorm2d(4)
    with pytest.raises(ValueError, match="expects 4D input"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="got input with 3 channels"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="expects 2D or 3D"):
        SwitchNorm1d(4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on meta"):
        m(torch.randn(2, 4, 3, 3, device="meta"))


def test_empty_batch_gives_every_parameter_a_zero_gradient_like_batchnorm():
    # DDP expects a gradient for each parameter on every rank, one with an empty batch included
    sn, bn = SwitchNorm2d(4), nn.BatchNorm2d(4)
    for m in (sn, bn):
        m(torch.randn(0, 4, 5, 5, requires_grad=True)).sum().backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in sn.parameters())
    assert torch.equal(sn.weight.grad, bn.weight.grad)


def test_numpy_scalars_configure_a_module():
    import numpy as np
    sn = SwitchNorm2d(np.int64(4), momentum=np.float32(0.25))
    assert sn.num_features == 4 and type(sn.num_features) is int and sn.momentum == 0.25
    with pytest.raises(ValueError, match="momentum must be a number"):
        SwitchNorm2d(4, momentum=None)


def test_recompute_batch_stats_gives_total_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SwitchNorm2d(4, using_moving_average=False), nn.BatchNorm2d(4))
    batches = [torch.randn(5, 3, 6, 6) * (i + 1) for i in range(4)]
    model.eval()
    used = recompute_batch_stats(model, iter(batches), num_batches=3)
    assert used == 3 and not model.training
    with torch.no_grad():
        feats = [model[0](b) for b in batches[:3]]
    # SN: mean of the batch BN means and the total variance over batches (law of total variance).
    x = torch.stack([f.reshape(5, 4, -1) for f in feats])  # (B, N, C, L)
    mean_in, var_in = x.mean(-1), x.var(-1)
    bn_mean = mean_in.mean(1)  # (B, C)
    bn_var = (var_in + mean_in ** 2).mean(1) - bn_mean ** 2
    torch.testing.assert_close(model[1].running_mean, bn_mean.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, (bn_var + bn_mean ** 2).mean(0) - bn_mean.mean(0) ** 2,
                               rtol=1e-4, atol=1e-5)
    assert model[1].using_moving_average is False and model[2].momentum == 0.1
    with pytest.raises(ValueError, match="yielded no batch"):
        recompute_batch_stats(model, iter([]), 2)


def test_recompute_batch_stats_covers_every_switchnorm_and_feeds_batches_without_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), SwitchNorm1d(4, using_moving_average=False))
    batches = [torch.randn(6, 3) * (i + 1) for i in range(3)]
    grad_enabled = []

    def forward(m, batch):
        grad_enabled.append(torch.is_grad_enabled())
        return m(batch)

    assert recompute_batch_stats(model, iter(batches), 3, forward) == 3
    assert grad_enabled == [False, False, False]  # no autograd graph kept per batch
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    # SwitchNorm1d's BN statistics are the unbiased per-channel ones over N; law of total variance over batches
    means = torch.stack([f.mean(0) for f in feats])
    second = torch.stack([f.var(0) + f.mean(0) ** 2 for f in feats])
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    torch.testing.assert_close(model[1].running_var, second.mean(0) - means.mean(0) ** 2)


def _stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_recompute_batch_stats_keeps_the_previous_statistics_when_it_fails():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SwitchNorm2d(4), nn.BatchNorm2d(4))
    model.train()
    for _ in range(3):  # statistics worth keeping
        model(torch.randn(4, 3, 5, 5) + 2)
    before = _stats(model)
    assert before["1.running_mean"].abs().sum() > 0 and int(before["2.num_batches_tracked"]) == 3

    def failing_second_batch():
        yield torch.randn(4, 3, 5, 5)
        raise OSError("corrupt image")

    with pytest.raises(OSError, match="corrupt image"):
        recompute_batch_stats(model, failing_second_batch(), 5)
    with pytest.raises(ValueError, match="yielded no batch"):
        recompute_batch_stats(model, iter([]), 5)
    after = _stats(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_frozen_batchnorm_matches_eval_batchnorm():
    bn = nn.BatchNorm2d(5)
    _randomize(bn)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    fresh = FrozenBatchNorm2d(5)  # detectron2's default: the identity (running_var = 1 - eps)
    x = torch.randn(2, 5, 4, 4)
    assert torch.equal(fresh(x), x)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked ignored
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    converted = FrozenBatchNorm2d.convert_frozen_batchnorm(nn.Sequential(bn))
    assert isinstance(converted[0], FrozenBatchNorm2d) and not list(converted.parameters())
    # the conversion keeps the source's dtype (and device): a float64 model stays exact
    bn64 = nn.BatchNorm2d(5).double()
    _randomize(bn64)
    bn64.running_var.uniform_(0.5, 2)
    frozen64 = FrozenBatchNorm2d.convert_frozen_batchnorm(nn.Sequential(bn64))[0]
    assert all(buffer.dtype == torch.float64 for buffer in frozen64.buffers())
    x64 = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(frozen64(x64), bn64.eval()(x64), rtol=1e-13, atol=1e-13)
    # and its eps (Caffe2-era BatchNorms use 1e-3, which matters for small running variances)
    bn_eps = nn.BatchNorm2d(5, eps=1e-3)
    bn_eps.running_var.uniform_(1e-3, 1e-2)
    frozen_eps = FrozenBatchNorm2d.convert_frozen_batchnorm(nn.Sequential(bn_eps))[0]
    assert frozen_eps.eps == 1e-3
    torch.testing.assert_close(frozen_eps(x), bn_eps.eval()(x))


@pytest.mark.parametrize("name", NORM_NAMES)
def test_build_norm_every_name_builds_and_backpropagates(name):
    norm = build_norm(name, 32, **({"last_gamma": True} if name in ("sn", "syncsn", "bn") else {}))
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    if name == "syncbn":
        assert isinstance(norm, nn.SyncBatchNorm)  # SyncBatchNorm has no CPU forward
        return
    norm(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_build_norm_errors_and_identity():
    assert isinstance(build_norm(None, 4), nn.Identity) and isinstance(build_norm("", 4), nn.Identity)
    with pytest.raises(ValueError, match="unknown norm 'sb'; choose one of bn, syncbn"):
        build_norm("sb", 4)
    with pytest.raises(ValueError, match="not divisible by num_groups 32"):
        build_norm("gn", 48)
    assert build_norm(lambda c: nn.GroupNorm(2, c), 4).num_groups == 2


def test_convert_sync_switchnorm_shares_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SwitchNorm2d(4, using_bn=True, last_gamma=True), SwitchNorm1d(4))
    weight = model[1].weight
    converted = convert_sync_switchnorm(model)
    assert isinstance(converted[1], SyncSwitchNorm) and converted[1].weight is weight
    assert isinstance(converted[2], SwitchNorm1d)  # 1d layers stay local
    x = torch.randn(2, 3, 5, 5)
    local = SwitchNorm2d(4, last_gamma=True)
    local.load_state_dict(converted[1].state_dict())
    feats = converted[0](x)
    torch.testing.assert_close(converted[1](feats), local(feats))  # no process group: plain SN
