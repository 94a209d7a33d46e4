"""Models: ResNet backbones, segmentation heads and models, the registry and build_model(config)."""
from normkit.models.backbones import ResNet  # noqa: F401
from normkit.models.build import build_backbone, build_head, build_model, load_config  # noqa: F401
from normkit.models.checkpoint import load_state_dict_strict  # noqa: F401
from normkit.models.registry import BACKBONES, HEADS, MODELS  # noqa: F401
from normkit.models.segmentation import SegmentationModel  # noqa: F401
from normkit.models import detection  # noqa: F401,E402  (registers generalized_rcnn)
