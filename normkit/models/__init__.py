"""Models: backbones, necks, segmentation and detection models, one registry per kind, and build_model(config)."""
from normkit.models.backbones import ResNet  # noqa: F401
from normkit.models.build import build_model, read_config  # noqa: F401
from normkit.models.checkpoint import load_state_dict_strict  # noqa: F401
from normkit.models.registry import (  # noqa: F401
    BACKBONES, BOX_HEADS, MODELS, NECKS, PROPOSAL_GENERATORS, ROI_HEADS, SEG_HEADS, build_backbone, build_head)
from normkit.models.segmentation import SegmentationModel  # noqa: F401
from normkit.models.detection import GeneralizedRCNN  # noqa: F401
