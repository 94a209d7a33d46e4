"""SN-Detectron's released ImageNet initialisations (resnet-sn-50-(8,32), resnet-sn-50-(8,2)-fpn,
resnet-sn-50-(8,1)-fpn, in the Detectron.pytorch layout of its tools/convert.py) convert with
sn-imagenet-to-c4/fpn and fill the detector tensor by tensor; ``normkit-convert --config`` checks
backbone-initialisation formats with the model builder's backbone loader."""
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from normkit.convert import BACKBONE_FORMATS, CONVERTERS, convert, save_state_dict
from normkit.models import build_model, read_config
from normkit.models.backbones import ResNet
from normkit.tools.convert import main as convert_main

ROOT = Path(__file__).resolve().parents[1]
DETECTION = ROOT / "configs" / "detection"
C4, FPN_82 = "e2e_faster_rcnn_R-50-C4_2x_sn", "e2e_faster_rcnn_R-50-FPN_2x_sn"
FPN_81 = "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1"
# Key counts of the released files (DETECTION.md section 3): with the BN branch 373, (8,1) without it 267.
RELEASED_KEYS = {True: 373, False: 267}


def random_like(net: torch.nn.Module, seed: int):
    """``net``'s state dict with every floating tensor replaced by distinct random values, so that a tensor that
    lands in the wrong parameter is noticed."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in net.state_dict().items()}


def official_sn_imagenet(using_bn: bool, seed: int = 0):
    """An official SN ImageNet ResNetV1SN-50 state dict: ``module.`` prefix, ``snK`` norms, SN weight/bias
    shaped (1, C, 1, 1) and running statistics (1, C, 1), ``fc`` classifier."""
    net = ResNet(50, norm="sn", norm_kwargs={"using_bn": using_bn}, num_classes=1000)
    state = {}
    for key, value in random_like(net, seed).items():
        module, _, leaf = key.rpartition(".")
        if "downsample" not in module:
            module = re.sub(r"(^|\.)bn(\d)$", r"\1sn\2", module)
        if leaf in ("weight", "bias") and value.dim() == 1 and module != "fc":
            value = value.reshape(1, -1, 1, 1)
        elif leaf in ("running_mean", "running_var"):
            value = value.reshape(1, -1, 1)
        state[f"module.{module}.{leaf}"] = value
    return state


def detectron_layout(official, fpn: bool):
    """SN-Detectron's tools/convert.py as DETECTION.md section 3 states its rules: ``conv1``/``sn1`` ->
    ``P + 'res1.'``, ``fc`` -> ``P + 'classifier.'``, ``layerK`` -> ``P + 'res{K+1}'``; written as
    ``{'model': ...}``."""
    prefix = "Conv_Body.conv_body." if fpn else "Conv_Body."
    out = {}
    for key, value in official.items():
        name = key[len("module."):]
        if name.startswith(("conv1.", "sn1.")):
            out[prefix + "res1." + name] = value
        elif name.startswith("fc."):
            out[prefix + "classifier." + name[len("fc."):]] = value
        else:
            stage, rest = re.fullmatch(r"layer(\d)(\..+)", name).groups()
            out[f"{prefix}res{int(stage) + 1}{rest}"] = value
    return {"model": out}


def expected_target(key: str, layout: str) -> str:
    """Where a released key must land in the detector, written out independently of the converter."""
    name = re.sub(r"^Conv_Body\.(conv_body\.)?", "", key)
    name = re.sub(r"(^|\.)sn(\d)\.", r"\1bn\2.", name)
    stage, rest = re.fullmatch(r"res(\d)\.(.+)", name).groups()
    if stage == "1":
        return "backbone." + rest
    if stage == "5" and layout == "c4":
        return "roi_heads.box_head.res5." + rest
    return f"backbone.layer{int(stage) - 1}.{rest}"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The three released files, synthesised: {(fpn prefix, using_bn): (path, state)}."""
    folder = tmp_path_factory.mktemp("released")
    files = {}
    for fpn, using_bn in ((False, True), (True, True), (True, False)):
        ckpt = detectron_layout(official_sn_imagenet(using_bn), fpn)
        path = folder / f"resnet-sn-50-{'fpn' if fpn else 'c4'}-{using_bn}.pth"
        torch.save(ckpt, path)
        files[fpn, using_bn] = path, ckpt["model"]
    return files


