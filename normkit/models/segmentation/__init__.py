"""Segmentation heads and models: CSAIL decoders, DeepLab v2, CondNet heads, SegmentationModel."""
from normkit.models.segmentation.csail_decoders import C1, C1DeepSup, PPM, PPMDeepSup, UPerNet  # noqa: F401
from normkit.models.segmentation.condnet import CondASPPHead, CondDepthwiseSeparableASPPHead, FCNHead  # noqa: F401,E501
from normkit.models.segmentation.deeplab_v2 import ASPPSumHead, DeepLabV2  # noqa: F401
from normkit.models.segmentation.encoder_decoder import SegmentationModel  # noqa: F401
