"""Conditional classifier (CondNet): normkit's fused ops vs the official formulation, in the same run.

Rows per problem size:
  class_embedding    softmax over classes + probability-weighted mean features   (official: softmax, copy, matmul)
  dynamic_classify   per-sample 1x1 classification with bias                     (official: grouped conv, groups = B)
  head               guidance conv + class embedding + kernel generation + classification (the whole
                     ConditionalClassifier, dropout off, with bias), fed by the same parameters; the official
                     side generates the kernels with the grouped conv, normkit with the equivalent batched GEMM

Both forward (inference, no autograd) and forward+backward are timed with interleaved medians
(benchmarks/common.py). The two fused ops are one batched GEMM each (2·B·K·C·H·W flops) plus O(B·K·H·W) work, on
both sides: their forward GFLOP/s, set beside the processor's FMA peak, shows how close to the hardware each side
runs and so how large a forward ratio is possible at all.

Memory: on CUDA the peak allocated during forward+backward above the inputs; on CPU (no allocator statistics) the
activation memory autograd keeps for backward: unique storages packed by saved_tensors_hooks that are not the
inputs, the parameters or the outputs (those live anyway; the guidance logits, for instance, are an output the
Dice loss holds).

Sizes: ADE20K (K=150) and Pascal-Context (K=59) with C=512. On CUDA: B=2/8 at 128x128 and 64x64 (ADE20K
512 crops at stride 4 and 8). On CPU the full list would take many minutes per row, so `main` runs B=2 at
64x64 and 32x32 (under a minute on two cores); pass --full to run the GPU list anyway.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_kernel_benchmark_arguments, markdown_table, steady_cpu_allocator, synchronize,  # noqa: E402
                    time_interleaved, write_results)

from normkit.nn import ConditionalClassifier  # noqa: E402
from normkit.ops import (class_embedding, class_embedding_reference, dynamic_classify,  # noqa: E402
                         dynamic_classify_reference)

GPU_SIZES = [(b, 512, k, s) for k in (150, 59) for b in (2, 8) for s in (128, 64)]
CPU_SIZES = [(2, 512, k, s) for k in (150, 59) for s in (64, 32)]


def official_head(module: ConditionalClassifier, features: torch.Tensor):
    """The official cls_seg with the module's parameters: kernel generation by the grouped conv itself."""
    b, c = features.shape[:2]
    k = module.num_classes
    guidance = module.guidance_project["conv"](features)
    embedding = class_embedding_reference(guidance, features)
    params = module.filter_project["conv"](embedding.reshape(b, k * c, 1, 1)).reshape(b, -1)
    weight, bias = params[:, :k * c].reshape(b, k, c), params[:, k * c:]
    return dynamic_classify_reference(features, weight, bias), guidance


def normkit_head(module: ConditionalClassifier, features: torch.Tensor):
    return module(features)


def make_cases(batch, channels, classes, size, device, dtype):
    """name -> (normkit fn, official fn, tensors that live anyway), the fns taking no arguments and
    returning the output tensors."""
    features = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
    guidance = torch.randn(batch, classes, size, size, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(batch, classes, channels, device=device, dtype=dtype) / channels ** 0.5).requires_grad_()
    bias = torch.randn(batch, classes, device=device, dtype=dtype, requires_grad=True)
    module = ConditionalClassifier(channels, classes, dropout=0.0).to(device=device, dtype=dtype).train()
    return {
        "class_embedding": (lambda: (class_embedding(guidance, features),),
                            lambda: (class_embedding_reference(guidance, features),), [guidance, features]),
        "dynamic_classify": (lambda: (dynamic_classify(features, weight, bias),),
                             lambda: (dynamic_classify_reference(features, weight, bias),), [features, weight, bias]),
        "head": (lambda: normkit_head(module, features), lambda: official_head(module, features),
                 [features, *module.parameters()]),
    }


