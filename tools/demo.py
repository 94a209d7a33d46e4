#!/usr/bin/env python
"""Segment one image or every image in a folder; print the classes found and write colour overlays.
Detection configs (COCO data) draw boxes, class names, scores and mask overlays instead.

    python tools/demo.py --config CFG --checkpoint CKPT --image IMG_OR_DIR [--out OUT] [--scales ...] [--flip]
                         [--score-threshold 0.5]     (detection: the lowest score drawn)

OUT: a .png/.jpg file for a single image, otherwise a folder receiving <image name>.png per image
(default: demo_out/). Inference options default to the config's `evaluation:` section.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import normkit  # noqa: E402
from normkit.data.base import read_image  # noqa: E402
from normkit.data.build import resolve_class_names  # noqa: E402
from normkit.data.detection import coco_inference_batch  # noqa: E402
from normkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor  # noqa: E402
from normkit.engine import apply_overrides, load_config, move_to_device  # noqa: E402
from normkit.evaluation import inference, overlay  # noqa: E402
from normkit.evaluation.det_visualize import draw_detections  # noqa: E402
from normkit.tools.tasks import DetectionTask, task_for  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image", required=True, help="an image file or a folder of images")
    parser.add_argument("--out", default="demo_out", help="output .png for one image, else a folder")
    parser.add_argument("--scales", type=float, nargs="+", help="test scales (default: evaluation.scales or 1.0)")
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="detection: lowest score drawn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config entries")
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
    if len(images) == 1 and out.suffix.lower() in IMAGE_SUFFIXES:
        return [out]
    return [out / f"{p.stem}.png" for p in images]


def describe(pred: np.ndarray, class_names) -> str:
    """Classes found, by area: "wall 41.2%, floor 30.0%, ..."."""
    counts = np.bincount(pred.ravel(), minlength=len(class_names))
    order = np.argsort(-counts, kind="stable")
    return ", ".join(f"{class_names[k]} {100 * counts[k] / pred.size:.1f}%" for k in order if counts[k])


def detect(args: argparse.Namespace, cfg: dict) -> dict[str, dict]:
    """Detection configs: each image's predictions (original pixels) drawn with draw_detections."""
    class_names = resolve_class_names(cfg["data"])
    images = list_images(Path(args.image))
    model = normkit.build_model(cfg, checkpoint=args.checkpoint).to(args.device).eval()
    predictions = {}
    for image_path, out_path in zip(images, output_paths(images, Path(args.out))):
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
    cfg = apply_overrides(load_config(args.config), args.set)
    if task_for(cfg) is DetectionTask:
        return detect(args, cfg)
    eval_cfg = cfg.get("evaluation") or {}
    data_cfg = cfg["data"]
    class_names = resolve_class_names(data_cfg)
    mean, std = tuple(data_cfg.get("mean", IMAGENET_MEAN)), tuple(data_cfg.get("std", IMAGENET_STD))
    images = list_images(Path(args.image))
    outputs = output_paths(images, Path(args.out))
    model = normkit.build_model(cfg, checkpoint=args.checkpoint).to(args.device).eval()
    predictions = {}
    for image_path, out_path in zip(images, outputs):
        image = read_image(image_path)
        x = to_tensor(image, mean, std)[None].to(args.device)
        probs = inference(model, x, scales=args.scales or eval_cfg.get("scales") or (1.0,),
                          flip=args.flip or bool(eval_cfg.get("flip", False)), mode=eval_cfg.get("mode", "whole"),
                          crop_size=eval_cfg.get("crop_size"), stride=eval_cfg.get("stride"))
        pred = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay(image, pred, args.alpha)).save(out_path)
        print(f"{image_path.name}: {describe(pred, class_names)} -> {out_path}", flush=True)
        predictions[image_path.name] = pred
    return predictions


if __name__ == "__main__":
    main()
