"""The CPU GEMMs of the conditional-classifier ops on both of their float32 paths (csrc/cpu/batched_gemm.h).

oneDNN's brgemm serves the first 64 distinct GEMM problems of a process and BLAS the later ones, so that ATen's
per-thread cache of generated brgemm kernels stays bounded under inference over ever-new image sizes; under
torch.use_deterministic_algorithms every problem runs on BLAS. A child process checks problems past every cache block
on brgemm (1, 2 and 3 threads, both layouts), runs hundreds of new image sizes (its memory must stay bounded), then
checks new problems again, now on BLAS. In deterministic mode a process that spent the quota first and one that did
not must give the same bits.
"""
import os
import subprocess
import sys

import torch

CHILD = r"""
import os

import torch
from normkit.ops import class_embedding, class_embedding_reference, dynamic_classify, dynamic_classify_reference

torch.manual_seed(0)
torch.set_num_threads(2)


def check(b, k, c, h, w, channels_last, threads=2):
    torch.set_num_threads(threads)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    features = torch.randn(b, c, h, w).to(memory_format=layout).requires_grad_()
    guidance = torch.randn(b, k, h, w).to(memory_format=layout).requires_grad_()
    weight = (torch.randn(b, k, c) / c ** 0.5).requires_grad_()
    bias = torch.randn(b, k, requires_grad=True)
    inputs = (features, guidance, weight, bias)
    results = []
    for ops, dtype in [((dynamic_classify, class_embedding), torch.float32),
                       ((dynamic_classify_reference, class_embedding_reference), torch.float64)]:
        args = [t.detach().to(dtype).requires_grad_() for t in inputs]
        logits = ops[0](args[0], args[2], args[3])
        embedding = ops[1](args[1], args[0])
        (logits.sum() + (embedding * embedding).sum()).backward()
        results.append([t.double() for t in (logits, embedding, *(a.grad for a in args))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


for threads in (1, 2, 3):
    for channels_last in (False, True):
        check(2, 300, 520, 23, 29, channels_last, threads)  # brgemm: the first problems of the process
start = resident_mib()
with torch.no_grad():
    weight, bias = torch.randn(1, 150, 256), torch.randn(1, 150)
    for i in range(300):  # whole-image inference over 300 image sizes
        features = torch.randn(1, 256, 40 + i % 30, 40 + i // 30)
        dynamic_classify(features, weight, bias)
        class_embedding(torch.randn(1, 150, *features.shape[2:]), features)
grown = resident_mib() - start
for channels_last in (False, True):
    check(2, 300, 520, 23, 31, channels_last)  # BLAS: the quota is spent
print(f"grown {grown:.0f} MiB")
"""

DETERMINISTIC_CHILD = r"""
import sys

import torch
from normkit.ops import dynamic_classify

torch.set_num_threads(2)
if sys.argv[1] == "after_quota":
    with torch.no_grad():
        for i in range(70):  # 70 new problems, each filling both threads
            dynamic_classify(torch.randn(2, 8, 1, 300 + i), torch.randn(2, 4, 8))
torch.use_deterministic_algorithms(True)
generator = torch.Generator().manual_seed(1)
features = torch.randn(2, 520, 23, 29, generator=generator)
torch.save(dynamic_classify(features, torch.randn(2, 300, 520, generator=generator)), sys.argv[2])
"""


def run_child(script, *args):
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_deterministic_mode_ignores_the_process_history(tmp_path):
    run_child(DETERMINISTIC_CHILD, "fresh", str(tmp_path / "fresh.pt"))
    run_child(DETERMINISTIC_CHILD, "after_quota", str(tmp_path / "after_quota.pt"))
    assert torch.equal(torch.load(tmp_path / "fresh.pt"), torch.load(tmp_path / "after_quota.pt"))


def test_brgemm_then_blas_and_bounded_kernel_cache():
    stdout = run_child(CHILD)
    grown = float(stdout.split()[-2])
    # Measured: 2-33 MiB with the quota; 243 MiB when every image size added its brgemm kernels.
    assert grown < 120, stdout
