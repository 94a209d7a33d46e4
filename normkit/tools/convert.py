"""Convert a published checkpoint to normkit's layout.

    normkit-convert --from csail encoder_epoch_20.pth decoder_epoch_20.pth \
        --out r50d8_ppm_deepsup.pth --config csail/r50d8_ppm_deepsup

Formats: csail (encoder + decoder files), sn-imagenet, resnet-imagenet (any torchvision-layout ImageNet
ResNet, e.g. CSAIL's resnet50-imagenet.pth), mmcv-resnet-v1c (mmcv's ImageNet ResNetV1c), mmseg (CondNet),
deeplab-v2, sn-detectron (SN-Detectron Faster/Mask R-CNN checkpoints), sn-imagenet-to-c4 / sn-imagenet-to-fpn
(SN ImageNet ResNets as detection backbones, from the official SN ImageNet layout or the Detectron.pytorch
layout of SN-Detectron's released resnet-sn-50-* files; C4 puts layer4/res5 into the res5 box head). Inputs
are read with torch.load(weights_only=True). With --config the result is checked against that config's model
before it is written, so missing/unexpected keys and shape mismatches are reported up front: whole-model
formats load strictly into the model; backbone-initialisation formats (sn-imagenet, resnet-imagenet,
mmcv-resnet-v1c, sn-imagenet-to-c4/fpn) load the way the config's model.backbone.pretrained would.
"""
import argparse
import logging
from pathlib import Path
from typing import Mapping

from normkit.convert import BACKBONE_FORMATS, CONVERTERS, convert, save_state_dict


def check_backbone_init(config, state: Mapping) -> None:
    """Load ``state`` into the model of ``config`` as its ``model.backbone.pretrained`` would be loaded, with
    the loader the model builder uses: detectors take ``backbone.*`` (and, for C4, the res5 box head) through
    :func:`~normkit.models.detection.rcnn.load_backbone_init`; every other model passes its backbone (a
    ``resnet`` classifier is its own backbone) to :func:`~normkit.models.checkpoint.load_pretrained_backbone`.
    Raises RuntimeError naming the missing, unexpected and mis-shaped keys."""
    from normkit.models import GeneralizedRCNN, build_model, read_config
    from normkit.models.build import drop_backbone_pretrained
    from normkit.models.checkpoint import load_pretrained_backbone
    from normkit.models.detection.rcnn import load_backbone_init

    cfg = read_config(config)
    if isinstance(cfg.get("model"), Mapping):  # the file the config names must not be read: `state` replaces it
        drop_backbone_pretrained(cfg["model"])
    model = build_model(cfg)
    if isinstance(model, GeneralizedRCNN):
        load_backbone_init(model, state)
    else:
        backbone = getattr(model, "backbone", None)
        load_pretrained_backbone(model if backbone is None else backbone, state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source_format", required=True, choices=sorted(CONVERTERS),
                        help="layout of the input checkpoint(s)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="input checkpoint file(s)")
    parser.add_argument("--out", required=True, help="output .pth (a plain state dict)")
    parser.add_argument("--config", help="config (YAML path or shipped name) whose model must load the result: "
                        "strictly as a whole model, or as model.backbone.pretrained for backbone-initialisation "
                        f"formats ({', '.join(sorted(BACKBONE_FORMATS))})")
    parser.add_argument("--quiet", action="store_true", help="do not log each rename")
    args = parser.parse_args(argv)
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory; give the path of the .pth file to write")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    state = convert(args.source_format, args.inputs)
    if args.config and args.source_format in BACKBONE_FORMATS:
        check_backbone_init(args.config, state)
    elif args.config:
        from normkit.models import build_model
        build_model(args.config, checkpoint=state)
    save_state_dict(state, args.out)
    print(f"wrote {len(state)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
