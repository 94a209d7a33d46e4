"""Checkpoint converters for the published CSAIL, SN ImageNet, mmseg/CondNet and DeepLab-v2 formats."""
from normkit.convert.common import flatten_official_sn, rename_keys, save_state_dict  # noqa: F401
from normkit.convert.formats import (BACKBONE_FORMATS, CONVERTERS, convert, convert_csail,  # noqa: F401
                                     convert_deeplab_v2, convert_mmseg, convert_sn_imagenet)
from normkit.convert import sn_detectron  # noqa: F401,E402  (adds the sn-detectron formats to CONVERTERS)
