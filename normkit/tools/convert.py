"""Convert a published checkpoint to normkit's layout.

    normkit-convert --from csail encoder_epoch_20.pth decoder_epoch_20.pth \
        --out r50d8_ppm_deepsup.pth --config csail/r50d8_ppm_deepsup

Formats: csail (encoder + decoder files), sn-imagenet, resnet-imagenet (any torchvision-layout ImageNet
ResNet, e.g. CSAIL's resnet50-imagenet.pth), mmcv-resnet-v1c (mmcv's ImageNet ResNetV1c), mmseg (CondNet), deeplab-v2, sn-detectron (SN-Detectron
Faster/Mask R-CNN checkpoints), sn-imagenet-to-c4 / sn-imagenet-to-fpn (SN ImageNet ResNets as detection
backbones; C4 puts layer4 into the res5 box head). Inputs are read with
torch.load(weights_only=True). With --config the result is loaded strictly into that config's model
before it is written, so missing/unexpected keys and shape mismatches are reported up front.
"""
import argparse
import logging
from pathlib import Path

from normkit.convert import CONVERTERS, convert, save_state_dict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source_format", required=True, choices=sorted(CONVERTERS),
                        help="layout of the input checkpoint(s)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="input checkpoint file(s)")
    parser.add_argument("--out", required=True, help="output .pth (a plain state dict)")
    parser.add_argument("--config", help="config (YAML path or shipped name) whose model must load the result strictly")
    parser.add_argument("--quiet", action="store_true", help="do not log each rename")
    args = parser.parse_args(argv)
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory; give the path of the .pth file to write")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    state = convert(args.source_format, args.inputs)
    if args.config:
        from normkit.models import build_model
        build_model(args.config, checkpoint=state)
    save_state_dict(state, args.out)
    print(f"wrote {len(state)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
