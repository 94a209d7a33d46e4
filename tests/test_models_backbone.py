"""ResNet backbones: strides/channels per stem x output stride, dilation rules, parameter counts, norms."""
import pytest
import torch
from torch import nn

from normkit.models.backbones.resnet import ResNet, stage_dilations, BasicBlock, Bottleneck
from normkit.nn import build_norm

NORMS = ["bn", "syncbn", "frozenbn", "gn", "in", "ln", "sn", "syncsn"]
CHANNELS = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512), 50: (256, 512, 1024, 2048),
            101: (256, 512, 1024, 2048)}
STRIDES = {32: (4, 8, 16, 32), 16: (4, 8, 16, 16), 8: (4, 8, 8, 8)}


# Bottleneck ResNets with the deep stems build the same stages as with v1: slow only.
@pytest.mark.parametrize("depth,stem", [(18, "v1"), (18, "deep"), (18, "v1c"), (50, "v1"),
                                        pytest.param(50, "deep", marks=pytest.mark.slow),
                                        pytest.param(50, "v1c", marks=pytest.mark.slow)])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_strides_and_channels(depth, stem, output_stride):
    _check_strides(ResNet(depth, stem=stem, output_stride=output_stride).eval(), depth, output_stride)


@pytest.mark.parametrize("rule", ["deeplab", "mmseg"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_feature_strides_other_dilation_rules(rule, output_stride):
    _check_strides(ResNet(18, stem="v1c", output_stride=output_stride, dilation_rule=rule).eval(), 18, output_stride)


def _check_strides(model, depth, output_stride):
    assert model.out_channels == CHANNELS[depth]
    assert model.out_strides == STRIDES[output_stride]
    with torch.no_grad():
        features = list(model(torch.randn(1, 3, 64, 64)).values())
    assert [f.shape[1] for f in features] == list(CHANNELS[depth])
    assert [64 // f.shape[-1] for f in features] == list(STRIDES[output_stride])


@pytest.mark.slow
@pytest.mark.parametrize("depth", [34, 101])
def test_feature_shapes_deeper(depth):
    model = ResNet(depth, stem="deep", output_stride=8).eval()
    with torch.no_grad():
        features = list(model(torch.randn(1, 3, 32, 32)).values())
    assert [f.shape[1] for f in features] == list(CHANNELS[depth])


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth,expected", [(50, 25_557_032), (101, 44_549_160)])
def test_parameter_count_matches_torchvision(depth, expected):
    # torchvision's resnet50 / resnet101 (7x7 stem, BN, 1000-way fc) have exactly these counts.
    assert _count(ResNet(depth, stem="v1", norm="bn", num_classes=1000)) == expected


def test_torchvision_key_layout():
    keys = set(ResNet(50, num_classes=1000).state_dict())
    for key in ["conv1.weight", "bn1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn3.bias",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer4.2.conv3.weight",
                "fc.weight", "fc.bias"]:
        assert key in keys
    deep = set(ResNet(18, stem="deep").state_dict())
    assert {"conv1.weight", "bn1.weight", "conv2.weight", "bn2.weight", "conv3.weight", "bn3.weight"} <= deep
    # CSAIL's deep stem ends with 128 channels, so ResNet-18's layer1 has a projection shortcut
    assert "layer1.0.downsample.0.weight" in deep
    assert "fc.weight" not in deep


def _dilations(model, layer):
    return [(blk.conv1.dilation[0], blk.conv2.dilation[0]) if isinstance(blk, BasicBlock)
            else (blk.conv2.dilation[0],) for blk in getattr(model, f"layer{layer}")]


def test_csail_nostride_dilate_rule():
    # CSAIL _nostride_dilate: strided 3x3 -> dilate//2, other 3x3 -> dilate (layer3: 2, layer4: 4)
    r50 = ResNet(50, stem="deep", output_stride=8, dilation_rule="csail")
    assert _dilations(r50, 3) == [(1,)] + [(2,)] * 5
    assert _dilations(r50, 4) == [(2,), (4,), (4,)]
    assert r50.layer3[0].conv2.stride == (1, 1) and r50.layer3[0].downsample[0].stride == (1, 1)
    r18 = ResNet(18, stem="deep", output_stride=8, dilation_rule="csail")
    assert _dilations(r18, 3) == [(1, 2), (2, 2)]
    assert _dilations(r18, 4) == [(2, 4), (4, 4)]
    r50_16 = ResNet(50, output_stride=16, dilation_rule="csail")
    assert _dilations(r50_16, 3) == [(1,)] * 6 and _dilations(r50_16, 4) == [(1,), (2,), (2,)]
    # padding keeps the spatial size
    for m in r50.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            assert m.padding == m.dilation


def test_deeplab_and_mmseg_rules():
    deeplab = ResNet(50, output_stride=8, dilation_rule="deeplab", stride_in_1x1=True)
    assert _dilations(deeplab, 3) == [(2,)] * 6 and _dilations(deeplab, 4) == [(4,)] * 3
    assert deeplab.layer2[0].conv1.stride == (2, 2) and deeplab.layer2[0].conv2.stride == (1, 1)
    mmseg = ResNet(50, stem="v1c", output_stride=8, dilation_rule="mmseg")
    assert _dilations(mmseg, 3) == [(1,)] + [(2,)] * 5  # contract_dilation
    assert _dilations(mmseg, 4) == [(2,), (4,), (4,)]
    mmseg18 = ResNet(18, stem="v1c", output_stride=8, dilation_rule="mmseg")
    assert _dilations(mmseg18, 4) == [(2, 1), (4, 1)]  # mmseg's BasicBlock never dilates conv2
    assert stage_dilations("csail", Bottleneck, 3, 4, 2, stride_in_1x1=True) == [(4, 4)] * 3


def test_ceil_mode_stem():
    # DeepLab v2: 321 -> conv 161 -> ceil max-pool 81 (floor would give 80)
    model = ResNet(50, output_stride=8, ceil_mode=True, dilation_rule="deeplab").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 321, 321))["res2"].shape[-1] == 81


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_builds_and_backpropagates(norm):
    model = ResNet(18, stem="deep", output_stride=8, norm=norm)
    assert isinstance(model.bn1, type(build_norm(norm, 64)))
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    sum(f.mean() for f in model(x).values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_sn_kwargs_and_last_gamma():
    model = ResNet(18, norm="sn", norm_kwargs={"using_bn": False}, last_gamma=True)
    assert model.layer1[0].bn1.mean_weight.numel() == 2  # [IN, LN] without the BN branch
    assert torch.all(model.layer1[0].bn2.weight == 0) and torch.all(model.layer1[0].bn1.weight == 1)
    r50 = ResNet(50, norm="sn", last_gamma=True)
    assert torch.all(r50.layer2[1].bn3.weight == 0) and torch.all(r50.layer2[1].bn2.weight == 1)
    with pytest.raises(ValueError, match="last_gamma"):
        ResNet(18, norm="sn", norm_kwargs={"last_gamma": True})


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="sb.*bn, syncbn"):
        ResNet(18, norm="sb")
    with pytest.raises(ValueError, match="stem.*v1, deep, v1c"):
        ResNet(18, stem="v2")
    with pytest.raises(ValueError, match="output_stride"):
        ResNet(18, output_stride=4)
    with pytest.raises(ValueError, match="depth"):
        ResNet(152)
    with pytest.raises(ValueError, match=r"Tensor\[N, 3, H, W\]"):
        ResNet(18)(torch.randn(1, 1, 32, 32))
