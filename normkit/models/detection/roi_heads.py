"""ROI heads: RoI sampling, box (and mask) heads, their losses, and inference post-processing."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.models.detection.box_heads import BoxPredictor
from normkit.models.detection.boxes import BoxCoder, box_iou, clip_boxes, smooth_l1_loss
from normkit.models.detection.mask_head import (PASTE_MODES, paste_masks_detectron, paste_masks_grid_sample,
                                                polygons_bounding_box, polygons_to_mask_in_box,
                                                bitmap_to_mask_in_box)
from normkit.models.detection.poolers import ROIPooler
from normkit.models.registry import ROI_HEADS
from normkit.models.detection.sampling import sample_rois
from normkit.ops import batched_nms, nms

__all__ = ["ROIHeads"]


@ROI_HEADS.register("standard")
class ROIHeads(nn.Module):
    """Box head (and optional mask head) on RoIs pooled from named feature levels.

    Args:
        in_features: feature names to pool boxes from, finest first (``("res4",)`` for C4, ``("p2", ..., "p5")``).
        box_pooler, box_head: a :class:`ROIPooler` and a head mapping its output to Tensor[K, D] (the C4
            ``Res5BoxHead`` or a ``FastRCNNConvFCHead``).
        box_predictor: :class:`BoxPredictor` for ``num_classes`` foreground classes.
        mask_pooler, mask_head: optional (Mask R-CNN), pooling from ``mask_in_features`` (default ``in_features``).
        batch_size_per_image, positive_fraction, fg_iou_threshold, bg_iou_threshold_lo: RoI sampling (512, 0.25,
            0.5, 0.0); foreground and background drawn without replacement. The ground-truth boxes are added to the
            candidates (``proposal_append_gt``); crowd boxes get overlap -1 and are never sampled.
        bbox_reg_weights: (10, 10, 5, 5). ``smooth_l1_beta``: 1.0 (Detectron-1), 0 (detectron2, L1).
        legacy_plus_one: Detectron-1 conventions: ``+1`` widths, IoUs and regression targets computed in original
            image coordinates (as Detectron's roidb), boxes decoded in original coordinates, per-class results
            cut at the 100th score (``>=``), masks pasted the Detectron way.
        score_thresh, nms_thresh, detections_per_image: 0.05, 0.5, 100.
        mask_paste: ``"cv2"`` (Detectron-1 ``segm_results``) or ``"grid_sample"`` (detectron2).
        mask_threshold: 0.5.

    In training, forward returns ``cls_loss`` (cross-entropy, mean over sampled RoIs), ``box_reg_loss``
    (smooth-L1 summed over the 4 coordinates of the ground-truth class / number of sampled RoIs) and
    ``mask_loss`` (per-pixel BCE of the ground-truth class's map, mean over foreground RoIs and pixels); in
    eval, a list of per-image prediction dicts in original-image coordinates.
    """

    def __init__(self, in_features: Sequence[str], box_pooler: ROIPooler, box_head: nn.Module,
                 box_predictor: BoxPredictor, *, mask_pooler: Optional[ROIPooler] = None,
                 mask_head: Optional[nn.Module] = None, mask_in_features: Optional[Sequence[str]] = None,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, fg_iou_threshold: float = 0.5,
                 bg_iou_threshold_lo: float = 0.0, proposal_append_gt: bool = True,
                 bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), smooth_l1_beta: float = 1.0,
                 legacy_plus_one: bool = True, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_image: int = 100, mask_paste: str = "cv2", mask_threshold: float = 0.5):
        super().__init__()
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError("ROIHeads: give both mask_pooler and mask_head, or neither")
        if mask_paste not in PASTE_MODES:
            raise ValueError(f"unknown mask_paste {mask_paste!r}; choose one of {', '.join(PASTE_MODES)}")
        self.in_features = tuple(in_features)
        self.mask_in_features = tuple(mask_in_features or in_features)
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.num_classes = box_predictor.num_classes
        self.background_first = box_predictor.background == "first"
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.fg_iou_threshold = fg_iou_threshold
        self.bg_iou_threshold_lo = bg_iou_threshold_lo
        self.proposal_append_gt = proposal_append_gt
        self.box_coder = BoxCoder(bbox_reg_weights, legacy_plus_one=legacy_plus_one)
        self.smooth_l1_beta = smooth_l1_beta
        self.legacy_plus_one = legacy_plus_one
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.mask_paste = mask_paste
        self.mask_threshold = mask_threshold
        self.generator: Optional[torch.Generator] = None

    @property
    def mask_on(self) -> bool:
        return self.mask_head is not None

    # -- label conventions --

    def _model_label(self, labels: Tensor) -> Tensor:
        """Contiguous foreground labels 0..K-1 -> the predictor's indices (Detectron-1: +1)."""
        return labels + 1 if self.background_first else labels

    @property
    def _bg_label(self) -> int:
        return 0 if self.background_first else self.num_classes

    # -- training --

    def _sample_image(self, proposals: Tensor, target: Mapping[str, Tensor], scale: float):
        gt = target["boxes"].to(proposals.dtype)
        classes = self._model_label(target["labels"].to(torch.int64))
        crowd = target.get("iscrowd")
        crowd = torch.zeros(gt.shape[0], dtype=torch.bool, device=gt.device) if crowd is None else crowd.bool()
        # Detectron-1 keeps boxes in original-image coordinates in its roidb; IoUs and targets are taken there.
        frame = scale if self.legacy_plus_one else 1.0
        gt_f, prop_f = gt / frame, proposals / frame
        if self.proposal_append_gt:
            cand_f, cand = torch.cat((gt_f, prop_f)), torch.cat((gt, proposals))
            num_gt = gt.shape[0]
        else:
            cand_f, cand, num_gt = prop_f, proposals, 0
        max_ov = torch.zeros(cand.shape[0], dtype=cand.dtype, device=cand.device)
        max_cls = torch.full((cand.shape[0],), self._bg_label, dtype=torch.int64, device=cand.device)
        max_gt = torch.zeros(cand.shape[0], dtype=torch.int64, device=cand.device)  # SND's box_to_gt_ind_map
        if num_gt:
            max_ov[:num_gt] = torch.where(crowd, -1.0, 1.0).to(cand.dtype)
            max_cls[:num_gt] = classes
            max_gt[:num_gt] = torch.arange(num_gt, device=cand.device)
        if prop_f.shape[0] and gt.shape[0]:
            best, arg = box_iou(prop_f, gt_f, self.legacy_plus_one).max(dim=1)
            hit = best > 0
            max_ov[num_gt:] = torch.where(hit, best, torch.zeros_like(best))
            max_cls[num_gt:] = torch.where(hit, classes[arg], torch.full_like(arg, self._bg_label))
            max_gt[num_gt:] = arg
        fg, bg = sample_rois(max_ov, self.batch_size_per_image, self.positive_fraction, self.fg_iou_threshold,
                             self.fg_iou_threshold, self.bg_iou_threshold_lo, self.generator)
        keep = torch.cat((fg, bg))
        labels = max_cls[keep].clone()
        labels[fg.numel():] = self._bg_label
        reg_targets = torch.zeros((keep.numel(), 4), dtype=cand.dtype, device=cand.device)
        if fg.numel():
            # SN-Detectron (Detectron.pytorch) regresses toward the ground truth that gave the label, a crowd
            # box included: its per-batch roidb has no precomputed bbox_targets, so _sample_rois encodes against
            # box_to_gt_ind_map. (Caffe2 Detectron's precomputed targets use the best non-crowd box instead.)
            reg_targets[:fg.numel()] = self.box_coder.encode(cand_f[fg], gt_f[max_gt[fg]])
        return cand[keep], labels, reg_targets, fg.numel(), cand_f[fg]

    def _mask_targets(self, rois_f: Tensor, target: Mapping, scale: float, size: int) -> Tensor:
        """Targets of one image's foreground RoIs (``rois_f`` in the sampling frame)."""
        if rois_f.shape[0] == 0:
            return rois_f.new_zeros((0, size, size))
        if "masks" not in target:
            raise ValueError("a Mask R-CNN training batch needs targets[i]['masks'] (polygons or bitmaps)")
        crowd = target.get("iscrowd")
        keep = range(len(target["masks"])) if crowd is None else torch.nonzero(~crowd.bool()).flatten().tolist()
        instances = [target["masks"][k] for k in keep]
        boxes = target["boxes"][list(keep)]
        frame = scale if self.legacy_plus_one else 1.0
        tight = []
        for inst, box in zip(instances, boxes):
            if isinstance(inst, (list, tuple)):
                tight.append(polygons_bounding_box(inst).to(rois_f) / frame)
            else:
                tight.append(box.to(rois_f) / frame)
        # Detectron-1: each RoI takes the instance whose polygons' tight box overlaps it most.
        matched = box_iou(rois_f, torch.stack(tight), self.legacy_plus_one).argmax(dim=1)
        out = []
        for roi, index in zip(rois_f, matched.tolist()):
            inst = instances[index]
            if isinstance(inst, (list, tuple)):
                out.append(polygons_to_mask_in_box([p / frame for p in inst], roi.tolist(), size))
            else:
                out.append(bitmap_to_mask_in_box(inst, roi * frame, size).cpu())
        return torch.stack(out).to(rois_f.device)

    def forward(self, features: Mapping[str, Tensor], proposals: List[Tensor], image_sizes: Tensor,
                scales: Tensor, orig_sizes: Tensor, targets: Optional[List[Mapping]] = None):
        if self.training:
            if targets is None:
                raise ValueError("ROIHeads in training mode needs targets")
            return self._forward_train(features, proposals, scales, targets)
        return self._forward_eval(features, proposals, scales, orig_sizes)

    def _forward_train(self, features, proposals, scales, targets) -> Dict[str, Tensor]:
        rois, labels, reg_targets, fg_rois, fg_rois_f, fg_counts = [], [], [], [], [], []
        for i, (props, target) in enumerate(zip(proposals, targets)):
            r, lab, reg, num_fg, rois_f = self._sample_image(props.detach(), target, float(scales[i]))
            rois.append(r)
            labels.append(lab)
            reg_targets.append(reg)
            fg_rois.append(r[:num_fg])
            fg_rois_f.append(rois_f)
            fg_counts.append(num_fg)
        if sum(r.shape[0] for r in rois) == 0:
            raise ValueError("ROIHeads: no RoIs to train on (no proposals and no ground-truth boxes in the batch)")
        levels = [features[name] for name in self.in_features]
        cls_logits, deltas = self.box_predictor(self.box_head(self.box_pooler(levels, rois)))
        labels_all = torch.cat(labels)
        reg_all = torch.cat(reg_targets)
        cls_loss = F.cross_entropy(cls_logits, labels_all)
        fg_mask = torch.cat([torch.arange(lab.numel(), device=lab.device) < n for lab, n in zip(labels, fg_counts)])
        fg_idx = torch.nonzero(fg_mask).flatten()
        # the 4-delta block of each foreground label (Detectron-1's bbox_pred keeps a background block at 0)
        pred = deltas.view(deltas.shape[0], deltas.shape[1] // 4, 4)[fg_idx, labels_all[fg_idx]]
        loss_box = smooth_l1_loss(pred, reg_all[fg_idx], self.smooth_l1_beta).sum() / max(labels_all.numel(), 1)
        losses = {"cls_loss": cls_loss, "box_reg_loss": loss_box}
        if self.mask_on:
            losses["mask_loss"] = self._mask_loss(features, fg_rois, fg_rois_f, labels, fg_counts, scales, targets)
        return losses

    def _mask_loss(self, features, fg_rois, fg_rois_f, labels, fg_counts, scales, targets) -> Tensor:
        size = self.mask_pooler.output_size * 2
        levels = [features[name] for name in self.mask_in_features]
        logits = self.mask_head(self.mask_pooler(levels, fg_rois))
        if sum(fg_counts) == 0:
            # No foreground RoI in this process's batch (possible with proposal_append_gt=False). The head still ran,
            # on no RoIs: with SyncSwitchNorm the other ranks wait for its collectives, forward and backward. The
            # zero loss keeps its output and every parameter in the graph.
            return logits.sum() * 0.0 + sum(p.sum() for p in self.mask_head.parameters()) * 0.0
        mask_targets = torch.cat([self._mask_targets(rf, t, float(s), size)
                                  for rf, t, s in zip(fg_rois_f, targets, scales)])
        fg_labels = torch.cat([lab[:n] for lab, n in zip(labels, fg_counts)])
        logits = logits[torch.arange(logits.shape[0], device=logits.device), fg_labels]
        return F.binary_cross_entropy_with_logits(logits, mask_targets.to(logits.dtype), reduction="mean")

    # -- inference --

    def _forward_eval(self, features, proposals, scales, orig_sizes) -> List[Dict[str, Tensor]]:
        levels = [features[name] for name in self.in_features]
        counts = [p.shape[0] for p in proposals]
        if sum(counts):
            cls_logits, deltas = self.box_predictor(self.box_head(self.box_pooler(levels, proposals)))
            probs = F.softmax(cls_logits, dim=1)
        else:
            device = levels[0].device
            probs = torch.zeros((0, self.num_classes + 1), device=device)
            deltas = torch.zeros((0, self.box_predictor.bbox_pred.out_features), device=device)
        results = []
        for i, (p, d, props) in enumerate(zip(probs.split(counts), deltas.split(counts), proposals)):
            scale = float(scales[i])
            size = tuple(int(v) for v in orig_sizes[i])
            boxes = self.box_coder.decode(props / scale, d)  # in original-image coordinates
            boxes = clip_boxes(boxes, size, self.legacy_plus_one)
            results.append(self._postprocess(p, boxes, size))
        if self.mask_on:
            self._predict_masks(features, results, scales, orig_sizes)
        return results

    def _postprocess(self, probs: Tensor, boxes: Tensor, size: Tuple[int, int]) -> Dict[str, Tensor]:
        k = self.num_classes
        fg_cols = range(1, k + 1) if self.background_first else range(k)
        box_cols = list(fg_cols) if self.background_first else list(range(k))
        boxes = boxes.view(boxes.shape[0], boxes.shape[1] // 4, 4)
        all_boxes, all_scores, all_labels = [], [], []
        offset = int(self.legacy_plus_one)
        if self.legacy_plus_one:
            # Detectron-1 box_results_with_nms_and_limit: NMS per class, then keep scores >= the 100th best.
            for label, (col, bcol) in enumerate(zip(fg_cols, box_cols)):
                idx = torch.nonzero(probs[:, col] > self.score_thresh).flatten()
                if idx.numel() == 0:
                    continue
                s, b = probs[idx, col], boxes[idx, bcol]
                kept = nms(b, s, self.nms_thresh, offset=offset)
                all_boxes.append(b[kept])
                all_scores.append(s[kept])
                all_labels.append(torch.full((kept.numel(),), label, dtype=torch.int64, device=s.device))
            if all_scores:
                boxes_out, scores_out, labels_out = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
                if scores_out.numel() > self.detections_per_image > 0:
                    thresh = torch.sort(scores_out).values[-self.detections_per_image]
                    keep = scores_out >= thresh
                    boxes_out, scores_out, labels_out = boxes_out[keep], scores_out[keep], labels_out[keep]
            else:
                boxes_out = boxes.new_zeros((0, 4))
                scores_out = probs.new_zeros((0,))
                labels_out = torch.zeros((0,), dtype=torch.int64, device=probs.device)
        else:
            cls_probs = probs[:, list(fg_cols)]
            cand = torch.nonzero(cls_probs > self.score_thresh)
            b = boxes[cand[:, 0], torch.tensor(box_cols, device=boxes.device)[cand[:, 1]]]
            s = cls_probs[cand[:, 0], cand[:, 1]]
            kept = batched_nms(b, s, cand[:, 1], self.nms_thresh)[: self.detections_per_image]
            boxes_out, scores_out, labels_out = b[kept], s[kept], cand[kept, 1]
        return {"boxes": boxes_out.to(torch.float32), "scores": scores_out.to(torch.float32),
                "labels": labels_out}

    def _predict_masks(self, features, results, scales, orig_sizes) -> None:
        levels = [features[name] for name in self.mask_in_features]
        # Detectron-1 scales the final boxes back to the input in float64 before casting to float32
        rois = [(r["boxes"].double() * float(s)).to(r["boxes"].dtype) for r, s in zip(results, scales)]
        counts = [r.shape[0] for r in rois]
        if sum(counts):
            logits = self.mask_head(self.mask_pooler(levels, rois))
            labels = torch.cat([self._model_label(r["labels"]) for r in results])
            probs = torch.sigmoid(logits[torch.arange(logits.shape[0], device=logits.device), labels])
        else:
            probs = levels[0].new_zeros((0, 1, 1))
        paste = paste_masks_detectron if self.mask_paste == "cv2" else paste_masks_grid_sample
        for r, p, size in zip(results, probs.split(counts), orig_sizes):
            size = tuple(int(v) for v in size)
            r["masks"] = paste(p, r["boxes"], size, self.mask_threshold)  # cv2: on the CPU