def test_synthetic_files_have_the_released_layout(released):
    for (fpn, using_bn), (_, state) in released.items():
        assert len(state) == RELEASED_KEYS[using_bn]
        prefix = "Conv_Body.conv_body." if fpn else "Conv_Body."
        assert all(k.startswith(prefix) for k in state)
        assert {f"{prefix}res1.conv1.weight", f"{prefix}res1.sn1.mean_weight", f"{prefix}classifier.weight",
                f"{prefix}classifier.bias", f"{prefix}res2.0.downsample.1.var_weight",
                f"{prefix}res5.2.sn3.weight"} <= set(state)
        assert state[f"{prefix}res2.0.sn1.weight"].shape == (1, 64, 1, 1)


def _init_model(config: str, converted, tmp_path):
    """The detector of ``config`` initialised by the builder from ``converted`` (``model.backbone.pretrained``)."""
    path = tmp_path / "init.pth"
    save_state_dict(converted, path)
    cfg = read_config(DETECTION / f"{config}.yaml")
    cfg["model"]["backbone"]["pretrained"] = str(path)
    return build_model(cfg)


@pytest.mark.parametrize("fpn,using_bn,fmt,layout,config", [
    (False, True, "sn-imagenet-to-c4", "c4", C4),           # resnet-sn-50-(8,32) for the C4 model
    (True, True, "sn-imagenet-to-fpn", "fpn", FPN_82),      # resnet-sn-50-(8,2)-fpn
    (True, False, "sn-imagenet-to-fpn", "fpn", FPN_81),     # resnet-sn-50-(8,1)-fpn
    (True, True, "sn-imagenet-to-c4", "c4", C4),            # the prefix only says which flag convert.py had
])
def test_released_init_fills_the_detector_key_by_key(released, tmp_path, caplog, fpn, using_bn, fmt, layout, config):
    path, source = released[fpn, using_bn]
    with caplog.at_level(logging.INFO, logger="normkit.convert"):
        converted = convert(fmt, [str(path)])
    classifier = [k for k in source if ".classifier." in k]
    assert len(classifier) == 2 and len(converted) == len(source) - 2
    dropped = [r.getMessage() for r in caplog.records if "dropped ImageNet classifier" in r.getMessage()]
    assert len(dropped) == 2 and all(any(k in m for m in dropped) for k in classifier)

    model = _init_model(config, converted, tmp_path)
    own = model.state_dict()
    for key, value in source.items():
        if key in classifier:
            continue
        target = expected_target(key, layout)
        assert torch.equal(converted[target], value.reshape(converted[target].shape)), key
        assert torch.equal(own[target], value.reshape(own[target].shape)), f"{key} -> {target}"
    # the detector's backbone (and C4 res5 head) tensors all come from the file, and nothing else does
    assert set(converted) == {k for k in own if k.startswith(("backbone.", "roi_heads.box_head.res5."))}
    prefix = "Conv_Body.conv_body." if fpn else "Conv_Body."
    assert torch.equal(model.backbone.layer1[0].conv1.weight, source[prefix + "res2.0.conv1.weight"])
    res5 = model.roi_heads.box_head.res5 if layout == "c4" else model.backbone.layer4
    assert torch.equal(res5[2].bn3.mean_weight, source[prefix + "res5.2.sn3.mean_weight"])
    if layout == "c4":
        assert not any(k.startswith("backbone.layer4.") for k in converted)


def test_keys_of_neither_layout_are_refused(released, tmp_path):
    _, state = released[False, True]
    for extra, match in (("Conv_Body.res6.0.conv1.weight", "unexpected keys.*Conv_Body.res6.0.conv1.weight"),
                         ("module.layer1.0.conv1.weight", "unexpected keys.*module.layer1.0.conv1.weight"),
                         ("Conv_Body.conv_body.res1.conv1.weight", "unexpected keys.*Conv_Body.res1.conv1.weight")):
        path = tmp_path / "bad.pth"
        torch.save({"model": {**state, extra: torch.zeros(1)}}, path)
        with pytest.raises(RuntimeError, match=match):
            convert("sn-imagenet-to-c4", [str(path)])


def test_wrong_format_names_the_right_one(released, tmp_path):
    path, state = released[True, False]
    with pytest.raises(ValueError, match="ImageNet initialisation.*--from sn-imagenet-to-c4.*sn-imagenet-to-fpn"):
        convert("sn-detectron", [str(path)])
    with pytest.raises(ValueError, match="Detectron.pytorch layout.*sn-imagenet-to-c4"):
        convert("sn-imagenet", [str(path)])
    detection = tmp_path / "detection.pth"
    torch.save({"model": {**state, "RPN.FPN_RPN_conv.weight": torch.zeros(256, 256, 3, 3)}}, detection)
    with pytest.raises(ValueError, match="detection checkpoint.*--from sn-detectron"):
        convert("sn-imagenet-to-fpn", [str(detection)])


