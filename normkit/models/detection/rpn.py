"""Region Proposal Network: a head shared across levels, anchor targets and losses, proposal generation."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.models.detection.anchors import AnchorGenerator
from normkit.models.detection.boxes import BoxCoder, box_iou, clip_boxes, smooth_l1_loss
from normkit.models.registry import PROPOSAL_GENERATORS
from normkit.models.detection.sampling import rpn_anchor_labels
from normkit.ops import nms

__all__ = ["RPNHead", "RPN", "COLLECT_MODES", "CLS_NORMALIZERS"]

COLLECT_MODES = ("per_batch", "per_image")
CLS_NORMALIZERS = ("num_valid", "batch_size")


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then a 1x1 conv giving one objectness logit (sigmoid) per anchor and a 1x1 conv giving
    4 deltas per anchor; the same weights run on every level. No norm (as every Detectron/detectron2 RPN).

    forward(list of Tensor[N, C, H_l, W_l]) -> (logits [Tensor[N, A, H_l, W_l]], deltas [Tensor[N, 4A, H_l, W_l]]),
    the deltas of anchor ``a`` in channels ``4a..4a+3``. Weights are N(0, 0.01), biases 0.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_channels: Optional[int] = None):
        super().__init__()
        conv_channels = conv_channels or in_channels
        self.conv = nn.Conv2d(in_channels, conv_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(conv_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(conv_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


@PROPOSAL_GENERATORS.register("rpn")
class RPN(nn.Module):
    """RPN over one (C4/DC5) or several (FPN P2-P6) feature levels.

    Args:
        in_features: names of the feature levels to use, finest first (e.g. ``("res4",)`` or
            ``("p2", ..., "p6")``).
        in_channels: channels of those features (equal on every level).
        anchor_generator: an :class:`AnchorGenerator` with one entry per level.
        conv_channels: channels of the 3x3 conv (default ``in_channels``).
        pre_nms_topk, post_nms_topk: ``(train, test)`` boxes kept per image and level before NMS, and after
            NMS. With several levels, ``post_nms_topk`` is also the number of proposals collected over levels.
        collect: ``"per_batch"`` (Detectron-1: in training, the top ``post_nms_topk`` over all levels of *all
            images* of the batch) or ``"per_image"`` (detectron2). Inference always collects per image, as
            Detectron-1's one-image test batches do, so the collection does not depend on the evaluation batch.
        nms_thresh: 0.7. ``min_size``: minimum proposal side in original-image pixels (scaled by each image's
            scale; Detectron ``RPN_MIN_SIZE``, default 0).
        batch_size_per_image, positive_fraction, iou_thresholds: anchor sampling (256, 0.5, (0.3, 0.7)).
        bg_with_replacement: Detectron-1 negative sampling (see :func:`rpn_anchor_labels`).
        straddle_thresh: anchors reaching more than this many pixels outside the image are ignored in training;
            negative keeps all (detectron2 ``BOUNDARY_THRESH = -1``).
        smooth_l1_beta: 1/9 (Detectron-1) or 0 (detectron2, L1).
        cls_loss_normalizer: ``"num_valid"`` (Detectron-1 C4: mean over sampled anchors) or ``"batch_size"``
            (Detectron-1 FPN and detectron2: sum / (batch_size_per_image * images)).
        bbox_loss_normalizer: ``"num_valid"`` (Detectron-1: each image's sum divided by its number of sampled
            anchors, averaged over images) or ``"batch_size"`` (detectron2).
        legacy_plus_one: Detectron-1 box convention (widths ``+1``, clip to ``W - 1``, NMS with ``+1``).
        eval_clip_to_padded: at inference, clip and filter proposals with the padded batch size (Detectron-1's
            test ``im_info``) instead of each image's size. Detectron-1 tests one image per batch; in a batch of
            several images the padding is the largest image's, so evaluate with batch size 1 to match it.

    forward(features, image_sizes, padded_size, scales, targets=None) -> (proposals, losses): proposals is a
    list of Tensor[K_i, 4] per image (detached, by decreasing objectness), losses a dict (empty in eval).
    """

    def __init__(self, in_features: Sequence[str], in_channels: int, anchor_generator: AnchorGenerator, *,
                 conv_channels: Optional[int] = None, pre_nms_topk: Tuple[int, int] = (2000, 1000),
                 post_nms_topk: Tuple[int, int] = (2000, 1000), collect: str = "per_batch",
                 nms_thresh: float = 0.7, min_size: float = 0.0, batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5, iou_thresholds: Tuple[float, float] = (0.3, 0.7),
                 bg_with_replacement: bool = True, straddle_thresh: float = 0.0, smooth_l1_beta: float = 1.0 / 9,
                 cls_loss_normalizer: str = "batch_size", bbox_loss_normalizer: str = "num_valid",
                 legacy_plus_one: bool = True, eval_clip_to_padded: bool = True):
        super().__init__()
        if collect not in COLLECT_MODES:
            raise ValueError(f"unknown RPN collect mode {collect!r}; choose one of {', '.join(COLLECT_MODES)}")
        for name, value in (("cls_loss_normalizer", cls_loss_normalizer),
                            ("bbox_loss_normalizer", bbox_loss_normalizer)):
            if value not in CLS_NORMALIZERS:
                raise ValueError(f"unknown RPN {name} {value!r}; choose one of {', '.join(CLS_NORMALIZERS)}")
        num_anchors = set(anchor_generator.num_anchors)
        if len(num_anchors) != 1:
            raise ValueError(f"RPN: every level needs the same number of anchors per position (the head is "
                             f"shared), got {anchor_generator.num_anchors}")
        if len(in_features) != len(anchor_generator.strides):
            raise ValueError(f"RPN: {len(in_features)} in_features but the anchor generator has "
                             f"{len(anchor_generator.strides)} levels")
        self.in_features = tuple(in_features)
        self.anchor_generator = anchor_generator
        self.head = RPNHead(in_channels, num_anchors.pop(), conv_channels)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0), legacy_plus_one=legacy_plus_one)
        self.pre_nms_topk = tuple(pre_nms_topk)
        self.post_nms_topk = tuple(post_nms_topk)
        self.collect = collect
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.iou_thresholds = tuple(iou_thresholds)
        self.bg_with_replacement = bg_with_replacement
        self.straddle_thresh = straddle_thresh
        self.smooth_l1_beta = smooth_l1_beta
        self.cls_loss_normalizer = cls_loss_normalizer
        self.bbox_loss_normalizer = bbox_loss_normalizer
        self.legacy_plus_one = legacy_plus_one
        self.eval_clip_to_padded = eval_clip_to_padded
        self.generator: Optional[torch.Generator] = None  # set for reproducible sampling

    # -- outputs --

    @staticmethod
    def _flatten(logits: List[Tensor], deltas: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """(N, A, H, W) -> (N, H*W*A) and (N, 4A, H, W) -> (N, H*W*A, 4), matching the anchors' (H, W, A) order."""
        flat_logits = [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) for x in logits]
        flat_deltas = []
        for x in deltas:
            n, _, h, w = x.shape
            flat_deltas.append(x.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return flat_logits, flat_deltas

    def forward(self, features: Mapping[str, Tensor], image_sizes: Tensor, padded_size: Tuple[int, int],
                scales: Optional[Tensor] = None, targets: Optional[List[Dict[str, Tensor]]] = None):
        missing = [name for name in self.in_features if name not in features]
        if missing:
            raise ValueError(f"RPN needs features {list(self.in_features)}, missing {missing} (got {list(features)})")
        levels = [features[name] for name in self.in_features]
        anchors = self.anchor_generator([tuple(x.shape[-2:]) for x in levels])
        anchors = [a.to(levels[0].device) for a in anchors]
        logits, deltas = self._flatten(*self.head(levels))
        num_images = levels[0].shape[0]
        if scales is None:
            scales = torch.ones(num_images)
        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN in training mode needs targets")
            losses = self.losses(anchors, logits, deltas, image_sizes, targets)
            sizes = [tuple(int(v) for v in s) for s in image_sizes]
        elif self.eval_clip_to_padded:
            sizes = [tuple(int(v) for v in padded_size)] * num_images
        else:
            sizes = [tuple(int(v) for v in s) for s in image_sizes]
        with torch.no_grad():
            proposals = self.proposals(anchors, [x.detach() for x in logits], [x.detach() for x in deltas], sizes,
                                       [float(s) for s in scales])
        return proposals, losses

    # -- proposals --

    def proposals(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
                  sizes: List[Tuple[int, int]], scales: List[float]) -> List[Tensor]:
        """Detectron-1 ``GenerateProposals`` per image and level, then the FPN collection step."""
        mode = 0 if self.training else 1
        pre_topk, post_topk = self.pre_nms_topk[mode], self.post_nms_topk[mode]
        num_images = logits[0].shape[0]
        boxes_all, scores_all, image_all = [], [], []
        for i in range(num_images):
            for level_anchors, level_logits, level_deltas in zip(anchors, logits, deltas):
                boxes, scores = self._one_level(level_anchors, level_logits[i], level_deltas[i], sizes[i],
                                                scales[i], pre_topk, post_topk)
                boxes_all.append(boxes)
                scores_all.append(scores)
                image_all.append(torch.full_like(scores, i, dtype=torch.int64))
        boxes = torch.cat(boxes_all)
        scores = torch.cat(scores_all)
        image = torch.cat(image_all)
        if len(anchors) > 1:  # collect over levels: the best post_topk of the batch, or of each image
            if self.collect == "per_batch" and self.training:
                order = torch.sort(scores, descending=True, stable=True).indices[:post_topk]
            else:
                order = torch.cat([idx[torch.sort(scores[idx], descending=True, stable=True).indices[:post_topk]]
                                   for idx in (torch.nonzero(image == i).flatten() for i in range(num_images))])
            boxes, image = boxes[order], image[order]
        return [boxes[image == i] for i in range(num_images)]

    def _one_level(self, anchors: Tensor, logits: Tensor, deltas: Tensor, size: Tuple[int, int], scale: float,
                   pre_topk: int, post_topk: int) -> Tuple[Tensor, Tensor]:
        scores = torch.sigmoid(logits)
        order = torch.sort(scores, descending=True, stable=True).indices
        if 0 < pre_topk < scores.numel():
            order = order[:pre_topk]
        scores = scores[order]
        boxes = self.box_coder.decode(anchors[order], deltas[order])
        boxes = clip_boxes(boxes, size, self.legacy_plus_one)
        o = 1.0 if self.legacy_plus_one else 0.0
        ws = boxes[:, 2] - boxes[:, 0] + o
        hs = boxes[:, 3] - boxes[:, 1] + o
        min_size = self.min_size * scale
        keep = (ws >= min_size) & (hs >= min_size)
        if self.legacy_plus_one:  # Detectron-1 also drops boxes whose centre left the image
            keep &= (boxes[:, 0] + ws / 2 < size[1]) & (boxes[:, 1] + hs / 2 < size[0])
        else:
            keep &= (ws > 0) & (hs > 0)
        boxes, scores = boxes[keep], scores[keep]
        if self.nms_thresh > 0:
            kept = nms(boxes, scores, self.nms_thresh, offset=int(self.legacy_plus_one))
            if post_topk > 0:
                kept = kept[:post_topk]
            boxes, scores = boxes[kept], scores[kept]
        return boxes, scores

    # -- training --

    def losses(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor], image_sizes: Tensor,
               targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        num_images = logits[0].shape[0]
        all_anchors = torch.cat(anchors)
        all_logits = torch.cat(logits, dim=1)
        all_deltas = torch.cat(deltas, dim=1)
        labels, box_targets, weights = [], [], []
        for i in range(num_images):
            gt = targets[i]["boxes"]
            crowd = targets[i].get("iscrowd")
            if crowd is not None and crowd.numel():
                gt = gt[~crowd.bool()]
            if gt.shape[0] == 0:
                raise ValueError(f"RPN training: image {i} of the batch has no non-crowd ground-truth boxes; "
                                 f"Detectron-1 trains only on images with annotations (filter empty images in "
                                 f"the data loader)")
            h, w = (float(v) for v in image_sizes[i])
            t = self.straddle_thresh
            if t >= 0:
                inside = ((all_anchors[:, 0] >= -t) & (all_anchors[:, 1] >= -t) &
                          (all_anchors[:, 2] < w + t) & (all_anchors[:, 3] < h + t))
            else:
                inside = torch.ones(all_anchors.shape[0], dtype=torch.bool, device=all_anchors.device)
            inside_idx = torch.nonzero(inside).flatten()
            img_labels = torch.full((all_anchors.shape[0],), -1, dtype=torch.int64, device=all_anchors.device)
            img_targets = torch.zeros_like(all_anchors)
            img_weight = torch.zeros(all_anchors.shape[0], device=all_anchors.device)
            if inside_idx.numel():
                anchors_in = all_anchors[inside_idx]
                iou = box_iou(gt.to(anchors_in.dtype), anchors_in, self.legacy_plus_one)
                lab, matched = rpn_anchor_labels(iou, self.batch_size_per_image, self.positive_fraction,
                                                 self.iou_thresholds[1], self.iou_thresholds[0],
                                                 self.bg_with_replacement, self.generator)
                img_labels[inside_idx] = lab
                fg = inside_idx[lab == 1]
                img_targets[fg] = self.box_coder.encode(all_anchors[fg], gt[matched[lab == 1]].to(anchors_in.dtype))
                num_valid = int((lab >= 0).sum())
                if num_valid:
                    img_weight[fg] = 1.0 / num_valid
            labels.append(img_labels)
            box_targets.append(img_targets)
            weights.append(img_weight)
        labels = torch.stack(labels)
        box_targets = torch.stack(box_targets)
        weights = torch.stack(weights)
        valid = labels >= 0
        cls = F.binary_cross_entropy_with_logits(all_logits[valid], labels[valid].to(all_logits.dtype),
                                                 reduction="sum")
        if self.cls_loss_normalizer == "num_valid":
            cls = cls / valid.sum().clamp(min=1)
        else:
            cls = cls / (self.batch_size_per_image * num_images)
        fg = labels == 1
        box = smooth_l1_loss(all_deltas[fg], box_targets[fg], self.smooth_l1_beta).sum(dim=1)
        if self.bbox_loss_normalizer == "num_valid":
            box = (box * weights[fg]).sum() / num_images
        else:
            box = box.sum() / (self.batch_size_per_image * num_images)
        return {"rpn_cls_loss": cls, "rpn_bbox_loss": box}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, pre_nms_topk={self.pre_nms_topk}, "
                f"post_nms_topk={self.post_nms_topk}, collect={self.collect!r}, nms_thresh={self.nms_thresh}, "
                f"legacy_plus_one={self.legacy_plus_one}")
