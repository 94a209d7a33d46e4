"""R-50-FPN Mask R-CNN: inference and training-step images/s with frozen BN, GN and SN, beside torchvision's
``maskrcnn_resnet50_fpn`` at the same input size and batch when torchvision is available.

normkit variants (Detectron-1 conventions):
- frozen BN: FrozenBN backbone, FPN and heads without norm, 2fc box head (torchvision's architecture);
- GN: GN backbone, FPN, 4conv1fc box head and mask head (the GN baseline configs);
- SN: the ``e2e_mask_rcnn_R-50-FPN_2x_sn_8-1`` config (SN without BN everywhere);
- SN backbone: the frozen-BN architecture with SN (without BN) in the backbone only: the cost of SN itself.

torchvision runs in this interpreter when importable, else in the interpreter named by ``--peer-python``
(or the ``NORMKIT_PEER_PYTHON`` environment variable); it is skipped otherwise.

    python benchmarks/bench_detection.py                  # CPU: 1 image of 320x320
    python benchmarks/bench_detection.py --device cuda    # GPU: 2 images of 800x1333
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_interleaved, write_results  # noqa: E402

from normkit.models import build_model, read_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SN_CONFIG = ROOT / "configs" / "detection" / "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1.yaml"
NUM_CLASSES = 80


VARIANTS = ("frozen BN", "GN", "SN", "SN backbone")


def model_config(variant: str) -> dict:
    cfg = read_config(SN_CONFIG)["model"]
    if variant == "SN":
        return cfg
    if variant == "SN backbone":
        sn_backbone = dict(cfg["backbone"])
        cfg = model_config("frozen BN")
        cfg["backbone"] = sn_backbone
        return cfg
    norm, kwargs = ("frozenbn", {}) if variant == "frozen BN" else ("gn", {"num_groups": 32})
    cfg["backbone"].update(norm=norm, norm_kwargs=kwargs)
    head_norm = None if variant == "frozen BN" else norm
    cfg["neck"].update(norm=head_norm, norm_kwargs=kwargs)
    cfg["mask_head"].update(norm=head_norm, norm_kwargs=kwargs)
    if variant == "frozen BN":
        cfg["roi_heads"]["box_head"] = {"name": "conv_fc", "num_conv": 0, "num_fc": 2, "fc_dim": 1024}
    else:
        cfg["roi_heads"]["box_head"].update(norm=norm, norm_kwargs=kwargs)
    return cfg


def make_batch(batch: int, h: int, w: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5])
        wh = 32 + torch.rand(4, 2, generator=gen) * torch.tensor([w * 0.4, h * 0.4])
        boxes = torch.cat((xy, xy + wh), dim=1)
        masks = [[torch.stack((b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]))] for b in boxes]
        targets.append({"boxes": boxes.to(device), "labels": torch.arange(4, device=device),
                        "iscrowd": torch.zeros(4, dtype=torch.bool, device=device), "masks": masks})
    sizes = torch.tensor([[h, w]] * batch, device=device)
    return {"images": torch.randn(batch, 3, h, w, generator=gen).to(device), "image_sizes": sizes,
            "orig_sizes": sizes, "scales": torch.ones(batch, device=device), "targets": targets}


def normkit_fns(variant: str, data: dict, device):
    model = build_model({"model": model_config(variant)}).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def infer():
        model.eval()
        with torch.no_grad():
            model(data)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        losses = model(data)
        sum(v for k, v in losses.items() if k.endswith("loss")).backward()
        optimizer.step()
    return infer, train


TORCHVISION_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from common import time_interleaved
from torchvision.models.detection import maskrcnn_resnet50_fpn
batch, h, w, device, repeats = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
torch.set_num_threads(int(sys.argv[7]))
torch.manual_seed(0)
model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81, min_size=min(h, w),
                              max_size=max(h, w), trainable_backbone_layers=3).to(device)
gen = torch.Generator().manual_seed(0)
images = [torch.rand(3, h, w, generator=gen).to(device) for _ in range(batch)]
targets = []
for _ in range(batch):
    xy = torch.rand(4, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5])
    wh = 32 + torch.rand(4, 2, generator=gen) * torch.tensor([w * 0.4, h * 0.4])
    boxes = torch.cat((xy, xy + wh), dim=1)
    masks = torch.zeros(4, h, w, dtype=torch.uint8)
    for m, b in zip(masks, boxes.int().tolist()):
        m[b[1]:b[3], b[0]:b[2]] = 1
    targets.append({"boxes": boxes.to(device), "labels": torch.arange(1, 5, device=device), "masks": masks.to(device)})
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
def infer():
    model.eval()
    with torch.no_grad():
        model(images)
def train():
    model.train()
    opt.zero_grad(set_to_none=True)
    sum(model(images, targets).values()).backward()
    opt.step()
times = time_interleaved({"infer": infer, "train": train}, device=device, warmup=1, repeats=repeats)
print(json.dumps(times))
"""


def torchvision_times(args, batch, h, w):
    try:
        import torchvision  # noqa: F401
        python = sys.executable
    except ImportError:
        python = args.peer_python or os.environ.get("NORMKIT_PEER_PYTHON")
        if not python:
            return None
    cmd = [python, "-c", TORCHVISION_SCRIPT, os.path.dirname(os.path.abspath(__file__)), str(batch), str(h), str(w),
           args.device, str(args.repeats), str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"torchvision run failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-python", help="an interpreter with torchvision, for the reference column")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch, h, w = (2, 800, 1333) if device.type == "cuda" else (1, 320, 320)
    data = make_batch(batch, h, w, device)
    fns = {}
    for variant in VARIANTS:
        infer, train = normkit_fns(variant, data, device)
        fns[f"{variant} infer"], fns[f"{variant} train"] = infer, train
    times = time_interleaved(fns, device=device, warmup=1, repeats=args.repeats)
    tv = torchvision_times(args, batch, h, w)
    rows = []
    base = times["frozen BN train"]
    for variant in VARIANTS:
        rows.append([f"normkit {variant}", batch / times[f"{variant} infer"], batch / times[f"{variant} train"],
                     times[f"{variant} train"] / base])
    if tv:
        rows.append(["torchvision maskrcnn_resnet50_fpn (frozen BN)", batch / tv["infer"], batch / tv["train"],
                     tv["train"] / base])
    table = markdown_table(["model", "inference img/s", "training img/s", "train time / normkit frozen BN"], rows)
    text = (f"R-50-FPN Mask R-CNN, batch {batch} at {h}x{w} on {device.type}, median of {args.repeats} "
            f"interleaved repeats.\n\n{table}\n")
    text += ("\nVariants: frozen BN is torchvision's architecture (2fc box head, no norm in FPN or heads); GN and SN "
             "are the published GN and SN-(8,1) configs (norms in FPN, 4conv1fc box head and mask head); SN backbone "
             "is the frozen-BN architecture with SN (without BN) in the backbone only, which isolates the cost of SN. "
             "For a fair torchvision row run with an interpreter that has torchvision, so both sides use the same "
             "torch build.\n")
    if not tv:
        text += "\ntorchvision was not available (pass --peer-python); its row is missing.\n"
    print(text)
    print("wrote", write_results("detection", device, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
