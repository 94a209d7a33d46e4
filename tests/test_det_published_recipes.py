"""The SN-Detectron recipes: every published hyperparameter of the four released SN detection configs against
the values of the original configs and Detectron-1 defaults (written down here, not read from normkit), so
editing a config or a default that a config relies on fails."""
from pathlib import Path

import pytest

from normkit.models import read_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
PUBLISHED = ("e2e_faster_rcnn_R-50-C4_2x_sn", "e2e_faster_rcnn_R-50-FPN_2x_sn", "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1",
             "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1")

# Shared by every SN config: Detectron-1 defaults and the values the SN yamls set.
COMMON = {
    "model.legacy_plus_one": True,
    "model.rpn.nms_thresh": 0.7, "model.rpn.iou_thresholds": [0.3, 0.7], "model.rpn.positive_fraction": 0.5,
    "model.rpn.batch_size_per_image": 256, "model.rpn.straddle_thresh": 0, "model.rpn.smooth_l1_beta": 1 / 9,
    "model.roi_heads.positive_fraction": 0.25, "model.roi_heads.fg_iou_threshold": 0.5,
    "model.roi_heads.bbox_reg_weights": [10.0, 10.0, 5.0, 5.0], "model.roi_heads.smooth_l1_beta": 1.0,
    "model.roi_heads.score_thresh": 0.05, "model.roi_heads.nms_thresh": 0.5,
    "model.roi_heads.detections_per_image": 100, "model.roi_heads.pooler_aligned": False,
    "data.pixel_order": "rgb", "data.pixel_scale": 1, "data.mean": [0.485, 0.456, 0.406],
    "data.std": [0.229, 0.224, 0.225],
    "train.max_iter": 180000, "train.batch_size": 2,
    "train.optimizer.lr": 0.02, "train.optimizer.reference_batch": 16, "train.optimizer.momentum": 0.9,
    "train.optimizer.weight_decay": 0.0001, "train.optimizer.norm_weight_decay": 0.0,
    "train.lr_schedule.steps": [120000, 160000], "train.lr_schedule.gamma": 0.1,
    "train.lr_schedule.warmup_iters": 500, "train.lr_schedule.warmup_factor": 1 / 3,
    "train.lr_schedule.warmup_method": "linear", "train.lr_schedule.policy": "step",
    "train.optimizer.bias_lr_mult": 2.0, "train.optimizer.bias_weight_decay": 0.0,
    "data.train.short_sides": [800], "data.train.max_size": 1333, "data.val.short_side": 800,
    "data.val.max_size": 1333, "data.val.batch_size": 1, "data.train.flip": "double", "data.train.grouping": "sorted",
    "model.rpn.anchor_style": "detectron", "model.rpn.aspect_ratios": [0.5, 1.0, 2.0], "model.rpn.min_size": 0,
    "model.rpn.bg_with_replacement": True, "model.rpn.bbox_loss_normalizer": "num_valid",
    "model.rpn.eval_clip_to_padded": True, "model.roi_heads.bg_iou_threshold_lo": 0.0,
    "model.roi_heads.background": "first",
}
C4 = {"model.rpn.anchor_sizes": [[32, 64, 128, 256, 512]], "model.rpn.pre_nms_topk": [12000, 6000],
      "model.rpn.post_nms_topk": [2000, 1000], "model.roi_heads.batch_size_per_image": 256,
      "model.roi_heads.pooler_resolution": 14, "model.roi_heads.pooler_sampling_ratio": 0,
      "model.backbone.freeze_at": 0, "data.size_divisibility": 1, "model.rpn.cls_loss_normalizer": "num_valid"}
FPN = {"model.rpn.anchor_sizes": [[32], [64], [128], [256], [512]], "model.rpn.pre_nms_topk": [2000, 1000],
       "model.rpn.post_nms_topk": [2000, 1000], "model.rpn.collect": "per_batch",
       "model.roi_heads.batch_size_per_image": 512, "model.roi_heads.pooler_resolution": 7,
       "model.roi_heads.pooler_sampling_ratio": 2, "model.backbone.freeze_at": 2, "data.size_divisibility": 32,
       "model.rpn.cls_loss_normalizer": "batch_size"}
MASK = {"model.mask_head.pooler_resolution": 14, "model.mask_head.pooler_sampling_ratio": 2,
        "model.mask_head.num_conv": 4, "model.mask_head.conv_dim": 256, "model.mask_head.threshold": 0.5}
EXPECTED = {
    "e2e_faster_rcnn_R-50-C4_2x_sn": {**COMMON, **C4},
    "e2e_faster_rcnn_R-50-FPN_2x_sn": {**COMMON, **FPN},
    "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1": {**COMMON, **FPN, "model.backbone.norm_kwargs.using_bn": False},
    "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1": {**COMMON, **FPN, **MASK, "model.backbone.norm_kwargs.using_bn": False,
                                         "model.mask_head.norm_kwargs.using_bn": False},
}


