"""End-to-end training step of ResNet-50-D8 + C1DeepSup with BN, GN, SN (normkit kernels) and SN
(pure-PyTorch official formulation), in one interleaved run.

Reports the median forward+backward step time, its ratio to the BN model, the bytes autograd saves for
backward (device-independent activation memory) and, on CUDA, the step's peak allocated memory above what was
allocated before it (the four models' weights and the other models' gradients stay resident throughout).

    python benchmarks/bench_models.py                  # CPU: batch 1 at 128x128
    python benchmarks/bench_models.py --device cuda    # GPU: batch 4 at 512x512
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, synchronize, time_interleaved, write_results  # noqa: E402

from normkit.models import build_model  # noqa: E402

NUM_CLASSES = 150
VARIANTS = {  # name -> (norm, norm_kwargs, SN implementation)
    "BN": ("bn", {}, None),
    "GN": ("gn", {"num_groups": 32}, None),
    "SN (normkit)": ("sn", {}, "fused"),
    "SN (reference)": ("sn", {}, "reference"),
}


def build(norm: str, norm_kwargs: dict, implementation, device) -> torch.nn.Module:
    cfg = {"model": {"name": "encoder_decoder", "num_classes": NUM_CLASSES, "loss_mode": "downsample_labels",
                     "backbone": {"name": "resnet50", "stem": "v1", "output_stride": 8, "dilation_rule": "csail",
                                  "norm": norm, "norm_kwargs": norm_kwargs},
                     "decode_head": {"name": "c1_deepsup"}}}
    model = build_model(cfg).to(device).train()
    if implementation is not None:
        for m in model.modules():
            if hasattr(m, "implementation"):
                m.implementation = implementation
    return model


def make_step(model, images, labels):
    def step():
        model.zero_grad(set_to_none=True)
        losses = model({"images": images, "labels": labels})
        sum(v for k, v in losses.items() if k.endswith("loss")).backward()
    return step


def saved_bytes(model, images, labels) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one forward pass."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model({"images": images, "labels": labels})
    del losses
    return sum(seen.values())


def peak_memory(model, step, device):
    """Peak memory of one step above the memory allocated before it, in MiB."""
    if torch.device(device).type != "cuda":
        return "n/a"  # no allocator statistics on CPU; the saved-for-backward column compares memory there
    model.zero_grad(set_to_none=True)  # the step's own gradients count towards its peak
    synchronize(device)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="image side (default 512 on CUDA, 128 on CPU)")
    parser.add_argument("--batch", type=int, help="images per step (default 4 on CUDA, 1 on CPU)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (512 if cuda else 128)
    batch = args.batch or (4 if cuda else 1)
    repeats = args.repeats or (10 if cuda else 3)

    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    models = {name: build(*spec, device) for name, spec in VARIANTS.items()}
    steps = {name: make_step(m, images, labels) for name, m in models.items()}
    times = time_interleaved(steps, device=device, warmup=2 if cuda else 1, repeats=repeats)
    rows = []
    for name, model in models.items():
        rows.append([name, times[name] * 1e3, times[name] / times["BN"],
                     saved_bytes(model, images, labels) / 2**20, peak_memory(model, steps[name], device)])
    table = markdown_table(["model (R50-D8 + C1DeepSup)", "fwd+bwd ms", "x BN", "saved for backward MiB",
                            "step peak MiB"], rows)
    sn, ref = times["SN (normkit)"], times["SN (reference)"]
    summary = (f"Training step, batch {batch} x 3 x {size} x {size}, {NUM_CLASSES} classes, median of {repeats} "
               f"interleaved rounds.\n\n{table}\n\nSN (normkit) is {sn / times['BN']:.2f}x the BN step and "
               f"{ref / sn:.2f}x faster than the reference-SN model.\n")
    print(summary)
    if not args.no_write:
        print("wrote", write_results("models", device, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
