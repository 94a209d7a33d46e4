"""nn.Modules over normkit's operators."""

# -- Normalization --
from normkit.nn.switch_norm import (  # noqa: F401
    SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm, convert_sync_switchnorm)
from normkit.nn.norm import (  # noqa: F401
    FrozenBatchNorm2d, NORM_NAMES, NORM_TYPES, build_norm, is_norm_layer, recompute_batch_stats)

# -- Conv building blocks --
from normkit.nn.blocks import ConvModule, ConvNormAct, DepthwiseSeparableConvModule, conv2d  # noqa: F401

# -- ROI ops --
from normkit.nn.roi_ops import MultiScaleRoIAlign, RoIAlign, RoIPool, assign_boxes_to_levels  # noqa: F401

# -- Conditional classifier --
from normkit.nn.cond_classifier import ConditionalClassifier  # noqa: F401
from normkit.nn.losses import DiceLoss, dice_loss  # noqa: F401