# ---------------------------------------------------------------------------------------------------------
# normkit-convert --config with backbone-initialisation formats

def test_backbone_formats_are_registered():
    assert {"sn-imagenet", "resnet-imagenet", "mmcv-resnet-v1c", "sn-imagenet-to-c4",
            "sn-imagenet-to-fpn"} == BACKBONE_FORMATS
    assert BACKBONE_FORMATS <= set(CONVERTERS)
    assert not {"csail", "mmseg", "deeplab-v2", "sn-detectron"} & BACKBONE_FORMATS  # whole models


def test_cli_config_checks_a_detector_init(released, tmp_path, capsys):
    path, _ = released[False, True]
    out = tmp_path / "c4_init.pth"
    assert convert_main(["--from", "sn-imagenet-to-c4", str(path), "--out", str(out), "--quiet",
                         "--config", f"detection/{C4}"]) == 0
    assert out.is_file() and "wrote 371 tensors" in capsys.readouterr().out
    # an FPN layout does not fit the C4 model: named, and nothing is written
    wrong = tmp_path / "wrong.pth"
    with pytest.raises(RuntimeError, match="backbone initialisation does not match.*missing.*box_head.res5"):
        convert_main(["--from", "sn-imagenet-to-fpn", str(path), "--out", str(wrong), "--quiet",
                      "--config", f"detection/{C4}"])
    assert not wrong.exists()


def _seg_config(tmp_path, depth: int, stem: str) -> Path:
    """A segmentation config whose backbone names a file that does not exist (the converted one replaces it)."""
    cfg = {"model": {"name": "encoder_decoder", "num_classes": 3,
                     "backbone": {"name": f"resnet{depth}", "stem": stem, "output_stride": 8,
                                  "pretrained": str(tmp_path / "not_converted_yet.pth")},
                     "decode_head": {"name": "c1_deepsup"}}}
    path = tmp_path / f"seg_r{depth}_{stem}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _mmcv_v1c(state):
    """normkit deep-stem keys -> mmcv ResNetV1c ``stem.{0,1,3,4,6,7}``."""
    stem = {"conv1": "stem.0", "bn1": "stem.1", "conv2": "stem.3", "bn2": "stem.4", "conv3": "stem.6", "bn3": "stem.7"}
    return {re.sub(r"^(conv[123]|bn[123])\.", lambda m: stem[m[1]] + ".", k): v for k, v in state.items()}


@pytest.mark.parametrize("fmt,stem", [("resnet-imagenet", "deep"), ("mmcv-resnet-v1c", "v1c")])
def test_cli_config_checks_a_segmentation_backbone(tmp_path, fmt, stem):
    state = random_like(ResNet(18, stem=stem, num_classes=1000), seed=1)
    source = tmp_path / "imagenet.pth"
    torch.save({"state_dict": _mmcv_v1c(state) if fmt == "mmcv-resnet-v1c" else state}, source)
    out = tmp_path / "backbone.pth"
    assert convert_main(["--from", fmt, str(source), "--out", str(out), "--quiet",
                         "--config", str(_seg_config(tmp_path, 18, stem))]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["layer2.1.conv2.weight"], state["layer2.1.conv2.weight"])
    # a config with another depth is refused with the loader's message, and nothing is written
    other = tmp_path / "other.pth"
    with pytest.raises(RuntimeError, match="missing keys|shape mismatches"):
        convert_main(["--from", fmt, str(source), "--out", str(other), "--quiet",
                      "--config", str(_seg_config(tmp_path, 34, stem))])
    assert not other.exists()


def test_cli_config_keeps_the_strict_whole_model_check_for_classifiers(tmp_path):
    """sn-imagenet into a ``resnet`` classifier config (the model is its own backbone): fc must be there too."""
    official = official_sn_imagenet(using_bn=True)
    source = tmp_path / "resnet-sn-50.pth"
    torch.save({"state_dict": official}, source)
    assert convert_main(["--from", "sn-imagenet", str(source), "--out", str(tmp_path / "ok.pth"), "--quiet",
                         "--config", "sn/r50_sn_imagenet"]) == 0
    del official["module.fc.bias"]
    torch.save({"state_dict": official}, source)
    with pytest.raises(RuntimeError, match="missing keys.*fc.bias"):
        convert_main(["--from", "sn-imagenet", str(source), "--out", str(tmp_path / "no.pth"), "--quiet",
                      "--config", "sn/r50_sn_imagenet"])
