"""Registry and build_model: every config in configs/ builds, trains one step and predicts; strict loading."""
from pathlib import Path

import pytest
import torch
import yaml

from normkit import build_model
from normkit.models import BACKBONES, SEG_HEADS, MODELS, ResNet
from normkit.tools.tasks import SegmentationTask, task_for

ALL_CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*/*.yaml"))


def _is_segmentation_recipe(path: Path) -> bool:
    # Detection recipes have their own smoke test with detection batches (test_det_models.py); the model-only
    # ImageNet config is built in test_published_recipes.py.
    cfg = yaml.safe_load(path.read_text())
    return "data" in cfg and task_for(cfg) is SegmentationTask


CONFIGS = [p for p in ALL_CONFIGS if _is_segmentation_recipe(p)]
# the other configs differ only in depth or norm from these, or have small stand-ins in test_models_*.py
FAST = {"csail/r18d8_c1_deepsup.yaml", "sn/r50d8_sn_c1_deepsup.yaml"}


def _param(path):
    rel = f"{path.parent.name}/{path.name}"
    return pytest.param(path, id=rel, marks=() if rel in FAST else pytest.mark.slow)


def test_configs_cover_every_published_model():
    names = {f"{p.parent.name}/{p.stem}" for p in ALL_CONFIGS}
    assert {"csail/r50d8_c1_deepsup", "csail/r50d8_ppm_deepsup", "csail/r101d8_ppm_deepsup",
            "sn/r50_sn_imagenet", "csail/r50_upernet", "csail/r101_upernet", "csail/r18d8_c1_deepsup",
            "sn/r50d8_sn_c1_deepsup", "deeplab/r101_deeplab_v2_voc", "condnet/r50d8_cond_sep_aspp_ade20k",
            "condnet/r101d8_cond_sep_aspp_ade20k", "condnet/r101d8_cond_sep_aspp_pascal_context59"} <= names


@pytest.mark.parametrize("path", [_param(p) for p in CONFIGS])
def test_config_builds_trains_and_predicts(path):
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) == {"model", "data", "train", "evaluation"}
    assert cfg["data"]["num_classes"] == cfg["model"]["num_classes"]
    torch.manual_seed(0)
    model = build_model(path).train()
    k = cfg["model"]["num_classes"]
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, k, (2, 64, 64))
    labels[:, :4] = 255
    losses = model({"images": images, "labels": labels})
    loss_terms = [v for name, v in losses.items() if name.endswith("loss")]
    assert loss_terms and "pixel_acc" in losses
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(loss_terms).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[-4:])
    model.eval()
    with torch.no_grad():
        assert model(images[:1]).shape == (1, k, 64, 64)


def test_default_training_path_r18_deep_os8_sn_c1_deepsup():
    # the model `make train` trains: ResNet-18, deep stem, output stride 8, SN everywhere, C1 deep-sup
    cfg = {"model": {"name": "encoder_decoder", "num_classes": 6, "loss_mode": "downsample_labels",
                     "backbone": {"name": "resnet18", "stem": "deep", "output_stride": 8, "norm": "sn",
                                  "norm_kwargs": {"momentum": 0.003}, "last_gamma": True},
                     "decode_head": {"name": "c1_deepsup"}}}
    model = build_model(cfg).train()
    assert type(model.backbone.layer4[1].bn2).__name__ == "SwitchNorm2d"
    assert type(model.decode_head.cbr_deepsup[1]).__name__ == "SwitchNorm2d"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 32, 32))
    first = None
    for _ in range(2):
        losses = model({"images": images, "labels": labels})
        total = losses["decode_loss"] + losses["deepsup_loss"]
        first = total.item() if first is None else first
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert total.item() < first  # it learns the batch
    assert model.backbone.bn1.running_var.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 6, 32, 32)


def test_build_from_dict_matches_yaml_and_does_not_mutate(tmp_path):
    cfg = {"model": {"name": "encoder_decoder", "num_classes": 4,
                     "backbone": {"name": "resnet18", "stem": "deep", "output_stride": 8, "norm": "sn",
                                  "norm_kwargs": {"using_bn": False}},
                     "decode_head": {"name": "c1_deepsup"}}}
    snapshot = yaml.safe_dump(cfg)
    model = build_model(cfg)
    assert yaml.safe_dump(cfg) == snapshot
    # the head inherits the backbone's norm and its kwargs
    assert model.decode_head.cbr[1].mean_weight.numel() == 2
    path = tmp_path / "m.yaml"
    path.write_text(snapshot)
    assert build_model(path).state_dict().keys() == model.state_dict().keys()


def _tiny_cfg(**head):
    return {"model": {"name": "encoder_decoder", "num_classes": 3,
                      "backbone": {"name": "resnet18", "stem": "deep", "output_stride": 8},
                      "decode_head": {"name": "c1", **head}}}


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match="unknown model 'segformer'; choose one of .*deeplab_v2.*encoder_decoder"):
        build_model({"model": {"name": "segformer"}})
    cfg = _tiny_cfg()
    cfg["model"]["backbone"]["name"] = "resnet152"
    with pytest.raises(ValueError, match="unknown backbone 'resnet152'.*resnet101"):
        build_model(cfg)
    with pytest.raises(ValueError, match="unknown segmentation head 'c2'.*c1_deepsup.*ppm"):
        build_model(_tiny_cfg(name="c2"))
    cfg = _tiny_cfg()
    cfg["model"]["backbone"]["norm"] = "sb"
    with pytest.raises(ValueError, match="unknown norm 'sb'; choose one of bn, syncbn"):
        build_model(cfg)
    with pytest.raises(ValueError, match="model.decode_head.*fpn_size"):
        build_model(_tiny_cfg(fpn_size=3))
    with pytest.raises(ValueError, match="no 'model' section"):
        build_model({"data": {}})
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= set(BACKBONES.names())
    assert {"c1", "c1_deepsup", "ppm", "ppm_deepsup", "upernet", "upernet_lite", "aspp_sum", "cond_aspp",
            "cond_sep_aspp", "fcn"} <= set(SEG_HEADS.names())
    assert {"encoder_decoder", "deeplab_v2", "resnet"} <= set(MODELS.names())


def test_checkpoint_round_trip_and_strict_errors(tmp_path):
    model = build_model(_tiny_cfg())
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = build_model(_tiny_cfg(), checkpoint=path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    # a checkpoint of another architecture: the mismatched keys and shapes are named
    other = build_model({"model": {**_tiny_cfg()["model"], "num_classes": 7}})
    torch.save(other.state_dict(), path)
    with pytest.raises(RuntimeError, match=r"decode_head.conv_last.weight: checkpoint \[7, 128, 1, 1\] vs model "
                                           r"\[3, 128, 1, 1\]"):
        build_model(_tiny_cfg(), checkpoint=path)
    state = model.state_dict()
    state["decode_head.extra.weight"] = torch.zeros(1)
    del state["backbone.layer1.0.conv1.weight"]
    with pytest.raises(RuntimeError, match="missing keys.*backbone.layer1.0.conv1.weight.*unexpected keys.*extra"):
        build_model(_tiny_cfg(), checkpoint=state)
    # ignorable buffers: BN step counters may be absent, CSAIL SyncBN bookkeeping present
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["backbone.bn1._tmp_running_mean"] = torch.zeros(64)
    build_model(_tiny_cfg(), checkpoint=state)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        build_model(_tiny_cfg(), checkpoint=tmp_path / "bad.pth")


def test_strict_loading_rules_on_a_small_module():
    from torch import nn
    from normkit.models.checkpoint import load_state_dict_strict, read_state_dict
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    state = model.state_dict()
    # a DataParallel prefix is stripped only when every key has it (a submodule may be called "module")
    assert set(read_state_dict({f"module.{k}": v for k, v in state.items()})) == set(state)
    mixed = {"module.w": torch.zeros(1), "other.w": torch.zeros(1)}
    assert set(read_state_dict(mixed)) == set(mixed)
    # only step counters and SyncBN bookkeeping may be absent, not running statistics
    with pytest.raises(RuntimeError, match=r"missing keys \(1\): 1.running_var"):
        load_state_dict_strict(model, {k: v for k, v in state.items() if k != "1.running_var"})
    # as many values in another shape (a transposed weight) is a shape mismatch, named as one
    with pytest.raises(RuntimeError, match=r"shape mismatches \(1\): 0.weight: checkpoint \[2, 3\] vs model \[3, 2\]"):
        load_state_dict_strict(model, {**state, "0.weight": torch.zeros(2, 3)})


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "object": ResNet}, path)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        build_model(_tiny_cfg(), checkpoint=path)


def test_backbone_pretrained_ignores_imagenet_classifier(tmp_path):
    imagenet = ResNet(18, stem="deep", num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save(imagenet.state_dict(), path)
    cfg = _tiny_cfg()
    cfg["model"]["backbone"]["pretrained"] = str(path)
    model = build_model(cfg)
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
