"""Checkpoint converters: a CSAIL reference model reproduced after conversion, and round trips of the
SN ImageNet, mmseg/CondNet and DeepLab-v2 layouts generated from their documented key schemes."""
import re
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from normkit import build_model
from normkit.convert import convert, convert_csail, convert_deeplab_v2, convert_mmseg, convert_sn_imagenet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_checkpoint  # noqa: E402

K = 6


# ---------------------------------------------------------------------------------------------------------
# A CSAIL-layout reference written from the CSAIL framework's structure (deep-stem ResNet, dilation by
# rewriting strided convs after construction, decoders returning softmax at segSize in inference).

class _CsailBasic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + residual)


class _CsailBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + residual)


def _nostride_dilate(m, dilate):
    if isinstance(m, nn.Conv2d):
        if m.stride == (2, 2):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilate // 2,) * 2, (dilate // 2,) * 2
        elif m.kernel_size == (3, 3):
            m.dilation, m.padding = (dilate,) * 2, (dilate,) * 2


class CsailEncoder(nn.Module):
    def __init__(self, block, layers, dilate_scale=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False), nn.BatchNorm2d(128)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 128
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, 1 if i == 0 else 2))
        if dilate_scale == 8:
            self.layer3.apply(partial(_nostride_dilate, dilate=2))
            self.layer4.apply(partial(_nostride_dilate, dilate=4))

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(F.relu(self.bn3(self.conv3(x))))
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


def _cbr(i, o, k=3):
    return nn.Sequential(nn.Conv2d(i, o, k, 1, k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU())


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class CsailC1DeepSup(nn.Module):
    def __init__(self, fc_dim):
        super().__init__()
        self.cbr, self.cbr_deepsup = _cbr(fc_dim, fc_dim // 4), _cbr(fc_dim // 2, fc_dim // 4)
        self.conv_last, self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, K, 1), nn.Conv2d(fc_dim // 4, K, 1)

    def forward(self, conv_out, seg_size):
        return F.softmax(_up(self.conv_last(self.cbr(conv_out[-1])), seg_size), 1)


class CsailPPMDeepsup(nn.Module):
    def __init__(self, fc_dim):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(fc_dim, 512, 1, bias=False),
                                               nn.BatchNorm2d(512), nn.ReLU()) for s in (1, 2, 3, 6))
        self.cbr_deepsup = _cbr(fc_dim // 2, fc_dim // 4)
        self.conv_last = nn.Sequential(nn.Conv2d(fc_dim + 4 * 512, 512, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(512), nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(512, K, 1))
        self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, K, 1)
        self.dropout_deepsup = nn.Dropout2d(0.1)

    def forward(self, conv_out, seg_size):
        conv5 = conv_out[-1]
        x = torch.cat([conv5] + [_up(p(conv5), conv5.shape[2:]) for p in self.ppm], 1)
        return F.softmax(_up(self.conv_last(x), seg_size), 1)


class CsailUPerNet(nn.Module):
    def __init__(self, fpn_inplanes, fpn_dim):
        super().__init__()
        fc_dim = fpn_inplanes[-1]
        self.ppm_pooling = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in (1, 2, 3, 6))
        self.ppm_conv = nn.ModuleList(_cbr(fc_dim, 512, 1) for _ in range(4))
        self.ppm_last_conv = _cbr(fc_dim + 4 * 512, fpn_dim)
        self.fpn_in = nn.ModuleList(_cbr(c, fpn_dim, 1) for c in fpn_inplanes[:-1])
        self.fpn_out = nn.ModuleList(nn.Sequential(_cbr(fpn_dim, fpn_dim)) for _ in fpn_inplanes[:-1])
        self.conv_last = nn.Sequential(_cbr(len(fpn_inplanes) * fpn_dim, fpn_dim), nn.Conv2d(fpn_dim, K, 1))

    def forward(self, conv_out, seg_size):
        conv5 = conv_out[-1]
        ppm = [conv5] + [c(_up(p(conv5), conv5.shape[2:])) for p, c in zip(self.ppm_pooling, self.ppm_conv)]
        f = self.ppm_last_conv(torch.cat(ppm, 1))
        fpn = [f]
        for i in reversed(range(len(conv_out) - 1)):
            x = self.fpn_in[i](conv_out[i])
            f = x + _up(f, x.shape[2:])
            fpn.append(self.fpn_out[i](f))
        fpn.reverse()
        fused = torch.cat([fpn[0]] + [_up(t, fpn[0].shape[2:]) for t in fpn[1:]], 1)
        return F.softmax(_up(self.conv_last(fused), seg_size), 1)