def _get(cfg: dict, path: str):
    for key in path.split("."):
        cfg = cfg[key]
    return cfg


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_sn_detection_configs_keep_the_original_hyperparameters(name):
    cfg = read_config(CONFIGS / f"{name}.yaml")
    for path, expected in EXPECTED[name].items():
        value = _get(cfg, path)
        if isinstance(expected, float):
            assert value == pytest.approx(expected), f"{name}: {path}"
        else:
            assert value == expected, f"{name}: {path}"


# Every detection config (the BN / GN baselines of Detectron-1, DC5, scratch): the Detectron-1 solver for 16 images
# per step, with the schedule its name states (2x: 180k iterations, steps 120k / 160k; 3x: 270k, 210k / 250k),
# the data pipeline, and the C4 (one stride-16 level) or FPN settings.
ALL_CONFIGS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
SOLVER = {"train.optimizer.lr": 0.02, "train.optimizer.reference_batch": 16, "train.optimizer.momentum": 0.9,
          "train.optimizer.weight_decay": 0.0001, "train.optimizer.bias_lr_mult": 2.0, "train.batch_size": 2,
          "train.lr_schedule.gamma": 0.1, "train.lr_schedule.warmup_iters": 500,
          "train.lr_schedule.warmup_factor": 1 / 3, "train.lr_schedule.warmup_method": "linear",
          "data.train.short_sides": [800], "data.train.max_size": 1333, "data.val.short_side": 800,
          "data.val.max_size": 1333, "model.rpn.aspect_ratios": [0.5, 1.0, 2.0], "model.rpn.nms_thresh": 0.7,
          "model.rpn.iou_thresholds": [0.3, 0.7], "model.rpn.batch_size_per_image": 256,
          "model.rpn.positive_fraction": 0.5, "model.roi_heads.positive_fraction": 0.25,
          "model.roi_heads.fg_iou_threshold": 0.5, "model.roi_heads.bg_iou_threshold_lo": 0.0,
          "model.roi_heads.bbox_reg_weights": [10.0, 10.0, 5.0, 5.0], "model.roi_heads.score_thresh": 0.05,
          "model.roi_heads.nms_thresh": 0.5, "model.roi_heads.detections_per_image": 100}
SCHEDULES = {"2x": {"train.max_iter": 180000, "train.lr_schedule.steps": [120000, 160000]},
             "3x": {"train.max_iter": 270000, "train.lr_schedule.steps": [210000, 250000]}}
SINGLE_LEVEL = {"data.size_divisibility": 1, "model.rpn.pre_nms_topk": [12000, 6000],
                "model.rpn.post_nms_topk": [2000, 1000], "model.rpn.anchor_sizes": [[32, 64, 128, 256, 512]]}
PYRAMID = {"data.size_divisibility": 32, "model.rpn.pre_nms_topk": [2000, 1000],
           "model.rpn.post_nms_topk": [2000, 1000], "model.rpn.anchor_sizes": [[32], [64], [128], [256], [512]],
           "model.roi_heads.batch_size_per_image": 512, "model.roi_heads.pooler_resolution": 7,
           "model.roi_heads.pooler_sampling_ratio": 2}
CAFFE_PIXELS = {"data.pixel_order": "bgr", "data.pixel_scale": 255, "data.mean": [102.9801, 115.9465, 122.7717],
                "data.std": [1.0, 1.0, 1.0]}
GN = {"model.backbone.norm": "gn", "model.backbone.norm_kwargs.num_groups": 32,
      "model.backbone.norm_kwargs.eps": 1e-5}


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_detection_config_keeps_the_detectron_recipe_its_name_states(name):
    expected = {**SOLVER, **SCHEDULES["3x" if "_3x" in name else "2x"],
                **(PYRAMID if "FPN" in name else SINGLE_LEVEL)}
    if name.endswith(("_bn", "_gn")):  # Detectron-1 baselines: Caffe BGR pixels
        expected.update(CAFFE_PIXELS)
    if name.endswith("_gn"):
        expected.update(GN)
    if "R-101" in name:
        expected["model.backbone.name"] = "resnet101"
    if name.startswith("scratch_"):
        expected["model.backbone.freeze_at"] = 0  # nothing pretrained to freeze
    cfg = read_config(CONFIGS / f"{name}.yaml")
    for path, value in expected.items():
        got = _get(cfg, path)
        assert got == (pytest.approx(value) if isinstance(value, float) else value), f"{name}: {path}"
