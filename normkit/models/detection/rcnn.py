"""GeneralizedRCNN (Faster / Mask R-CNN with C4, DC5 or FPN) and its config builder."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from normkit.models.backbones.resnet import ResNet
from normkit.models.detection.anchors import AnchorGenerator
from normkit.models.detection.box_heads import BoxPredictor, FastRCNNConvFCHead, Res5BoxHead
from normkit.models.detection.boxes import check_boxes
from normkit.models.detection.mask_head import MaskHead
from normkit.models.detection.poolers import ROIPooler
from normkit.models.detection.registry import META_ARCHS
from normkit.models.detection.roi_heads import ROIHeads
from normkit.models.detection.rpn import RPN
from normkit.models.necks.fpn import FPN
from normkit.models.registry import MODELS

__all__ = ["GeneralizedRCNN", "build_generalized_rcnn", "FROZEN_NORM_MODES", "resnet_features"]

FROZEN_NORM_MODES = ("detectron", "eval")
_STAGES = ("res2", "res3", "res4", "res5")


def resnet_features(resnet: nn.Module, x: Tensor, out_features: Sequence[str]) -> Dict[str, Tensor]:
    """Named stage features ``{"res2": C2, ...}`` of a normkit ResNet whose unused stages may be removed."""
    for i in range(1, resnet._num_stem_convs + 1):
        x = resnet.relu(getattr(resnet, f"bn{i}")(getattr(resnet, f"conv{i}")(x)))
    x = resnet.maxpool(x)
    out = {}
    last = max(_STAGES.index(name) for name in out_features)
    for index in range(last + 1):
        x = getattr(resnet, f"layer{index + 1}")(x)
        if _STAGES[index] in out_features:
            out[_STAGES[index]] = x
    return out


class GeneralizedRCNN(nn.Module):
    """backbone -> (neck) -> proposal generator -> ROI heads.

    ``model(batch)`` takes the detection batch (``images`` Tensor[B, 3, Hp, Wp] normalised and padded,
    ``image_sizes`` / ``orig_sizes`` int64 Tensor[B, 2] (h, w), ``scales`` Tensor[B], ``targets``: list of
    dicts with ``boxes`` Tensor[K, 4] xyxy in resized pixels, ``labels`` int64 0..K-1, ``iscrowd``, ``masks``).
    Training returns ``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_box_reg"[, "loss_mask"]}``; eval
    returns one dict per image with ``boxes`` (original-image xyxy), ``scores``, ``labels`` (0..K-1) and, for
    Mask R-CNN, ``masks`` uint8 Tensor[N, H, W] at the original image size.

    Args:
        backbone: a normkit ResNet (stages past the last used feature removed).
        backbone_features: the stage names the rest of the model uses.
        neck: FPN or None. rpn: :class:`RPN`. roi_heads: :class:`ROIHeads`.
        freeze_at: 0 (train everything), 1 (freeze the stem), 2 (stem and res2), ... Frozen parameters get
            ``requires_grad=False``.
        frozen_norm_mode: what the norm layers of frozen stages do. ``"detectron"`` reproduces
            Detectron.pytorch: the stem's norm always runs in eval mode, but the norms *inside* frozen res
            stages stay in training mode (batch statistics, running stats updated) even under ``model.eval()``.
            ``"eval"`` keeps every frozen norm in eval mode (running statistics), as detectron2.
        legacy_plus_one: checked in training inputs (boxes may end on the last pixel, ``x2 <= W - 1``).
    """

    def __init__(self, backbone: nn.Module, backbone_features: Sequence[str], rpn: RPN, roi_heads: ROIHeads, *,
                 neck: Optional[nn.Module] = None, freeze_at: int = 0, frozen_norm_mode: str = "detectron",
                 legacy_plus_one: bool = True):
        super().__init__()
        if frozen_norm_mode not in FROZEN_NORM_MODES:
            raise ValueError(f"unknown frozen_norm_mode {frozen_norm_mode!r}; choose one of "
                             f"{', '.join(FROZEN_NORM_MODES)}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5 (1 = stem, 2 = res2, ...), got {freeze_at}")
        self.backbone = backbone
        self.backbone_features = tuple(backbone_features)
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.freeze_at = freeze_at
        self.frozen_norm_mode = frozen_norm_mode
        self.legacy_plus_one = legacy_plus_one
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(True)

    def _stem(self) -> List[nn.Module]:
        b = self.backbone
        return [getattr(b, f"{kind}{i}") for i in range(1, b._num_stem_convs + 1) for kind in ("conv", "bn")]

    def _frozen_stages(self) -> List[nn.Module]:
        return [getattr(self.backbone, f"layer{k}") for k in range(1, self.freeze_at)
                if getattr(self.backbone, f"layer{k}", None) is not None]

    def _frozen_modules(self) -> List[nn.Module]:
        return (self._stem() if self.freeze_at >= 1 else []) + self._frozen_stages()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_at >= 1:
            for module in self._stem():
                module.train(False)
        for stage in self._frozen_stages():
            if self.frozen_norm_mode == "eval":
                stage.train(False)
            else:  # Detectron.pytorch: only the stage's direct children leave training mode
                for block in stage.children():
                    for m in block.modules():
                        m.training = m is not block
        return self

    def features(self, images: Tensor) -> Dict[str, Tensor]:
        """Backbone (and neck) features of a batch of images."""
        feats = resnet_features(self.backbone, images, self.backbone_features)
        return self.neck(feats) if self.neck is not None else feats

    def _check_batch(self, batch: Mapping[str, Any]) -> None:
        if not isinstance(batch, Mapping) or "images" not in batch:
            raise ValueError("GeneralizedRCNN expects a batch dict with 'images', 'image_sizes', 'orig_sizes', "
                             "'scales' (and 'targets' in training)")
        images = batch["images"]
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"batch['images'] must be Tensor[B, 3, H, W], got "
                             f"{list(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        for key in ("image_sizes", "orig_sizes", "scales"):
            if key not in batch:
                raise ValueError(f"the detection batch lacks {key!r}")
        if not self.training:
            return
        targets = batch.get("targets")
        if targets is None or len(targets) != images.shape[0]:
            raise ValueError(f"a training batch needs 'targets', one dict per image ({images.shape[0]})")
        limit = 1.0 if self.legacy_plus_one else 0.0
        for i, t in enumerate(targets):
            boxes = t.get("boxes")
            check_boxes(boxes, f"targets[{i}]['boxes']")
            labels = t.get("labels")
            if labels is None or labels.shape != boxes.shape[:1]:
                raise ValueError(f"targets[{i}]['labels'] must be int64 Tensor[{boxes.shape[0]}]")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.roi_heads.num_classes):
                raise ValueError(f"targets[{i}]['labels'] must be in 0..{self.roi_heads.num_classes - 1} (contiguous "
                                 f"foreground classes), got range [{int(labels.min())}, {int(labels.max())}]")
            h, w = (float(v) for v in batch["image_sizes"][i])
            # half a pixel of slack for the float arithmetic of resizing/flipping
            outside = ((boxes[:, 0] < -0.5) | (boxes[:, 1] < -0.5) | (boxes[:, 2] > w - limit + 0.5) |
                       (boxes[:, 3] > h - limit + 0.5))
            if bool(outside.any()):
                raise ValueError(f"targets[{i}]['boxes']: {int(outside.sum())} box(es) outside the {int(h)}x{int(w)} "
                                 f"image, e.g. {boxes[outside][0].tolist()}; clip boxes in the data pipeline")

    def forward(self, batch: Mapping[str, Any]):
        self._check_batch(batch)
        images = batch["images"]
        device = images.device
        image_sizes = batch["image_sizes"]
        scales = batch["scales"]
        orig_sizes = batch["orig_sizes"]
        targets = batch.get("targets") if self.training else None
        features = self.features(images)
        proposals, rpn_losses = self.rpn(features, image_sizes, tuple(images.shape[-2:]), scales, targets)
        if self.training:
            roi_losses = self.roi_heads(features, proposals, image_sizes, scales, orig_sizes, targets)
            return {**rpn_losses, **roi_losses}
        results = self.roi_heads(features, proposals, image_sizes, scales, orig_sizes)
        for r in results:
            for k, v in r.items():
                r[k] = v.to(device)
        return results


# -- builder --

def _pop(cfg: dict, key: str, default, where: str):
    return cfg.pop(key, default)


def _check_empty(cfg: Mapping, where: str) -> None:
    if cfg:
        raise ValueError(f"unknown keys in config {where}: {sorted(cfg)}")


def _build_backbone(cfg: dict):
    where = "model.backbone"
    cfg = dict(cfg)
    name = cfg.pop("name", "resnet50")
    if not name.startswith("resnet") or not name[6:].isdigit():
        raise ValueError(f"config {where}.name: detection backbones are resnet50/resnet101, got {name!r}")
    out_features = tuple(cfg.pop("out_features", ("res4",)))
    unknown = [f for f in out_features if f not in _STAGES]
    if unknown:
        raise ValueError(f"config {where}.out_features: unknown stages {unknown}; choose from {list(_STAGES)}")
    freeze_at = cfg.pop("freeze_at", 2)
    frozen_norm_mode = cfg.pop("frozen_norm_mode", "detectron")
    pretrained = cfg.pop("pretrained", None)
    cfg.setdefault("stem", "v1")
    cfg.setdefault("stride_in_1x1", False)
    try:
        backbone = ResNet(int(name[6:]), **cfg)
    except TypeError as exc:
        raise ValueError(f"bad keys in config {where}: {exc}") from exc
    last = max(_STAGES.index(f) for f in out_features)
    for index in range(last + 1, 4):
        delattr(backbone, f"layer{index + 1}")  # stages the detector does not use have no weights
    channels = {s: c for s, c in zip(_STAGES, backbone.out_channels)}
    strides = {s: st for s, st in zip(_STAGES, backbone.out_strides)}
    return backbone, out_features, channels, strides, freeze_at, frozen_norm_mode, pretrained


def build_generalized_rcnn(cfg: Mapping) -> GeneralizedRCNN:
    """Build a :class:`GeneralizedRCNN` from a ``model`` config section (see docs/detection_models.md)."""
    cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}
    cfg.pop("name", None)
    num_classes = cfg.pop("num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"config model.num_classes must be a positive int (foreground classes, 80 for COCO), "
                         f"got {num_classes!r}")
    legacy = bool(cfg.pop("legacy_plus_one", True))
    if "backbone" not in cfg or "rpn" not in cfg or "roi_heads" not in cfg:
        raise ValueError("config model needs 'backbone', 'rpn' and 'roi_heads' sections for generalized_rcnn")
    backbone, bb_features, channels, strides, freeze_at, frozen_norm_mode, pretrained = _build_backbone(
        cfg.pop("backbone"))
    norm = backbone.bn1.__class__  # noqa: F841  (the backbone norm is only used through configs below)

    neck_cfg = cfg.pop("neck", None)
    neck = None
    feat_channels, feat_strides = dict(channels), dict(strides)
    if neck_cfg:
        neck_cfg = dict(neck_cfg)
        if neck_cfg.pop("name", "fpn") != "fpn":
            raise ValueError("config model.neck.name: only 'fpn' is available")
        in_features = tuple(neck_cfg.pop("in_features", bb_features))
        try:
            neck = FPN(in_features, [channels[f] for f in in_features], **neck_cfg)
        except TypeError as exc:
            raise ValueError(f"bad keys in config model.neck: {exc}") from exc
        feat_channels = {f: neck.out_channels for f in neck.out_features}
        feat_strides = dict(zip(neck.out_features, neck.out_strides))

    rpn = _build_rpn(dict(cfg.pop("rpn")), feat_channels, feat_strides, legacy)
    roi_heads = _build_roi_heads(dict(cfg.pop("roi_heads")), cfg.pop("mask_head", None), feat_channels,
                                 feat_strides, num_classes, legacy)
    _check_empty(cfg, "model")
    model = GeneralizedRCNN(backbone, bb_features, rpn, roi_heads, neck=neck, freeze_at=freeze_at,
                            frozen_norm_mode=frozen_norm_mode, legacy_plus_one=legacy)
    if pretrained:
        from normkit.convert.sn_detectron import load_imagenet_backbone
        load_imagenet_backbone(model, pretrained)
    return model


def _build_rpn(cfg: dict, channels: Mapping[str, int], strides: Mapping[str, int], legacy: bool) -> RPN:
    where = "model.rpn"
    in_features = tuple(cfg.pop("in_features"))
    missing = [f for f in in_features if f not in channels]
    if missing:
        raise ValueError(f"config {where}.in_features: {missing} are not features of the backbone/neck "
                         f"({sorted(channels)})")
    sizes = cfg.pop("anchor_sizes", [[32 * 2 ** i] for i in range(len(in_features))])
    ratios = cfg.pop("aspect_ratios", [0.5, 1.0, 2.0])
    style = cfg.pop("anchor_style", "detectron" if legacy else "d2")
    offset = cfg.pop("anchor_offset", 0.0)
    anchor_strides = [strides[f] for f in in_features]
    if len(sizes) != len(in_features):
        raise ValueError(f"config {where}.anchor_sizes needs one list per level ({len(in_features)}), got {sizes}")
    anchors = AnchorGenerator(anchor_strides, sizes, ratios, style=style, offset=offset)
    cfg.setdefault("legacy_plus_one", legacy)
    for key in ("pre_nms_topk", "post_nms_topk", "iou_thresholds"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    try:
        return RPN(in_features, channels[in_features[0]], anchors, **cfg)
    except TypeError as exc:
        raise ValueError(f"bad keys in config {where}: {exc}") from exc


def _build_roi_heads(cfg: dict, mask_cfg: Optional[Mapping], channels: Mapping[str, int],
                     strides: Mapping[str, int], num_classes: int, legacy: bool) -> ROIHeads:
    where = "model.roi_heads"
    in_features = tuple(cfg.pop("in_features"))
    resolution = cfg.pop("pooler_resolution", 7)
    sampling = cfg.pop("pooler_sampling_ratio", 2)
    aligned = cfg.pop("pooler_aligned", not legacy)
    box_cfg = dict(cfg.pop("box_head"))
    background = cfg.pop("background", "first" if legacy else "last")
    scales = [1.0 / strides[f] for f in in_features]
    pooler = ROIPooler(resolution, scales, sampling, aligned=aligned, legacy_plus_one=legacy)
    head_name = box_cfg.pop("name")
    in_ch = channels[in_features[0]]
    try:
        if head_name == "res5":
            box_head = Res5BoxHead(in_ch, **box_cfg)
        elif head_name == "conv_fc":
            box_head = FastRCNNConvFCHead(in_ch, resolution, **box_cfg)
        else:
            raise ValueError(f"unknown box head {head_name!r} in config {where}.box_head.name; choose res5 or conv_fc")
    except TypeError as exc:
        raise ValueError(f"bad keys in config {where}.box_head: {exc}") from exc
    predictor = BoxPredictor(box_head.out_channels, num_classes, background)
    mask_kwargs = {}
    if mask_cfg:
        mask_cfg = dict(mask_cfg)
        mask_features = tuple(mask_cfg.pop("in_features", in_features))
        mask_pooler = ROIPooler(mask_cfg.pop("pooler_resolution", 14), [1.0 / strides[f] for f in mask_features],
                                mask_cfg.pop("pooler_sampling_ratio", 2), aligned=aligned, legacy_plus_one=legacy)
        paste = mask_cfg.pop("paste", "cv2" if legacy else "grid_sample")
        threshold = mask_cfg.pop("threshold", 0.5)
        try:
            mask_head = MaskHead(channels[mask_features[0]],
                                 num_classes + 1 if background == "first" else num_classes, **mask_cfg)
        except TypeError as exc:
            raise ValueError(f"bad keys in config model.mask_head: {exc}") from exc
        mask_kwargs = dict(mask_pooler=mask_pooler, mask_head=mask_head, mask_in_features=mask_features,
                           mask_paste=paste, mask_threshold=threshold)
    if "bbox_reg_weights" in cfg:
        cfg["bbox_reg_weights"] = tuple(cfg["bbox_reg_weights"])
    try:
        return ROIHeads(in_features, pooler, box_head, predictor, legacy_plus_one=legacy, **mask_kwargs, **cfg)
    except TypeError as exc:
        raise ValueError(f"bad keys in config {where}: {exc}") from exc


MODELS.register("generalized_rcnn", build_generalized_rcnn)
if META_ARCHS is not MODELS:
    META_ARCHS.register("generalized_rcnn", build_generalized_rcnn)
