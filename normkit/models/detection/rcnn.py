"""GeneralizedRCNN (Faster / Mask R-CNN with C4, DC5 or FPN) and its config builder."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from normkit.models.detection.anchors import AnchorGenerator
from normkit.models.detection.box_heads import BoxPredictor
from normkit.models.detection.boxes import check_boxes
from normkit.models.detection.mask_head import MaskHead
from normkit.models.detection.poolers import ROIPooler
from normkit.models import necks  # noqa: F401  (registers the FPN neck)
from normkit.models.registry import BOX_HEADS, NECKS
from normkit.models.detection.roi_heads import ROIHeads
from normkit.models.detection.rpn import RPN
from normkit.models.checkpoint import IGNORABLE_BUFFERS, read_state_dict
from normkit.models.registry import MODELS, build_backbone
from normkit.nn.switch_norm import flatten_official_sn

__all__ = ["GeneralizedRCNN", "build_generalized_rcnn"]

_STAGES = ("res2", "res3", "res4", "res5")


class GeneralizedRCNN(nn.Module):
    """backbone -> (neck) -> proposal generator -> ROI heads.

    ``model(batch)`` takes the detection batch (``images`` Tensor[B, 3, Hp, Wp] normalised and padded,
    ``image_sizes`` / ``orig_sizes`` int64 Tensor[B, 2] (h, w), ``scales`` Tensor[B], ``targets``: list of
    dicts with ``boxes`` Tensor[K, 4] xyxy in resized pixels, ``labels`` int64 0..K-1, ``iscrowd``, ``masks``).
    Training returns ``{"rpn_cls_loss", "rpn_bbox_loss", "cls_loss", "box_reg_loss"[, "mask_loss"]}``; eval
    returns one dict per image with ``boxes`` (original-image xyxy), ``scores``, ``labels`` (0..K-1) and, for
    Mask R-CNN, ``masks`` uint8 Tensor[N, H, W] at the original image size.

    Args:
        backbone: a module mapping images to a dict of named features (a normkit ResNet with ``out_features``;
            its ``freeze_at`` / ``freeze_mode`` decide what is frozen and how frozen norms behave).
        backbone_features: the feature names the rest of the model uses.
        neck: FPN or None. rpn: :class:`RPN`. roi_heads: :class:`ROIHeads`.
    """

    def __init__(self, backbone: nn.Module, backbone_features: Sequence[str], rpn: RPN, roi_heads: ROIHeads, *,
                 neck: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.backbone_features = tuple(backbone_features)
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads

    def features(self, images: Tensor) -> Dict[str, Tensor]:
        """Backbone (and neck) features of a batch of images."""
        feats = self.backbone(images)
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
            # Half a pixel of slack for the rounding of the resized size (w = round(W * scale)). Legacy (+1) boxes
            # are not held to w - 1: scaled by s < 1, a box ending at W - 1 ends at up to w - 1 + 1.5 - s.
            outside = (boxes[:, 0] < -0.5) | (boxes[:, 1] < -0.5) | (boxes[:, 2] > w + 0.5) | (boxes[:, 3] > h + 0.5)
            if bool(outside.any()):
                raise ValueError(f"targets[{i}]['boxes']: {int(outside.sum())} box(es) outside the {int(h)}x{int(w)} "
                                 f"image, e.g. {boxes[outside][0].tolist()}; clip boxes in the data pipeline")

    @torch.no_grad()
    def inspect(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """Every intermediate result of inference on ``batch`` (the model must be in eval mode), for comparing
        stage by stage with another implementation:

        - ``features``: dict of backbone (and FPN) features;
        - ``rpn_logits`` / ``rpn_deltas``: per RPN level, Tensor[B, A, H, W] / Tensor[B, 4A, H, W];
        - ``proposals``: per image Tensor[K_i, 4] in input (resized) pixels, by decreasing objectness;
        - ``box_features``: Tensor[sum K_i, D] box-head output; ``cls_scores``: softmax Tensor[sum K_i, K+1];
          ``box_deltas``: Tensor[sum K_i, 4(K+1)] (``bbox_pred``);
        - ``predictions``: what ``model(batch)`` returns.
        """
        if self.training:
            raise RuntimeError("GeneralizedRCNN.inspect runs inference: call model.eval() first")
        self._check_batch(batch)
        images = batch["images"]
        features = self.features(images)
        logits, deltas = self.rpn.head([features[name] for name in self.rpn.in_features])
        proposals, _ = self.rpn(features, batch["image_sizes"], tuple(images.shape[-2:]), batch["scales"])
        heads = self.roi_heads
        box_features = heads.box_head(heads.box_pooler([features[name] for name in heads.in_features], proposals))
        cls_logits, box_deltas = heads.box_predictor(box_features)
        predictions = heads(features, proposals, batch["image_sizes"], batch["scales"], batch["orig_sizes"])
        return {"features": features, "rpn_logits": logits, "rpn_deltas": deltas, "proposals": proposals,
                "box_features": box_features, "cls_scores": torch.softmax(cls_logits, dim=1),
                "box_deltas": box_deltas, "predictions": predictions}

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
        for r in results:  # masks stay where they were pasted (the CPU for the cv2 paste): full-image maps
            for k, v in r.items():
                if k != "masks":
                    r[k] = v.to(device)
        return results


# -- builder --

def _check_empty(cfg: Mapping, where: str) -> None:
    if cfg:
        raise ValueError(f"unknown keys in config {where}: {sorted(cfg)}")


def _build_backbone(cfg: dict):
    """ResNet body from ``model.backbone``; detection defaults: v1 stem, stride on the 3x3 conv, res4 only."""
    cfg = dict(cfg)
    cfg.setdefault("name", "resnet50")
    cfg.setdefault("out_features", ["res4"])
    cfg.setdefault("stem", "v1")
    cfg.setdefault("stride_in_1x1", False)
    cfg.setdefault("freeze_at", 2)
    pretrained = cfg.pop("pretrained", None)
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    channels = {name: s.channels for name, s in shapes.items()}
    strides = {name: s.stride for name, s in shapes.items()}
    return backbone, tuple(backbone.out_features), channels, strides, pretrained


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
    backbone, bb_features, channels, strides, pretrained = _build_backbone(cfg.pop("backbone"))

    neck_cfg = cfg.pop("neck", None)
    neck = None
    feat_channels, feat_strides = dict(channels), dict(strides)
    if neck_cfg:
        neck_cfg = dict(neck_cfg)
        try:
            neck_cls = NECKS.get(neck_cfg.pop("name", "fpn"))
        except ValueError as exc:
            raise ValueError(f"config model.neck.name: {exc}") from exc
        in_features = tuple(neck_cfg.pop("in_features", bb_features))
        try:
            neck = neck_cls(in_features, [channels[f] for f in in_features], **neck_cfg)
        except TypeError as exc:
            raise ValueError(f"bad keys in config model.neck: {exc}") from exc
        feat_channels = {f: neck.out_channels for f in neck.out_features}
        feat_strides = dict(zip(neck.out_features, neck.out_strides))

    rpn = _build_rpn(dict(cfg.pop("rpn")), feat_channels, feat_strides, legacy)
    roi_heads = _build_roi_heads(dict(cfg.pop("roi_heads")), cfg.pop("mask_head", None), feat_channels,
                                 feat_strides, num_classes, legacy)
    _check_empty(cfg, "model")
    model = GeneralizedRCNN(backbone, bb_features, rpn, roi_heads, neck=neck)
    if pretrained:
        load_backbone_init(model, pretrained)
    return model


def load_backbone_init(model: nn.Module, source) -> None:
    """Loads a detector's initialisation (`tools/convert_checkpoint.py --from sn-imagenet-to-c4|fpn` output, or
    any state dict of ``backbone.*`` and, for C4, ``roi_heads.box_head.res5.*`` tensors): every such tensor of
    the model must be provided with its shape, and nothing else may be."""
    state = flatten_official_sn(read_state_dict(source))
    own = model.state_dict()
    targets = [k for k in own if k.startswith(("backbone.", "roi_heads.box_head.res5."))
               and k.rsplit(".", 1)[-1] not in IGNORABLE_BUFFERS]
    missing = [k for k in targets if k not in state]
    unexpected = [k for k in state if k not in own or not k.startswith(("backbone.", "roi_heads.box_head.res5."))]
    unexpected = [k for k in unexpected if k.rsplit(".", 1)[-1] not in IGNORABLE_BUFFERS]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise RuntimeError("backbone initialisation does not match the detector: "
                           + "; ".join(f"{name} ({len(keys)}): {', '.join(keys[:8])}" for name, keys in
                                       (("missing", missing), ("unexpected", unexpected),
                                        ("shape mismatch", mismatched)) if keys))
    with torch.no_grad():
        for k in targets:
            own[k].copy_(state[k])


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
    try:
        box_head = BOX_HEADS.get(head_name)(channels[in_features[0]], resolution, **box_cfg)
    except ValueError as exc:
        raise ValueError(f"config {where}.box_head.name: {exc}") from exc
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
