import pytest
import torch
from torch import nn

from normkit.engine import build_optimizer, build_param_groups
from normkit.nn import SwitchNorm2d, SyncSwitchNorm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), SwitchNorm2d(4), nn.Conv2d(4, 4, 1),
                                      nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
        self.decode_head = nn.Sequential(nn.Conv2d(4, 4, 3), nn.LayerNorm(4))
        self.decode_head_extra = nn.Linear(4, 2)  # shares a prefix string but not a dotted prefix
        self.decode_head_extra.weight.requires_grad_(False)


def _by_name(groups):
    return {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["param_names"]}


def test_norm_and_bias_parameters_skip_weight_decay_and_heads_get_their_lr():
    model = Net()
    groups = build_param_groups(model, base_lr=0.01, weight_decay=1e-4, lr_mult={"decode_head": 10.0})
    assert _by_name(groups) == {
        "backbone.0.weight": (0.01, 1e-4),
        # SN: affine weight/bias and the mixture logits mean_weight/var_weight are all norm parameters
        "backbone.1.weight": (0.01, 0.0), "backbone.1.bias": (0.01, 0.0),
        "backbone.1.mean_weight": (0.01, 0.0), "backbone.1.var_weight": (0.01, 0.0),
        "backbone.2.weight": (0.01, 1e-4), "backbone.2.bias": (0.01, 0.0),
        "backbone.3.weight": (0.01, 0.0), "backbone.3.bias": (0.01, 0.0),
        "backbone.4.weight": (0.01, 0.0), "backbone.4.bias": (0.01, 0.0),
        "decode_head.0.weight": (0.1, 1e-4), "decode_head.0.bias": (0.1, 0.0),
        "decode_head.1.weight": (0.1, 0.0), "decode_head.1.bias": (0.1, 0.0),
        "decode_head_extra.bias": (0.01, 0.0),  # frozen weight left out
    }
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == sum(p.requires_grad for p in model.parameters())


def test_longest_prefix_wins_and_norm_decay_is_configurable():
    groups = build_param_groups(Net(), 1.0, 0.1, lr_mult={"decode_head": 10.0, "decode_head.1": 2.0},
                                norm_weight_decay=0.05, bias_weight_decay=0.01)
    lrs = _by_name(groups)
    assert lrs["decode_head.0.weight"] == (10.0, 0.1)
    assert lrs["decode_head.1.weight"] == (2.0, 0.05)
    assert lrs["backbone.2.bias"] == (1.0, 0.01)


def test_sync_switchnorm_parameters_are_norm_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SyncSwitchNorm(4))
    assert _by_name(build_param_groups(model, 1.0, 0.1))["1.mean_weight"] == (1.0, 0.0)


def test_build_optimizer_applies_weight_decay_per_group():
    model = Net()
    optimizer = build_optimizer(model, {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.5,
                                        "lr_mult": {"decode_head": 10}})
    conv = model.backbone[0].weight
    norm_weight = model.backbone[1].weight
    before_conv, before_norm = conv.detach().clone(), norm_weight.detach().clone()
    optimizer.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradient: only weight decay moves a parameter
    torch.testing.assert_close(conv.detach(), before_conv * (1 - 0.1 * 0.5))
    torch.testing.assert_close(norm_weight.detach(), before_norm)
    assert isinstance(build_optimizer(model, {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99]}), torch.optim.AdamW)


def test_bad_optimizer_configs_are_reported():
    with pytest.raises(ValueError, match=r"lr_mult prefixes \['head'\] match no parameter"):
        build_param_groups(Net(), 0.1, 0.0, lr_mult={"head": 10})
    with pytest.raises(ValueError, match="unknown train.optimizer.name 'rmsprop'"):
        build_optimizer(Net(), {"name": "rmsprop", "lr": 0.1})
    with pytest.raises(ValueError, match=r"train.optimizer.momentun \(did you mean train.optimizer.momentum\?\)"):
        build_optimizer(Net(), {"name": "sgd", "lr": 0.1, "momentun": 0.9})
    with pytest.raises(ValueError, match="train.optimizer.lr is required"):
        build_optimizer(Net(), {"name": "sgd"})
    with pytest.raises(ValueError, match="reference_batch needs the total batch"):
        build_optimizer(Net(), {"name": "sgd", "lr": 0.02, "reference_batch": 16})


class TinyHead(nn.Module):
    """A conv with bias, an SN layer, a bias-free conv and a linear layer (weight and bias)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = SwitchNorm2d(4)
        self.proj = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4, 2)


def test_bias_lr_mult_doubles_the_lr_of_every_bias_norm_biases_included():
    # Detectron's BIAS_DOUBLE_LR takes every parameter named *bias*, SN's too; the norm weights stay at 1x
    groups = build_param_groups(TinyHead(), 0.02, 1e-4, bias_lr_mult=2.0, lr_mult={"fc": 10.0},
                                norm_weight_decay=1e-5, bias_weight_decay=0.0)
    assert _by_name(groups) == {
        "conv.weight": (0.02, 1e-4), "conv.bias": (0.04, 0.0),
        "norm.weight": (0.02, 1e-5), "norm.bias": (0.04, 0.0),
        "norm.mean_weight": (0.02, 1e-5), "norm.var_weight": (0.02, 1e-5),
        "proj.weight": (0.02, 1e-4),
        "fc.weight": (0.2, 1e-4), "fc.bias": (0.4, 0.0),  # prefix and bias multipliers compose
    }


def test_build_optimizer_reads_bias_lr_mult():
    optimizer = build_optimizer(TinyHead(), {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4,
                                             "bias_lr_mult": 2.0, "bias_weight_decay": 0.0})
    rates = sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups)
    # norm weights (weight, mean_weight, var_weight), weights (conv, proj, fc), biases (conv, norm, fc)
    assert rates == [(0.02, 0.0, 3), (0.02, 1e-4, 3), (0.04, 0.0, 3)]


def test_build_optimizer_passes_momentum_nesterov_and_adam_settings_to_torch():
    # constant gradient g = 1, lr 0.1, no weight decay. Heavy ball: buffer 1, then 1.9; steps 0.1 and 0.19.
    # Nesterov: the step uses g + momentum * buffer: 1.9, then 1 + 0.9 * 1.9 = 2.71.
    for nesterov, (first, second) in ((False, (0.1, 0.19)), (True, (0.19, 0.271))):
        model = nn.Linear(2, 1, bias=False)
        before = model.weight.detach().clone()
        optimizer = build_optimizer(model, {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": nesterov})
        moved = []
        for _ in range(2):
            model.weight.grad = torch.ones_like(model.weight)
            optimizer.step()
            moved.append(before - model.weight.detach())
            before = model.weight.detach().clone()
        torch.testing.assert_close(moved[0], torch.full_like(before, first))
        torch.testing.assert_close(moved[1], torch.full_like(before, second))
    adamw = build_optimizer(Net(), {"name": "adamw", "lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-6})
    assert {(g["betas"], g["eps"]) for g in adamw.param_groups} == {((0.8, 0.95), 1e-6)}
