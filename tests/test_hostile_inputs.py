"""Hostile inputs to the ops (issue 14): direct dispatcher calls with inconsistent arguments, unbounded RoIAlign
work, batched NMS on inf/NaN/huge boxes and large category ids, and argument-naming error messages."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from normkit.nn import SwitchNorm2d
from normkit.ops import batched_nms, class_embedding, nms, roi_align, roi_pool, switch_norm

ops = torch.ops.normkit
INF, NAN = math.inf, math.nan


# ---- every C++ entry checks what its kernels index ----

def sn_args(c=4, weight_len=4, k=3):
    x = torch.randn(2, c, 3, 3)
    return x, torch.ones(weight_len), torch.zeros(c), torch.ones(k), torch.ones(k), torch.zeros(c), torch.ones(c)


@pytest.mark.parametrize("short", ["weight", "bias"])
def test_switch_norm_ops_check_channel_vectors(short):
    x, weight, bias, mw, vw, rm, rv = sn_args()
    if short == "weight":
        weight = torch.ones(2)
    else:
        bias = torch.zeros(2)
    with pytest.raises(RuntimeError, match=f"{short} must have C = 4 elements"):
        ops.switch_norm(x, weight, bias, mw, vw, rm, rv, True, 0.1, True, True, 1e-5)
    moments = ops._switch_norm_moments(x)
    with pytest.raises(RuntimeError, match=f"{short} must have C = 4 elements"):
        ops._switch_norm_forward_coefficients(moments, weight, bias, mw, vw, None, 9, True, 1e-5)


def test_switch_norm_running_stats_update_checks_shapes():
    with pytest.raises(RuntimeError, match="running_mean and running_var must have C = 4 elements"):
        ops._switch_norm_update_running_stats(torch.zeros(3), torch.ones(4), torch.ones(3, 4), 0.1, True)
    with pytest.raises(RuntimeError, match=r"bn_stats must be \(3, C\)"):
        ops._switch_norm_update_running_stats(torch.zeros(4), torch.ones(4), torch.ones(4), 0.1, True)


def test_switch_norm_backward_ops_check_shapes():
    x, weight, bias, mw, vw, rm, rv = sn_args()
    moments = ops._switch_norm_moments(x)
    grad_moments = ops._switch_norm_grad_moments(torch.randn_like(x), x)
    bn_stats = torch.ones(3, 4)
    with pytest.raises(RuntimeError, match="weight must have C = 4 elements"):
        ops._switch_norm_backward_reduce(grad_moments, moments, bn_stats, torch.ones(2), mw, vw, 9, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"bn_stats must be \(3, 4\)"):
        ops._switch_norm_backward_reduce(grad_moments, moments, torch.ones(3, 2), weight, mw, vw, 9, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"bn_grad must be \(2, 4\)"):
        ops._switch_norm_backward_coefficients(grad_moments, moments, bn_stats, torch.ones(2, 2), weight, mw, vw, 9,
                                               True, 1e-5)
    with pytest.raises(RuntimeError, match="expected 2 or 3 mixture weights"):
        ops._switch_norm_backward_reduce(grad_moments, moments, bn_stats, weight, torch.ones(7), torch.ones(7), 9,
                                         True, 1e-5)


def test_roi_ops_check_scalar_arguments():
    x, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 6, 6]])
    grad = torch.randn(1, 2, 2, 2)
    with pytest.raises(RuntimeError, match="sampling_ratio must be at most 65536"):
        ops.roi_align(x, rois, 1.0, 2, 2, 2 ** 40, True)  # would wrap to 0 (adaptive) in the int conversion
    with pytest.raises(RuntimeError, match="sampling_ratio must be at most 65536"):
        ops._roi_align_backward(grad, rois, 1.0, 2, 2, 1, 2, 8, 8, 2 ** 40, True, False)
    with pytest.raises(RuntimeError, match="sampling_ratio must be"):
        ops.roi_align(x, rois, 1.0, 2, 2, -2 ** 40 + 5, True)  # would wrap to +5
    for scale in (-0.5, 0.0, INF, NAN):
        with pytest.raises(RuntimeError, match="spatial_scale must be a positive finite number"):
            ops.roi_align(x, rois, scale, 2, 2, -1, True)
        with pytest.raises(RuntimeError, match="spatial_scale must be a positive finite number"):
            ops.roi_pool(x, rois, scale, 2, 2)
    with pytest.raises(RuntimeError, match="output size must have fewer than 2\\^31 bins"):
        ops.roi_align(x, rois, 1.0, 2 ** 32 + 2, 2, -1, True)
    with pytest.raises(RuntimeError, match="output size must have fewer than 2\\^31 bins"):
        ops.roi_align(x, rois, 1.0, 46341, 46341, -1, True)  # each side fits an int, their product does not
    with pytest.raises(RuntimeError, match="feature map sizes must be below 2"):
        ops._roi_pool_backward(grad, rois, torch.zeros(1, 2, 2, 2, dtype=torch.int32), 1.0, 2, 2, 1, 2, 2 ** 32, 8)
    # RoIPool's argmax is an int32 cell index: a plane of 2^31 cells or more is refused before anything is read.
    with pytest.raises(RuntimeError, match="fewer than 2\\^31 cells per channel"):
        ops.roi_pool(torch.zeros(1, 1, 1, 1).expand(1, 1, 2 ** 16, 2 ** 15), rois, 1.0, 2, 2)
    with pytest.raises(ValueError, match="sampling_ratio must be at most 65536"):
        roi_align(x, rois, 2, 1.0, 2 ** 40)


def test_batched_nms_op_checks_categories():
    boxes, scores = torch.rand(3, 4), torch.rand(3)
    with pytest.raises(RuntimeError, match=r"idxs must be Tensor\[3\]"):
        ops.batched_nms(boxes, scores, torch.zeros(2, dtype=torch.long), 0.5)
    with pytest.raises(RuntimeError, match="integer category indices"):
        ops.batched_nms(boxes, scores, torch.zeros(3), 0.5)


# ---- RoIAlign work is bounded by the output, not by the box size or sampling ratio ----

def _peak_rss_growth_mb(code: str) -> tuple[float, float]:
    """Runs `code` (with torch, normkit.ops and `x`, `rois` defined) in a fresh process; returns the growth of
    its peak resident memory over the peak before `code`, in MB, and the seconds `code` took."""
    script = textwrap.dedent("""
        import resource, time, torch
        import normkit.ops
        torch.set_num_threads(1)
        x = torch.randn(1, 1, 64, 64)
        rois = torch.tensor([[0.0, 0.0, 0.0, 64.0, 64.0]])
        normkit.ops.roi_align(x, rois, 2, 1.0, 2)  # warm up allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
    """) + textwrap.dedent(code) + textwrap.dedent("""
        seconds = time.perf_counter() - start
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, seconds)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth, seconds = result.stdout.split()[-2:]
    return float(growth), float(seconds)


