"""Two-stage detectors: Faster R-CNN (C4, DC5, FPN) and Mask R-CNN (FPN) built from small registered parts.

Importing this package registers ``generalized_rcnn`` with :func:`normkit.models.build_model`.
"""
from normkit.models.detection.anchors import AnchorGenerator, d2_cell_anchors, detectron_cell_anchors  # noqa: F401
from normkit.models.detection.box_heads import BoxPredictor, FastRCNNConvFCHead, Res5BoxHead  # noqa: F401
from normkit.models.detection.boxes import BoxCoder, box_area, box_iou, clip_boxes, smooth_l1_loss  # noqa: F401
from normkit.models.detection.mask_head import (MaskHead, paste_masks_detectron,  # noqa: F401
                                                paste_masks_grid_sample, polygons_to_mask_in_box)
from normkit.models.detection.poolers import ROIPooler, assign_fpn_levels  # noqa: F401
from normkit.models.detection.rcnn import GeneralizedRCNN, build_generalized_rcnn  # noqa: F401
from normkit.models.detection.roi_heads import ROIHeads  # noqa: F401
from normkit.models.detection.rpn import RPN, RPNHead  # noqa: F401
from normkit.models.detection.sampling import Matcher, rpn_anchor_labels, sample_rois, subsample_labels  # noqa: F401