def _randomize(model):
    """Random norm statistics and affine parameters so eval-mode outputs depend on every tensor."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def _csail_cfg(depth, head, output_stride):
    return {"model": {"name": "encoder_decoder", "num_classes": K,
                      "backbone": {"name": f"resnet{depth}", "stem": "deep", "output_stride": output_stride,
                                   "dilation_rule": "csail", "norm": "bn"},
                      "decode_head": {"name": head}}}


CSAIL_CASES = [
    pytest.param(18, "c1_deepsup", 8, id="r18d8_c1_deepsup"),
    pytest.param(18, "ppm_deepsup", 8, id="r18d8_ppm_deepsup"),
    pytest.param(18, "upernet", 32, id="r18_upernet"),
    pytest.param(50, "c1_deepsup", 8, id="r50d8_c1_deepsup", marks=pytest.mark.slow),
    pytest.param(50, "ppm_deepsup", 8, id="r50d8_ppm_deepsup", marks=pytest.mark.slow),
    pytest.param(50, "upernet", 32, id="r50_upernet", marks=pytest.mark.slow),
    pytest.param(101, "ppm_deepsup", 8, id="r101d8_ppm_deepsup", marks=pytest.mark.slow),
]
_BLOCKS = {18: (_CsailBasic, (2, 2, 2, 2)), 50: (_CsailBottleneck, (3, 4, 6, 3)),
           101: (_CsailBottleneck, (3, 4, 23, 3))}


@pytest.mark.parametrize("depth,head,output_stride", CSAIL_CASES)
def test_csail_pair_reproduces_softmax(tmp_path, depth, head, output_stride):
    block, layers = _BLOCKS[depth]
    encoder = _randomize(CsailEncoder(block, layers, dilate_scale=output_stride if output_stride != 32 else None))
    channels = [c * block.expansion for c in (64, 128, 256, 512)]
    decoder = {"c1_deepsup": lambda: CsailC1DeepSup(channels[-1]), "ppm_deepsup": lambda: CsailPPMDeepsup(channels[-1]),
               "upernet": lambda: CsailUPerNet(channels, 512)}[head]()
    _randomize(decoder)
    enc_state = encoder.state_dict()
    # CSAIL's SyncBN adds bookkeeping buffers the converter must drop
    enc_state["bn1._tmp_running_mean"] = torch.zeros(64)
    enc_state["bn1._running_iter"] = torch.zeros(1)
    torch.save(enc_state, tmp_path / "encoder_epoch_20.pth")
    torch.save(decoder.state_dict(), tmp_path / "decoder_epoch_20.pth")

    out = tmp_path / "converted.pth"
    assert convert_checkpoint.main(["--from", "csail", str(tmp_path / "encoder_epoch_20.pth"),
                                    str(tmp_path / "decoder_epoch_20.pth"), "--out", str(out), "--quiet"]) == 0
    model = build_model(_csail_cfg(depth, head, output_stride), checkpoint=out).eval()
    encoder.eval(), decoder.eval()
    images = torch.randn(2, 3, 80, 72)
    with torch.no_grad():
        expected = decoder(encoder(images), (80, 72))
        got = F.softmax(model(images), 1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_csail_errors_name_the_keys(tmp_path):
    encoder = CsailEncoder(_CsailBasic, (2, 2, 2, 2), dilate_scale=8)
    decoder = CsailC1DeepSup(512)
    torch.save(encoder.state_dict(), tmp_path / "enc.pth")
    state = decoder.state_dict()
    state["attention.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "dec.pth")
    with pytest.raises(RuntimeError, match="csail decoder: 1 unexpected keys.*attention.weight"):
        convert_csail(tmp_path / "enc.pth", tmp_path / "dec.pth")
    with pytest.raises(ValueError, match="encoder checkpoint first"):
        convert_csail(tmp_path / "dec.pth", tmp_path / "enc.pth")
    # a decoder for another head: --config loads the result strictly and names the missing keys
    torch.save(decoder.state_dict(), tmp_path / "dec.pth")
    (tmp_path / "ppm.yaml").write_text(yaml.safe_dump(_csail_cfg(18, "ppm_deepsup", 8)))
    with pytest.raises(RuntimeError, match="missing keys.*decode_head.ppm.0.1.weight.*unexpected keys.*cbr.0"):
        convert_checkpoint.main(["--from", "csail", str(tmp_path / "enc.pth"), str(tmp_path / "dec.pth"),
                                 "--out", str(tmp_path / "o.pth"), "--quiet", "--config", str(tmp_path / "ppm.yaml")])
    assert not (tmp_path / "o.pth").exists()


def test_rename_keys_is_one_to_one_and_matches_whole_keys():
    from normkit.convert.common import rename_keys
    rules = [(r"(?:bn|sn)1\.(\w+)", r"bn1.\1"), (r"conv1\.weight", r"conv1.weight")]
    w = torch.zeros(2)
    renamed = rename_keys({"sn1.weight": w, "conv1.weight": w}, rules, source="t")
    assert set(renamed) == {"bn1.weight", "conv1.weight"}
    with pytest.raises(RuntimeError, match="t: keys 'bn1.weight' and 'sn1.weight' both map to 'bn1.weight'"):
        rename_keys({"bn1.weight": w, "sn1.weight": w}, rules, source="t")
    # a key a rule only starts (weight-norm's conv1.weight_g) is unexpected, not renamed to conv1.weight
    with pytest.raises(RuntimeError, match="t: 1 unexpected keys no rename rule covers: conv1.weight_g"):
        rename_keys({"conv1.weight_g": w}, rules, source="t")


def test_source_container_must_be_a_mapping():
    # {"model": "resnet50", "state_dict": {...}}: a training script's architecture name beside the weights
    from normkit.io import read_tensor_dict
    weights = {"conv1.weight": torch.ones(1)}
    assert read_tensor_dict({"model": "resnet50", "state_dict": weights}) == weights
    both = {"state_dict": weights, "model": {"w": torch.zeros(1)}}
    assert read_tensor_dict(both, ("state_dict", "model")) == weights


# ---------------------------------------------------------------------------------------------------------
# Round trips: a normkit model's state dict renamed into the source layout (from the key scheme in docs/design.md),
# converted back, loaded, outputs equal.

def _randomize_all(model):
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.uniform_(0.5, 1.5)
                elif name.endswith(("mean_weight", "var_weight")):
                    t.normal_(0, 1)
                elif name.endswith("weight") and t.dim() == 1:
                    t.uniform_(0.5, 1.5)
                else:
                    t.normal_(0, 0.1)
    return model


def _rename(state, pairs):
    out = {}
    for key, value in state.items():
        for pattern, repl in pairs:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _assert_same_outputs(a, b, images):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(images), a(images))


def test_sn_imagenet_round_trip(tmp_path):
    cfg = {"model": {"name": "resnet", "num_classes": 10,
                     "backbone": {"name": "resnet18", "stem": "v1", "norm": "sn"}}}
    model = _randomize_all(build_model(cfg))
    # official ResNetV1SN layout: module. prefix, snK norms, (1,C,1,1) weight/bias, (1,C,1) running stats
    official = {}
    for key, value in _rename(model.state_dict(), [(r"(^|\.)bn(\d)\.", r"\1sn\2.")]).items():
        if re.search(r"sn\d\.(weight|bias)$|downsample\.1\.(weight|bias)$", key):
            value = value.reshape(1, -1, 1, 1)
        elif key.endswith(("running_mean", "running_var")):
            value = value.reshape(1, -1, 1)
        official["module." + key] = value
    assert "module.sn1.mean_weight" in official and "module.layer2.0.sn2.var_weight" in official
    torch.save({"state_dict": official, "epoch": 100}, tmp_path / "resnet-18-sn.pth")
    converted = convert_sn_imagenet(tmp_path / "resnet-18-sn.pth")
    loaded = build_model(cfg, checkpoint=converted)
    for name, module in model.named_modules():
        if type(module).__name__ == "SwitchNorm2d":
            twin = loaded.get_submodule(name)
            assert torch.equal(twin.mean_weight, module.mean_weight) and torch.equal(twin.var_weight, module.var_weight)
            assert torch.equal(twin.running_var, module.running_var) and twin.weight.shape == (module.num_features,)
    _assert_same_outputs(model, loaded, torch.randn(2, 3, 64, 64))
    # as a segmentation backbone: backbone.pretrained drops the classifier
    seg = build_model({"model": {"name": "encoder_decoder", "num_classes": 3,
                                 "backbone": {**cfg["model"]["backbone"], "output_stride": 8,
                                              "pretrained": str(_save(converted, tmp_path / "sn.pth"))},
                                 "decode_head": {"name": "c1_deepsup"}}})
    assert torch.equal(seg.backbone.layer3[1].bn2.mean_weight, model.layer3[1].bn2.mean_weight)


def _save(state, path):
    torch.save(state, path)
    return path


def test_mmseg_condnet_round_trip(tmp_path):
    cfg = {"model": {"name": "encoder_decoder", "num_classes": K, "loss_mode": "upsample_logits",
                     "backbone": {"name": "resnet18", "stem": "v1c", "output_stride": 8, "dilation_rule": "mmseg",
                                  "norm": "bn"},
                     "decode_head": {"name": "cond_sep_aspp", "channels": 16, "c1_in_channels": 64, "c1_channels": 8},
                     "auxiliary_head": {"name": "fcn", "channels": 8}}}
    model = _randomize_all(build_model(cfg))
    stem = {"conv1": "stem.0", "bn1": "stem.1", "conv2": "stem.3", "bn2": "stem.4", "conv3": "stem.6", "bn3": "stem.7"}
    pairs = [(rf"^backbone\.{a}\.", f"backbone.{b}.") for a, b in stem.items()]
    pairs.append((r"^decode_head\.classifier\.", "decode_head."))
    official = _rename(model.state_dict(), pairs)
    assert "backbone.stem.7.running_var" in official and "decode_head.guidance_project.conv.weight" in official
    assert "auxiliary_head.convs.0.conv.weight" in official and "auxiliary_head.conv_seg.bias" in official
    torch.save({"meta": {"iter": 160000}, "state_dict": official}, tmp_path / "condnet.pth")
    out = tmp_path / "converted.pth"
    convert_checkpoint.main(["--from", "mmseg", str(tmp_path / "condnet.pth"), "--out", str(out), "--quiet"])
    _assert_same_outputs(model, build_model(cfg, checkpoint=out), torch.randn(2, 3, 48, 48))


def test_deeplab_v2_round_trip(tmp_path):
    cfg = {"model": {"name": "deeplab_v2", "num_classes": K,
                     "backbone": {"name": "resnet18", "stem": "v1", "ceil_mode": True, "output_stride": 8,
                                  "dilation_rule": "deeplab", "norm": "frozenbn"},
                     "decode_head": {"name": "aspp_sum"}}}
    model = _randomize_all(build_model(cfg))
    official = _rename(model.state_dict(), [(r"^backbone\.", "Scale."),
                                            (r"^decode_head\.conv2d_list", "Scale.layer5.conv2d_list")])
    assert "Scale.layer5.conv2d_list.3.bias" in official and not any("num_batches" in k for k in official)
    torch.save(official, tmp_path / "MS_DeepLab_resnet_trained_VOC.pth")
    converted = convert("deeplab-v2", [str(tmp_path / "MS_DeepLab_resnet_trained_VOC.pth")])
    _assert_same_outputs(model, build_model(cfg, checkpoint=converted), torch.randn(1, 3, 41, 41))


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown checkpoint format 'caffe'; choose one of csail, sn-imagenet"):
        convert("caffe", ["x.pth"])
    with pytest.raises(ValueError, match="takes 2 input file"):
        convert("csail", ["x.pth"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert_mmseg(tmp_path / "nope.pth")
    torch.save({"state_dict": {"Scale.layer9.weight": torch.zeros(1)}}, tmp_path / "d.pth")
    with pytest.raises(RuntimeError, match="deeplab-v2: 1 unexpected keys.*Scale.layer9.weight"):
        convert_deeplab_v2(tmp_path / "d.pth")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "net": nn.Linear(1, 1)}, tmp_path / "pickle.pth")
    with pytest.raises(RuntimeError, match="weights_only=True"):
        convert_sn_imagenet(tmp_path / "pickle.pth")
    with pytest.raises(SystemExit):
        convert_checkpoint.main(["--from", "caffe", "a.pth", "--out", "b.pth"])
    assert "invalid choice" in capsys.readouterr().err


def test_converter_output_keeps_the_size_of_what_it_read(tmp_path):
    # a tiny file holding an expanded (stride-0) tensor of 10M elements, and a slice of a 1M-element storage
    source = tmp_path / "hostile.pth"
    fc_bias = torch.arange(1_000_000, dtype=torch.float32)[:10]
    torch.save({"state_dict": {"module.conv1.weight": torch.ones(1).expand(1000, 1000, 10, 1),
                               "module.fc.bias": fc_bias}}, source)
    assert source.stat().st_size > 4_000_000  # the slice drags its whole storage into the source file
    out = tmp_path / "out.pth"
    assert convert_checkpoint.main(["--from", "sn-imagenet", str(source), "--out", str(out), "--quiet"]) == 0
    assert out.stat().st_size < 100_000  # neither the expanded tensor nor the unused storage is written
    state = torch.load(out, weights_only=True)
    weight = state["conv1.weight"]
    assert weight.shape == (1000, 1000, 10, 1) and weight.untyped_storage().nbytes() == 4
    assert bool((weight == 1).all())
    assert torch.equal(state["fc.bias"], torch.arange(10, dtype=torch.float32))


def test_converter_refuses_a_directory_as_output_before_converting(tmp_path, capsys):
    source = tmp_path / "in.pth"
    torch.save({"state_dict": {"module.conv1.weight": torch.ones(1).expand(1000, 1000, 10, 1)}}, source)
    with pytest.raises(SystemExit):
        convert_checkpoint.main(["--from", "sn-imagenet", str(source), "--out", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]  # no temporary file left
