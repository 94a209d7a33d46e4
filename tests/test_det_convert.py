"""SN-Detectron checkpoints (exact official keys and shapes, random values) convert and load strictly."""
import ast
import logging
from pathlib import Path

import pytest
import torch

from normkit.convert import CONVERTERS, convert, save_state_dict
from normkit.convert.sn_detectron import convert_sn_imagenet_for_detection, describe_sn_detectron
from normkit.models import build_model, read_config
from normkit.nn import SwitchNorm2d

ROOT = Path(__file__).resolve().parents[1]
DUMPS = Path(__file__).parent / "data" / "sn_detectron"
# official dump (keys, shapes, requires_grad) -> matching config
CASES = {
    "e2e_faster_rcnn_R-50-C4_2x_sn": "e2e_faster_rcnn_R-50-C4_2x_sn",
    "e2e_faster_rcnn_R-50-FPN_2x_sn": "e2e_faster_rcnn_R-50-FPN_2x_sn",
    "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1": "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1",
    "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1": "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1",
}


def read_dump(name):
    """[(key, shape, requires_grad)] of an official state-dict dump."""
    rows = []
    for line in (DUMPS / f"{name}.txt").read_text().splitlines():
        key, rest = line.split(" ", 1)
        shape_text, _, flag = rest.rpartition(")")
        rows.append((key, tuple(ast.literal_eval(shape_text + ")")), flag.strip() == "grad"))
    return rows


def fake_checkpoint(name, tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=gen) for key, shape, _ in read_dump(name)}
    path = tmp_path / f"{name}.pth"
    torch.save({"model": state, "step": 1}, path)
    return path, state


@pytest.mark.parametrize("name", sorted(CASES))
def test_official_checkpoint_converts_and_loads_strictly(name, tmp_path, caplog):
    path, source = fake_checkpoint(name, tmp_path)
    with caplog.at_level(logging.INFO, logger="normkit.convert"):
        state = convert("sn-detectron", [str(path)])
    assert len(state) == len(source)  # one-to-one
    renames = [r for r in caplog.records if " -> " in r.getMessage()]
    assert len(renames) == len(source)  # every key logged
    model = build_model(ROOT / "configs" / "detection" / f"{CASES[name]}.yaml", checkpoint=state)
    own = model.state_dict()
    assert set(own) == set(state)
    # values arrive unchanged (SN (1, C, 1, 1) tensors flattened)
    for new_key, value in state.items():
        assert torch.equal(own[new_key], value.reshape(own[new_key].shape))
    # same number of values, SN layers and trainable tensors as the official model
    dump = read_dump(name)
    assert sum(v.numel() for v in own.values()) == sum(torch.Size(s).numel() for _, s, _ in dump)
    num_sn = sum(1 for k, _, _ in dump if k.endswith("mean_weight"))
    assert sum(isinstance(m, SwitchNorm2d) for m in model.modules()) == num_sn
    trainable = sum(1 for _, _, g in dump if g)
    assert sum(p.requires_grad for p in model.parameters()) == trainable


def test_fpn_modules_map_level_by_level(tmp_path):
    # Detectron.pytorch's FPN lists its modules top-down: conv_top is C5's lateral, topdown_lateral_modules i
    # takes C(4 - i), posthoc_modules i outputs P(5 - i). normkit's neck lists them bottom-up (index 0 = P2 / C2).
    # The 3x3 output convs all have one shape, so only a key-by-key check sees a reversed order.
    path, source = fake_checkpoint("e2e_faster_rcnn_R-50-FPN_2x_sn", tmp_path)
    state = convert("sn-detectron", [str(path)])
    expected = {"Conv_Body.conv_top.0.weight": "neck.lateral_convs.3.0.weight"}
    for i in range(3):
        lateral = f"Conv_Body.topdown_lateral_modules.{i}.conv_lateral.0.weight"
        expected[lateral] = f"neck.lateral_convs.{2 - i}.0.weight"
    for i in range(4):
        for leaf in ("0.weight", "0.bias", "1.weight", "1.mean_weight", "1.var_weight", "1.running_var"):
            if f"Conv_Body.posthoc_modules.{i}.{leaf}" in source:
                expected[f"Conv_Body.posthoc_modules.{i}.{leaf}"] = f"neck.output_convs.{3 - i}.{leaf}"
    assert sum(k.startswith("Conv_Body.posthoc_modules.3.") for k in expected) >= 3
    for src, dst in expected.items():
        assert torch.equal(state[dst], source[src].reshape(state[dst].shape)), (src, dst)


def test_description_names_the_architecture(tmp_path):
    _, state = fake_checkpoint("e2e_mask_rcnn_R-50-FPN_2x_sn_8-1", tmp_path)
    text = describe_sn_detectron(state)
    assert "Mask R-CNN FPN" in text and "4conv1fc" in text and "(8,1)" in text


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path, _ = fake_checkpoint("e2e_faster_rcnn_R-50-C4_2x_sn", tmp_path)
    state = convert("sn-detectron", [str(path)])
    with pytest.raises(RuntimeError, match="(?i)missing|unexpected"):
        build_model(ROOT / "configs" / "detection" / "e2e_faster_rcnn_R-50-FPN_2x_sn.yaml", checkpoint=state)


def test_not_a_detection_checkpoint(tmp_path):
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(ValueError, match="not an SN-Detectron detection checkpoint"):
        convert("sn-detectron", [str(path)])


def _imagenet_checkpoint(tmp_path, using_bn):
    from normkit.models.backbones import ResNet
    net = ResNet(50, norm="sn", norm_kwargs={"using_bn": using_bn}, num_classes=1000)
    state = {}
    for k, v in net.state_dict().items():  # back to the official layout: module.*, snK, (1, C, ...) tensors
        module, _, leaf = k.rpartition(".")
        if "downsample" not in module:
            module = module.replace("bn", "sn")
        if leaf in ("weight", "bias") and v.dim() == 1 and "downsample.0" not in module and module != "fc":
            v = v.reshape(1, -1, 1, 1)
        elif leaf in ("running_mean", "running_var"):
            v = v.reshape(1, -1, 1)
        state[f"module.{module}.{leaf}"] = v
    path = tmp_path / "resnet-sn-50.pth"
    torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize("config,layout,using_bn", [("e2e_faster_rcnn_R-50-C4_2x_sn", "c4", True),
                                                   ("e2e_faster_rcnn_R-50-FPN_2x_sn_8-1", "fpn", False)])
def test_imagenet_backbone_fills_the_detector(tmp_path, config, layout, using_bn):
    path = _imagenet_checkpoint(tmp_path, using_bn)
    state = convert_sn_imagenet_for_detection(path, layout)
    if layout == "c4":  # res5 goes into the box head, not lost
        assert any(k.startswith("roi_heads.box_head.res5.2.") for k in state)
        assert not any(k.startswith("backbone.layer4") for k in state)
    converted = tmp_path / "init.pth"
    save_state_dict(state, converted)
    cfg = read_config(ROOT / "configs" / "detection" / f"{config}.yaml")
    cfg["model"]["backbone"]["pretrained"] = str(converted)
    model = build_model(cfg)
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v.reshape(own[k].shape)), k


def test_cli_formats_registered():
    assert {"sn-detectron", "sn-imagenet-to-c4", "sn-imagenet-to-fpn"} <= set(CONVERTERS)
