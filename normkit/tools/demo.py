"""Segment one image or every image in a folder; print the classes found and write colour overlays.
Detection configs (COCO data) draw boxes, class names, scores and mask overlays instead.

    normkit-demo --config CFG --checkpoint CKPT --image IMG_OR_DIR [--out OUT] [--scales ...] [--flip]
                 [--score-threshold 0.5]     (detection: the lowest score drawn)

OUT: a .png/.jpg file for a single image, otherwise a folder receiving <image name>.png per image
(default: demo_out/), which must not be the input (an input image is never overwritten).

Segmentation runs, for each image, the inference normkit-test evaluates with: SegmentationInference built from
the config's `evaluation:` section (test sizes from short_sides / max_long_side / size_multiple and scales,
image_resize, flip, whole or slide mode, pad_to, logits_resize), with --scales and --flip applied as normkit-test
applies them, on the batch the val loader would make of the image.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import normkit
from normkit.data.base import read_image
from normkit.data.build import resolve_class_names, segmentation_normalizer
from normkit.data.detection import coco_inference_batch
from normkit.engine import move_to_device
from normkit.evaluation import SegmentationInference, overlay
from normkit.evaluation.det_visualize import draw_detections
from normkit.tools.cli import add_config_arguments, load_run_config
from normkit.tools.tasks import DetectionTask, task_for
from normkit.tools.test import evaluation_config as test_evaluation_config
from normkit.tools.test import positive_float

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def opacity(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image", required=True, help="an image file or a folder of images")
    parser.add_argument("--out", default="demo_out", help="output .png for one image, else a folder")
    parser.add_argument("--scales", type=positive_float, nargs="+",
                        help="test scales, > 0, multiplying the config's test sizes as normkit-test does "
                             "(default: evaluation.scales, or 1.0)")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    parser.add_argument("--alpha", type=opacity, default=0.5, help="overlay opacity in [0, 1]")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="detection: lowest score drawn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            return images
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
    raise FileNotFoundError(f"image or folder not found: {path}")


def output_paths(images: list[Path], out: Path) -> list[Path]:
    """`out` itself for one image and an image file name, else `out/<stem>.png` per image; images that share a
    stem (a.jpg and a.png) keep their whole name (a.jpg.png, a.png.png), so no overlay replaces another."""
    if len(images) == 1 and out.suffix.lower() in IMAGE_SUFFIXES:
        return [out]
    stems = Counter(p.stem for p in images)
    return [out / f"{p.stem if stems[p.stem] == 1 else p.name}.png" for p in images]


def refuse_overwriting_inputs(images: list[Path], outputs: list[Path], image_arg: Path, out: Path) -> None:
    """The overlays must never replace an input image, nor land in the input folder (a later run would take
    them for inputs)."""
    inputs = {p.resolve() for p in images}
    clashes = [o for o in outputs if o.resolve() in inputs]
    if clashes or (image_arg.is_dir() and out.resolve() == image_arg.resolve()):
        what = ", ".join(map(str, clashes[:3])) or "the input folder"
        raise ValueError(f"--out {out} would overwrite or mix with the input images ({what}); choose another --out")


def evaluation_config(cfg: dict, args: argparse.Namespace) -> dict:
    """The config's `evaluation:` section with the demo's --scales and --flip applied by normkit-test's own rule
    (so --scales multiplies short_sides there and here), checked by the config's task before the checkpoint is
    loaded (detection has no test scales or flips: they are errors there, as in normkit-test); show_dir is
    dropped: it asks the evaluator for image | prediction | label panels, and the demo has no labels."""
    test_args = argparse.Namespace(scales=args.scales, flip=args.flip, mode=None, crop_size=None, stride=None,
                                   show_dir=None)
    eval_cfg = test_evaluation_config(cfg, test_args)
    eval_cfg.pop("show_dir", None)
    task_for(cfg).check_eval_config(eval_cfg)
    return eval_cfg


def image_batch(image: np.ndarray, name: str, normalizer) -> dict:
    """One image as build_val_loader batches a val image, without the label: {"images": [1, 3, H, W],
    "images_uint8": uint8 RGB [1, H, W, 3], "meta": {"names", "ori_sizes"}}. SegmentationInference resizes
    the uint8 image to each test size (as evaluation does), so both must be there."""
    return {"images": normalizer.to_tensor(image)[None], "images_uint8": torch.from_numpy(image)[None],
            "meta": {"names": [name], "ori_sizes": [(image.shape[0], image.shape[1])]}}


def describe(pred: np.ndarray, class_names) -> str:
    """Classes found, by area: "wall 41.2%, floor 30.0%, ..."."""
    counts = np.bincount(pred.ravel(), minlength=len(class_names))
    order = np.argsort(-counts, kind="stable")
    return ", ".join(f"{class_names[k]} {100 * counts[k] / pred.size:.1f}%" for k in order if counts[k])


def detect(args: argparse.Namespace, cfg: dict, images: list[Path], outputs: list[Path]) -> dict[str, dict]:
    """Detection configs: each image's predictions (original pixels) drawn with draw_detections."""
    class_names = resolve_class_names(cfg["data"])
    model = normkit.build_model(cfg, checkpoint=args.checkpoint).to(args.device).eval()
    predictions = {}
    for image_path, out_path in zip(images, outputs):
        image = read_image(image_path)
        with torch.no_grad():
            prediction = model(move_to_device(coco_inference_batch(image, cfg["data"]), args.device))[0]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        drawn = draw_detections(image, prediction, class_names, args.score_threshold, args.alpha)
        Image.fromarray(drawn).save(out_path)
        shown = [f"{class_names[int(label)]} {float(score):.2f}"
                 for label, score in zip(prediction["labels"], prediction["scores"]) if score >= args.score_threshold]
        print(f"{image_path.name}: {', '.join(shown) or 'nothing'} -> {out_path}", flush=True)
        predictions[image_path.name] = prediction
    return predictions


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_run_config(args)
    images = list_images(Path(args.image))
    outputs = output_paths(images, Path(args.out))
    refuse_overwriting_inputs(images, outputs, Path(args.image), Path(args.out))
    eval_cfg = evaluation_config(cfg, args)
    if task_for(cfg) is DetectionTask:
        return detect(args, cfg, images, outputs)
    data_cfg = cfg["data"]
    class_names = resolve_class_names(data_cfg)
    normalizer = segmentation_normalizer(data_cfg)
    model = normkit.build_model(cfg, checkpoint=args.checkpoint).to(args.device).eval()
    # the wrapper evaluation builds (normkit.evaluation.sem_seg.evaluate): one code path for the test-time recipe
    wrapper = SegmentationInference(model, eval_cfg, normalizer=normalizer)
    predictions = {}
    for image_path, out_path in zip(images, outputs):
        image = read_image(image_path)
        with torch.no_grad():
            probs = wrapper(move_to_device(image_batch(image, image_path.stem, normalizer), args.device))
        pred = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay(image, pred, args.alpha)).save(out_path)
        print(f"{image_path.name}: {describe(pred, class_names)} -> {out_path}", flush=True)
        predictions[image_path.name] = pred
    return predictions


if __name__ == "__main__":
    main()
