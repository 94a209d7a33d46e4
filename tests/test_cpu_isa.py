"""The CPU kernels built twice (x86-64 baseline and AVX2+FMA, csrc/cpu/isa.h) both match the references.

This process runs the widest build the CPU offers; a child started with ATEN_CPU_CAPABILITY=default (honoured
by normkit as by torch's own kernels) runs the baseline one on the same checks.
"""
import os
import subprocess
import sys

import pytest
import torch

from normkit.ops import class_embedding, class_embedding_reference, switch_norm, switch_norm_reference


def check_switch_norm():
    g = torch.Generator().manual_seed(0)
    # Planes with a partial last vector (28 elements), shorter than a vector (6), longer than one 1024-element chunk
    # (1640); both memory layouts.
    for shape, channels_last in [((3, 5, 4, 7), False), ((2, 4, 2, 3), False), ((2, 3, 40, 41), False),
                                 ((2, 19, 5, 7), True)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5
        params = [torch.randn(n, generator=g, dtype=torch.float64) for n in (shape[1], shape[1], 3, 3)]
        grad = torch.randn(*shape, generator=g, dtype=torch.float64)
        results = []
        for fn, dtype in [(switch_norm, torch.float32), (switch_norm_reference, torch.float64)]:
            xi = x.to(dtype)
            xi = (xi.contiguous(memory_format=torch.channels_last) if channels_last else xi).requires_grad_()
            ps = [p.to(dtype).requires_grad_() for p in params]
            out = fn(xi, *ps, training=True)
            out.backward(grad.to(dtype))
            results.append([t.double() for t in (out, xi.grad, *(p.grad for p in ps))])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def check_class_embedding():
    g = torch.Generator().manual_seed(1)
    # K=150 over 255 pixels spans several pixel blocks; 7 pixels leave vector tails; large logits test the shift.
    for b, k, c, h, w, scale in [(2, 150, 8, 15, 17, 3.0), (1, 5, 3, 1, 7, 40.0)]:
        guidance = torch.randn(b, k, h, w, generator=g, dtype=torch.float64) * scale
        features = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
        grad = torch.randn(b, k, c, generator=g, dtype=torch.float64)
        results = []
        for fn, dtype in [(class_embedding, torch.float32), (class_embedding_reference, torch.float64)]:
            gi, fi = guidance.to(dtype).requires_grad_(), features.to(dtype).requires_grad_()
            out = fn(gi, fi)
            out.backward(grad.to(dtype))
            results.append([t.double() for t in (out, gi.grad, fi.grad)])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


CHECKS = [check_switch_norm, check_class_embedding]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_widest_build_matches_reference(check):
    check()


def test_the_widest_build_runs_where_torch_runs_avx2_kernels():
    import normkit._C
    capability = torch.backends.cpu.get_cpu_capability()
    expected = "avx2" if capability.startswith("AVX") and sys.platform == "linux" and _cpu_has("avx2", "fma") else None
    if expected is None:
        pytest.skip(f"no AVX2+FMA build to run here (torch CPU capability {capability})")
    assert normkit._C.cpu_kernels == expected


def _cpu_has(*flags):
    with open("/proc/cpuinfo") as f:
        words = set(next(line for line in f if line.startswith("flags")).split())
    return all(flag in words for flag in flags)


def test_baseline_build_matches_reference():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import test_cpu_isa as t\n"
              "assert torch.backends.cpu.get_cpu_capability() in ('DEFAULT', 'NO AVX')\n"  # NO AVX: older torch (2.6)
              "import normkit._C\nassert normkit._C.cpu_kernels == 'baseline', normkit._C.cpu_kernels\n"
              "for check in t.CHECKS: check()\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(os.path.abspath(__file__))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
