"""Every op, forward and backward, on cuda:1 while cuda:0 is current: kernels must launch on their inputs' device
(a missing device guard shows up as an illegal address or wrong values) and return results there. Needs two
GPUs."""
import pytest
import torch

from normkit.ops import batched_nms, class_embedding, dynamic_classify, nms, roi_align, roi_pool, switch_norm
from roi_helpers import random_rois

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def forward_backward(fn, *inputs):
    """fn's output and the gradients of the inputs it differentiates for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad, allow_unused=True)
    return [out, *(g for g in grads if g is not None)]  # the ROI ops give boxes no gradient


def switch_norm_2d(x, weight, bias, mean_weight, var_weight):
    return switch_norm(x, weight, bias, mean_weight, var_weight, None, None, True, 0.1, 1e-5, True, True, True)


CASES = {
    "roi_align": (lambda x, r: roi_align(x, r, 7, 0.25, 2, True), lambda: (torch.randn(2, 8, 24, 32),
                                                                           random_rois(16, 2, 96, 128))),
    "roi_align_deterministic": (lambda x, r: roi_align(x, r, 7, 0.25, -1, True, deterministic=True),
                                lambda: (torch.randn(2, 8, 24, 32), random_rois(16, 2, 96, 128))),
    "roi_pool": (lambda x, r: roi_pool(x, r, 7, 0.25),
                 lambda: (torch.randn(2, 8, 24, 32), random_rois(16, 2, 96, 128))),
    "switch_norm": (switch_norm_2d, lambda: (torch.randn(4, 6, 9, 7), torch.rand(6), torch.randn(6), torch.randn(3),
                                             torch.randn(3))),
    "class_embedding": (class_embedding, lambda: (torch.randn(2, 5, 9, 7), torch.randn(2, 12, 9, 7))),
    "dynamic_classify": (dynamic_classify, lambda: (torch.randn(2, 12, 9, 7), torch.randn(2, 5, 12),
                                                    torch.randn(2, 5))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_runs_on_the_inputs_device(name):
    fn, make_inputs = CASES[name]
    inputs = make_inputs()
    expected = forward_backward(fn, *inputs)
    with torch.cuda.device(0):
        actual = forward_backward(fn, *[t.to("cuda:1") for t in inputs])
    for a, e in zip(actual, expected):
        assert a.device == torch.device("cuda", 1)
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batched", [False, True])
def test_nms_runs_on_the_inputs_device(batched):
    boxes = random_rois(500, 1, 200, 300)[:, 1:]
    scores = torch.rand(500)
    classes = torch.randint(0, 5, (500,))
    run = (lambda b, s, c: batched_nms(b, s, c, 0.5)) if batched else (lambda b, s, c: nms(b, s, 0.5))
    expected = run(boxes, scores, classes)
    with torch.cuda.device(0):
        actual = run(boxes.to("cuda:1"), scores.to("cuda:1"), classes.to("cuda:1"))
    assert actual.device == torch.device("cuda", 1)
    assert torch.equal(actual.cpu(), expected)


def _backward_cases():
    """(backward op, its CPU arguments): autograd runs a backward on its inputs' device, so the guards of the
    backward kernels are only reached by calling the ops while another device is current."""
    ops = torch.ops.normkit
    x, rois = torch.randn(2, 8, 24, 32), random_rois(16, 2, 96, 128)
    pooled, argmax = ops.roi_pool(x, rois, 0.25, 7, 7)
    sn_inputs = (torch.randn(4, 6, 9, 7), torch.rand(6), torch.randn(6), torch.randn(3), torch.randn(3))
    _, moments, bn_stats = ops.switch_norm(*sn_inputs, None, None, True, 0.1, True, True, 1e-5)
    return {
        "roi_align": (ops._roi_align_backward, (torch.randn(16, 8, 7, 7), rois, 0.25, 7, 7, 2, 8, 24, 32, 2, True,
                                                False)),
        "roi_align_deterministic": (ops._roi_align_backward, (torch.randn(16, 8, 7, 7), rois, 0.25, 7, 7, 2, 8, 24,
                                                              32, 2, True, True)),
        "roi_pool": (ops._roi_pool_backward, (torch.randn_like(pooled), rois, argmax, 0.25, 7, 7, 2, 8, 24, 32)),
        "switch_norm": (ops._switch_norm_backward, (torch.randn(4, 6, 9, 7), sn_inputs[0], moments, bn_stats,
                                                    sn_inputs[1], sn_inputs[3], sn_inputs[4], True, True, 1e-5)),
        "class_embedding": (ops._class_embedding_backward, (torch.randn(2, 5, 12), torch.randn(2, 5, 9, 7),
                                                            torch.randn(2, 12, 9, 7))),
        "dynamic_classify": (ops._dynamic_classify_backward, (torch.randn(2, 5, 9, 7), torch.randn(2, 12, 9, 7),
                                                              torch.randn(2, 5, 12), True)),
    }


@pytest.mark.parametrize("name", ["roi_align", "roi_align_deterministic", "roi_pool", "switch_norm",
                                  "class_embedding", "dynamic_classify"])
def test_backward_op_runs_on_the_inputs_device(name):
    op, args = _backward_cases()[name]
    expected = op(*args)
    with torch.cuda.device(0):
        actual = op(*[a.to("cuda:1") if isinstance(a, torch.Tensor) else a for a in args])
    for a, e in zip(actual if isinstance(actual, (tuple, list)) else [actual],
                    expected if isinstance(expected, (tuple, list)) else [expected]):
        assert a.device == torch.device("cuda", 1)
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-4)