@pytest.mark.slow
def test_roi_align_memory_bounded_with_huge_sampling_ratio():
    # sampling_ratio 20000: 4e8 samples in one bin (a per-sample cache needs ~25 GB); takes seconds to compute.
    growth, _ = _peak_rss_growth_mb("out = normkit.ops.roi_align(x, rois, 1, 1.0, 20000)")
    assert growth < 50, growth


def test_roi_align_memory_bounded_by_output():
    # A (3000, 3000) output of one box and one channel is 36 MB; allow a few times that.
    growth, _ = _peak_rss_growth_mb("out = normkit.ops.roi_align(x, rois, (3000, 3000), 1.0, -1, True)")
    assert growth < 3 * 36, growth
    # A box 1e6 px wide: only the samples that land on the map cost time.
    _, seconds = _peak_rss_growth_mb(
        "out = normkit.ops.roi_align(x, torch.tensor([[0.0, -5e5, 0.0, 5e5, 64.0]]), 7, 1.0, -1)")
    assert seconds < 2, seconds


# ---- batched NMS equals per-category NMS for every box ----

def per_category_nms(boxes, scores, idxs, threshold, offset=0):
    """NMS per category, merged by decreasing score with ties in input order (as nms orders them)."""
    keep = torch.cat([torch.nonzero(idxs == c).flatten()[nms(boxes[idxs == c], scores[idxs == c], threshold, offset)]
                      for c in idxs.unique()]).sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def test_batched_nms_inf_box_does_not_disable_suppression():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, INF, 5]])
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0, 0, 1]), 0.5)
    assert keep.tolist() == [0, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_nms_equals_per_category_nms_on_hostile_boxes(dtype):
    n = 300
    xy = torch.rand(n, 2) * 100
    boxes = torch.cat([xy, xy + torch.rand(n, 2) * 40 + 1], 1)
    boxes[::17, 2] = INF
    boxes[5::19, 0] = -INF
    boxes[7::23, 1] = NAN
    boxes[11::29] *= 1e20 if dtype == torch.float32 else 1e3
    scores = torch.rand(n)
    for idxs in (torch.randint(0, 4, (n,)), torch.randint(0, 4, (n,)) + 1_000_000, torch.randint(-3, 3, (n,))):
        b, s = boxes.to(dtype), scores.to(dtype)
        assert torch.equal(batched_nms(b, s, idxs, 0.5), per_category_nms(b, s, idxs, 0.5))
        assert torch.equal(batched_nms(b, s, idxs, 0.5, offset=1), per_category_nms(b, s, idxs, 0.5, offset=1))


# ---- messages name the argument and the expected form ----

@pytest.mark.parametrize("call, message", [
    (lambda: roi_align(torch.randn(1, 2, 8, 8), torch.zeros(1, 5), 3.0), r"output_size must be an int or a pair"),
    (lambda: roi_pool(torch.randn(1, 2, 8, 8), torch.zeros(1, 5), (3, 2.5)), r"output_size must be an int or a pair"),
    (lambda: roi_align(torch.randn(1, 2, 8, 8), torch.zeros(1, 5), 3, "0.5"), r"spatial_scale must be a number"),
    (lambda: roi_pool(torch.randn(1, 2, 8, 8), torch.zeros(1, 5), 3, True), r"spatial_scale must be a number"),
    (lambda: nms(torch.zeros(2, 4), torch.zeros(2), 0.5, offset=True), r"offset must be the int 0 .* or 1"),
    (lambda: SwitchNorm2d(4.0), r"num_features must be a positive int"),
    (lambda: SwitchNorm2d(4, momentum=1.5), r"momentum must be a number in \[0, 1\]"),
    (lambda: SwitchNorm2d(4, momentum=NAN), r"momentum must be a number in \[0, 1\]"),
])
def test_clear_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_functional_switch_norm_rejects_bad_momentum():
    x, weight, bias, mw, vw, rm, rv = sn_args()
    with pytest.raises(ValueError, match=r"switch_norm: momentum must be a number in \[0, 1\]"):
        switch_norm(x, weight, bias, mw, vw, rm, rv, True, momentum=-0.1)


def test_class_embedding_double_backward_is_refused_clearly():
    guidance = torch.randn(1, 3, 4, 4, requires_grad=True)
    features = torch.randn(1, 2, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(class_embedding(guidance, features).sum(), guidance, create_graph=True)
    with pytest.raises(RuntimeError, match="class_embedding: double backward .* is not supported"):
        grad.sum().backward()


def test_switch_norm_double_backward_is_refused_clearly():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    params = [torch.ones(4), torch.zeros(4), torch.ones(3), torch.ones(3)]
    out = switch_norm(x, *params, training=True)
    (grad,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="switch_norm: double backward .* is not supported"):
        grad.sum().backward()
    # The first-order gradient is the same with or without create_graph.
    (plain,) = torch.autograd.grad((switch_norm(x, *params, training=True) ** 2).sum(), x)
    torch.testing.assert_close(grad.detach(), plain)


def test_roi_ops_on_meta_tensors():
    x, rois = torch.randn(2, 3, 8, 8, device="meta"), torch.zeros(4, 5, device="meta")
    assert roi_align(x, rois, (2, 3), 0.5).shape == (4, 3, 2, 3)
    assert roi_align(x, [torch.zeros(1, 4, device="meta")] * 2, 2).shape == (2, 3, 2, 2)
    assert roi_pool(x, rois, 2).shape == (4, 3, 2, 2)
    assert roi_align(x.to(memory_format=torch.channels_last), rois, 2).is_contiguous(
        memory_format=torch.channels_last)


# ---- tools and files: clear messages ----

def test_check_cuda_compile_help_starts_no_build(tmp_path):
    # a stand-in nvcc first on the PATH records any call: --help must not reach it
    fake = tmp_path / "nvcc"
    fake.write_text(f"#!/bin/sh\necho called >> {tmp_path / 'calls'}\nexit 1\n")
    fake.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "tools" / "check_cuda_compile.py"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout and "--jobs" in done.stdout
    assert not (tmp_path / "calls").exists()


def test_state_dicts_and_configs_of_the_wrong_kind_are_named(tmp_path):
    from normkit.engine import load_config
    from normkit.models.checkpoint import read_state_dict
    with pytest.raises(ValueError, match=r"entries are not tensors: \['conv.weight'\] \(list; wrong file or format"):
        read_state_dict({"conv.weight": [1.0, 2.0], "conv.bias": torch.zeros(2)})
    with pytest.raises(IsADirectoryError, match="is a directory, expected a YAML file"):
        load_config(tmp_path)