def forward_only(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def forward_backward(fn):
    def run():
        outputs = fn()
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    return run


def saved_activation_bytes(fn, live) -> int:
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = fn()
    for tensor in [*live, *outputs]:
        storages.pop(tensor.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def memory_bytes(fn, live, device) -> int:
    if torch.device(device).type != "cuda":
        return saved_activation_bytes(fn, live)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    forward_backward(fn)()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


HEADERS = ["problem", "op", "fwd normkit", "fwd official", "fwd speedup", "fwd GFLOP/s normkit",
           "fwd GFLOP/s official", "fwd+bwd normkit", "fwd+bwd official", "fwd+bwd speedup", "memory normkit MiB",
           "memory official MiB"]


def run_table(sizes, device, dtype, repeats) -> list[list]:
    warmup = 3 if device.type == "cuda" else 1
    min_time = 0.02 if device.type == "cuda" else 0.0  # back-to-back calls: the GPU's time, not launch + sync
    rows = []
    for batch, channels, classes, size in sizes:
        torch.manual_seed(0)
        for name, (ours, official, live) in make_cases(batch, channels, classes, size, device, dtype).items():
            fwd = time_interleaved({"normkit": forward_only(ours), "official": forward_only(official)},
                                   device=device, warmup=warmup, repeats=repeats, min_time=min_time)
            fwd_bwd = time_interleaved({"normkit": forward_backward(ours), "official": forward_backward(official)},
                                       device=device, warmup=warmup, repeats=repeats, min_time=min_time)
            gemm_gflop = 2 * batch * classes * channels * size * size / 1e9
            rates = ["", ""] if name == "head" else [gemm_gflop / fwd["normkit"], gemm_gflop / fwd["official"]]
            row = [f"B={batch} C={channels} K={classes} {size}x{size}", name,
                   fwd["normkit"] * 1e3, fwd["official"] * 1e3, fwd["official"] / fwd["normkit"], *rates,
                   fwd_bwd["normkit"] * 1e3, fwd_bwd["official"] * 1e3, fwd_bwd["official"] / fwd_bwd["normkit"],
                   memory_bytes(ours, live, device) / 2 ** 20, memory_bytes(official, live, device) / 2 ** 20]
            rows.append(row)
            print(markdown_table(HEADERS, [row]).splitlines()[-1], flush=True)
    return rows


def main(argv=None) -> dict:
    """Returns {"path", "headers", "sections": [{"threads", "rows"}]} (tools/gpu_check.py reads the ratios)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_kernel_benchmark_arguments(parser)
    parser.add_argument("--full", action="store_true", help="run the GPU size list on CPU too")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    steady = not on_gpu and steady_cpu_allocator()
    sizes = GPU_SIZES if on_gpu or args.full else CPU_SIZES
    repeats = args.repeats or (15 if on_gpu else 5)
    default_threads = torch.get_num_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = [default_threads] if on_gpu else sorted({1, default_threads})

    memory = ("peak allocated during forward+backward above the inputs" if on_gpu else
              "bytes autograd saves for backward besides the inputs, parameters and outputs")
    notes = (f"dtype {args.dtype}, device {device}; times are medians of {repeats} interleaved repeats in ms; "
             f"speedup = official / normkit; fwd GFLOP/s: the fused op's GEMM flops (2·B·K·C·H·W) per second of "
             f"forward time. Memory: {memory}.\n")
    if steady:
        notes += "Freed memory is kept in the heap (common.steady_cpu_allocator), so no side pays page faults.\n"
    if on_gpu:
        # cuDNN runs the official grouped conv on TF32 tensor cores by default, while normkit's GEMMs follow
        # torch.backends.cuda.matmul (IEEE fp32 by default): compare the two at one precision.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        notes += (f"float32 convolutions and GEMMs both in "
                  f"{'TF32' if torch.backends.cuda.matmul.allow_tf32 else 'IEEE float32'}.\n")
    if not (on_gpu or args.full):
        notes += ("CPU sizes are reduced (B=2, 64x64 and 32x32) so the run takes under a minute on two cores; "
                  "the GPU run covers B=2/8 at 128x128 and 64x64.\n")
    sections, results = [], []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"-- {threads} intra-op thread(s)", flush=True)
        rows = run_table(sizes, device, dtype, repeats)
        results.append({"threads": threads, "rows": rows})
        sections.append(f"### {threads} intra-op thread(s)\n\n{markdown_table(HEADERS, rows)}\n")
    torch.set_num_threads(default_threads)
    title = "## Conditional classifier: normkit vs official CondNet formulation\n\n"
    markdown = title + notes + "\n" + "\n".join(sections)
    print(markdown)
    path = write_results("cond_classifier", device, markdown)
    print(f"wrote {path}")
    return {"path": path, "headers": HEADERS, "sections": results}


if __name__ == "__main__":
    main(sys.argv[1:])
