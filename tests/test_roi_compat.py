"""torchvision.ops drop-in compatibility of the ROI ops and modules: TorchScript, FX symbolic tracing,
torch.export, torch.compile, empty inputs and quantized inputs. The torchvision-dependent checks skip when it is
not importable; every behaviour also has a check here that does not need it."""
import math

import pytest
import torch
from torch import nn

from normkit.nn import MultiScaleRoIAlign, RoIAlign, RoIPool
from normkit.ops import batched_nms, nms, roi_align, roi_align_reference, roi_pool, roi_pool_reference
from roi_helpers import random_rois

try:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
except ImportError:  # the default CI has no torchvision
    torchvision = None
needs_torchvision = pytest.mark.skipif(torchvision is None, reason="needs torchvision")

IMAGE = (64, 96)

# As with torchvision: functions imported by name into a module are FX leaves there once wrapped there.
for _name in ("roi_align", "roi_pool", "nms", "batched_nms"):
    torch.fx.wrap(_name)


def fpn_inputs(batch=2, channels=3):
    features = {f"p{k}": torch.randn(batch, channels, IMAGE[0] >> k, IMAGE[1] >> k) for k in (2, 3, 4)}
    boxes = [random_rois(6, 1, *IMAGE)[:, 1:] for _ in range(batch)]
    return features, boxes, [IMAGE] * batch


# ---- TorchScript ----

def _grad_of(fn, x, *args):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


@pytest.mark.parametrize("deterministic", [False, True])
def test_scripted_roi_align_equals_eager(deterministic):
    x, rois = torch.randn(2, 3, 12, 16), random_rois(7, 2, 24, 32)
    scripted = torch.jit.script(roi_align)
    for boxes in (rois, [rois[rois[:, 0] == i, 1:] for i in range(2)]):
        for output_size in (3, (2, 4), [2, 4]):
            run = lambda fn, t: fn(t, boxes, output_size, 0.5, 2, True, deterministic)  # noqa: E731
            out, grad = _grad_of(lambda t: run(scripted, t), x)
            expected, expected_grad = _grad_of(lambda t: run(roi_align, t), x)
            assert torch.equal(out, expected) and torch.equal(grad, expected_grad)


def test_scripted_roi_pool_and_nms_equal_eager():
    x, rois = torch.randn(2, 3, 12, 16), random_rois(7, 2, 24, 32)
    out, grad = _grad_of(lambda t: torch.jit.script(roi_pool)(t, rois, (2, 3), 0.5), x)
    expected, expected_grad = _grad_of(lambda t: roi_pool(t, rois, (2, 3), 0.5), x)
    assert torch.equal(out, expected) and torch.equal(grad, expected_grad)
    boxes, scores = random_rois(50, 1, 40, 40)[:, 1:], torch.rand(50)
    idxs = torch.randint(0, 3, (50,))
    assert torch.equal(torch.jit.script(nms)(boxes, scores, 0.5, 1), nms(boxes, scores, 0.5, 1))
    for categories in (idxs, idxs.float() * 0.5, idxs > 0):  # float and bool categories too, as torchvision's
        assert torch.equal(torch.jit.script(batched_nms)(boxes, scores, categories, 0.5),
                           batched_nms(boxes, scores, categories, 0.5))


@pytest.mark.parametrize("module", [RoIAlign((2, 3), 0.5, 2, True), RoIAlign(3, 0.25, -1, deterministic=True),
                                    RoIPool(3, 0.5)], ids=repr)
def test_scripted_roi_modules_equal_eager(module):
    x, rois = torch.randn(2, 3, 12, 16), random_rois(7, 2, 24, 32)
    scripted = torch.jit.script(module)
    out, grad = _grad_of(scripted, x, rois)
    expected, expected_grad = _grad_of(module, x, rois)
    assert torch.equal(out, expected) and torch.equal(grad, expected_grad)


@pytest.mark.parametrize("as_list", [False, True])
def test_scripted_multiscale_equals_eager(as_list):
    features, boxes, shapes = fpn_inputs()
    pooler = MultiScaleRoIAlign(3 if as_list else ["p2", "p3", "p4"], 4, 2)
    scripted = torch.jit.script(pooler)
    inputs = list(features.values()) if as_list else features
    leaves = list(features.values())
    outs = []
    for fn in (scripted, pooler):
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        out = fn(inputs, boxes, shapes)
        out.sum().backward()
        outs.append((out.detach(), [t.grad.clone() for t in leaves]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    with pytest.raises(torch.jit.Error, match=r"lack levels \[p5\]"):
        torch.jit.script(MultiScaleRoIAlign(["p5"], 4, 2))(features, boxes, shapes)


# ---- FX ----

class Head(nn.Module):
    """A model containing every ROI module, with ops around them so tracing has real work."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.align = RoIAlign((2, 3), 0.5, 2, True)
        self.pool = RoIPool(3, 0.5)
        self.multi = MultiScaleRoIAlign(["p2", "p3", "p4"], 4, 2)

    def forward(self, x, rois, features, boxes):
        y = self.conv(x)
        a = self.align(y, rois).flatten(1)
        p = self.pool(y, rois).flatten(1)
        m = self.multi(features, boxes, [IMAGE, IMAGE]).flatten(1)
        return torch.cat([a, p], 1).sum(1), m.relu()


def test_fx_traced_model_equals_eager():
    model = Head()
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
    # Each ROI module becomes one opaque call of its op.
    assert calls.count(roi_align) == 1 and calls.count(roi_pool) == 1
    assert sum(getattr(t, "__name__", "") == "multiscale_roi_align" for t in calls) == 1
    x, rois = torch.randn(2, 3, 24, 32), random_rois(5, 2, 48, 64)
    features, boxes, _ = fpn_inputs()
    for a, b in zip(graph_module(x, rois, features, boxes), model(x, rois, features, boxes)):
        assert torch.equal(a, b)


def test_fx_traces_functional_ops_as_leaves():
    def f(x, rois, boxes, scores, idxs):
        return roi_align(x, rois, 2, 0.5).sum() + roi_pool(x, rois, 2).sum(), nms(boxes, scores, 0.5), \
            batched_nms(boxes, scores, idxs, 0.5)

    graph_module = torch.fx.symbolic_trace(f)
    calls = {n.target for n in graph_module.graph.nodes if n.op == "call_function"}
    assert {roi_align, roi_pool, nms, batched_nms} <= calls
    import normkit.ops  # calls through the package need no wrap of their own
    traced = torch.fx.symbolic_trace(lambda x, rois: normkit.ops.roi_align(x, rois, 2)
                                     + normkit.ops.roi_pool(x, rois, 2))
    assert {roi_align, roi_pool} <= {n.target for n in traced.graph.nodes if n.op == "call_function"}
    x, rois = torch.randn(2, 3, 12, 16), random_rois(5, 2, 24, 32)
    boxes, scores, idxs = random_rois(30, 1, 40, 40)[:, 1:], torch.rand(30), torch.randint(0, 3, (30,))
    for a, b in zip(graph_module(x, rois, boxes, scores, idxs), f(x, rois, boxes, scores, idxs)):
        assert torch.equal(a, b)


@needs_torchvision
def test_torchvision_feature_extractor():
    model = Head().eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    # As for torchvision's modules: each module's forward is one node, named after its op.
    nodes = {"align.roi_align": "a", "pool.roi_pool": "p", "multi.multiscale_roi_align": "m"}
    assert set(nodes) <= set(eval_nodes) and train_nodes == eval_nodes
    extractor = create_feature_extractor(model, nodes)
    x, rois = torch.randn(2, 3, 24, 32), random_rois(5, 2, 48, 64)
    features, boxes, _ = fpn_inputs()
    out = extractor(x, rois, features, boxes)
    y = model.conv(x)
    assert torch.equal(out["a"], model.align(y, rois))
    assert torch.equal(out["p"], model.pool(y, rois))
    assert torch.equal(out["m"], model.multi(features, boxes, [IMAGE, IMAGE]))


# ---- torch.export and torch.compile ----

class BoxHead(nn.Module):
    """A small FPN box head: MultiScaleRoIAlign, two FC layers, class scores."""

    def __init__(self, channels=3, classes=5):
        super().__init__()
        self.pooler = MultiScaleRoIAlign(["p2", "p3", "p4"], 4, 2)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]):
        return self.fc(self.pooler(features, boxes, [IMAGE, IMAGE]))


def test_export_fpn_box_head():
    head = BoxHead().eval()
    features, boxes, _ = fpn_inputs()
    exported = torch.export.export(head, (features, boxes))
    assert any("normkit.roi_align" in str(n.target) for n in exported.graph.nodes)
    assert torch.equal(exported.module()(features, boxes), head(features, boxes))
    other_features, other_boxes, _ = fpn_inputs()  # same shapes, new values
    torch.testing.assert_close(exported.module()(other_features, other_boxes), head(other_features, other_boxes))


@pytest.mark.slow
def test_compile_modules_without_graph_breaks():
    torch._dynamo.reset()
    x, rois = torch.randn(2, 3, 24, 32, requires_grad=True), random_rois(5, 2, 48, 64)
    for module in (RoIAlign((2, 3), 0.5, 2, True), RoIPool(3, 0.5)):
        compiled = torch.compile(module, fullgraph=True)
        torch.testing.assert_close(compiled(x, rois), module(x, rois))
    boxes, scores, idxs = random_rois(30, 1, 40, 40)[:, 1:], torch.rand(30), torch.randint(0, 3, (30,))
    compiled = torch.compile(lambda b, s, i: (nms(b, s, 0.5), batched_nms(b, s, i, 0.5)), fullgraph=True)
    for a, b in zip(compiled(boxes, scores, idxs), (nms(boxes, scores, 0.5), batched_nms(boxes, scores, idxs, 0.5))):
        assert torch.equal(a, b)
    head = BoxHead()
    features, boxes, _ = fpn_inputs()
    torch.testing.assert_close(torch.compile(head, fullgraph=True)(features, boxes), head(features, boxes))


# ---- empty inputs (torchvision's behaviour) ----

def test_empty_inputs():
    e = torch.empty
    long = torch.int64
    # batched_nms: empty boxes return before any other argument is looked at.
    for keep in (batched_nms(e(0), None, None, None), batched_nms(e(0, 4), e(0), e(0, dtype=long), 0.5),
                 nms(e(0, 4), e(0), 0.5), torch.jit.script(batched_nms)(e(0, 4), e(0), e(0, dtype=long), 0.5)):
        assert keep.shape == (0,) and keep.dtype == long
    with pytest.raises(ValueError, match=r"boxes must be Tensor\[N, 4\]"):
        nms(e(0), e(0), 0.5)  # torchvision too rejects 1-D boxes in nms
    x = torch.randn(2, 3, 8, 8)
    for op in (roi_align, roi_pool):
        assert op(x, e(0, 5), 2).shape == (0, 3, 2, 2)
        assert op(x, [e(0, 4), e(0, 4)], 2).shape == (0, 3, 2, 2)
        assert op(e(0, 3, 8, 8), e(0, 5), 2).shape == (0, 3, 2, 2)
        assert op(e(2, 0, 8, 8), torch.tensor([[0.0, 0, 0, 4, 4]]), 2).shape == (1, 0, 2, 2)
        out = op(torch.randn(2, 3, 0, 8), torch.tensor([[0.0, 0, 0, 4, 4]]), 2)
        assert torch.equal(out, torch.zeros(1, 3, 2, 2))
    features, _, shapes = fpn_inputs()
    assert MultiScaleRoIAlign(["p2", "p3"], 3, 2)(features, [e(0, 4), e(0, 4)], shapes).shape == (0, 3, 3, 3)


@needs_torchvision
def test_empty_inputs_like_torchvision():
    e = torch.empty
    x = torch.randn(2, 3, 8, 8)
    cases = [("nms", (e(0, 4), e(0), 0.5)), ("batched_nms", (e(0), None, None, None)),
             ("batched_nms", (e(0, 4), e(0), e(0, dtype=torch.int64), 0.5)),
             ("roi_align", (x, e(0, 5), 2)), ("roi_align", (x, [e(0, 4)], 2)), ("roi_pool", (x, e(0, 5), 2)),
             ("roi_align", (e(0, 3, 8, 8), e(0, 5), 2)), ("roi_pool", (e(2, 0, 8, 8), e(0, 5), 2))]
    for name, args in cases:
        ours, theirs = globals()[name](*args), getattr(torchvision.ops, name)(*args)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name


# ---- quantized inputs ----

# torch 2.13+ deprecates creating quantized tensors; torchvision's RoIAlign and RoIPool still take them
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_inputs_computed_in_float32():
    x = torch.quantize_per_tensor(torch.rand(2, 3, 12, 16) * 4, 0.05, 10, torch.quint8)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 18.0], [1, 0.0, 0.0, 31.0, 23.0]])
    q_rois = torch.quantize_per_tensor(rois, 0.5, 0, torch.quint8)
    for op, reference in ((roi_align, roi_align_reference), (roi_pool, roi_pool_reference)):
        out = op(x, q_rois, 3, 0.5)
        assert out.dtype == torch.quint8 and out.q_scale() == 0.05 and out.q_zero_point() == 10
        expected = torch.quantize_per_tensor(reference(x.dequantize(), q_rois.dequantize(), 3, 0.5), 0.05, 10,
                                             torch.quint8)
        assert torch.equal(out.int_repr(), expected.int_repr())
        assert torch.equal(op(x, rois, 3, 0.5).int_repr(), out.int_repr())  # float32 boxes work too
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    q = lambda t, s: torch.quantize_per_tensor(t, s, 0, torch.quint8)  # noqa: E731
    assert nms(q(boxes, 0.1), q(scores, 0.01), 0.5).tolist() == [0, 2]
    assert batched_nms(q(boxes, 0.1), q(scores, 0.01), torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1, 2]


@needs_torchvision
def test_quantized_like_torchvision():
    x = torch.quantize_per_tensor(torch.rand(1, 3, 8, 8), 0.1, 3, torch.quint8)
    rois = torch.quantize_per_tensor(torch.tensor([[0.0, 1, 1, 5, 5]]), 0.1, 0, torch.quint8)
    ours, theirs = roi_align(x, rois, 2, 1.0, 2, True), torchvision.ops.roi_align(x, rois, 2, 1.0, 2, True)
    assert ours.q_scale() == theirs.q_scale() and ours.q_zero_point() == theirs.q_zero_point()
    assert (ours.int_repr().int() - theirs.int_repr().int()).abs().max() <= 1  # rounding of the last step


def test_math_of_fpn_inputs():
    # Guard for the helpers above: the FPN maps are exact power-of-two strides of the image.
    features, _, _ = fpn_inputs()
    assert [round(math.log2(IMAGE[0] / f.shape[2])) for f in features.values()] == [2, 3, 4]


def test_arguments_torchvision_accepts():
    # numpy integers (sizes read from arrays), a one-element tensor threshold, a detector's float class column
    import numpy as np
    x = torch.randn(2, 3, 16, 16)
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[2.0, 3.0, 15.0, 11.0]])]
    torch.testing.assert_close(roi_align(x, boxes, np.int64(3), 1.0, np.int64(2)), roi_align(x, boxes, 3, 1.0, 2))
    module = RoIAlign(np.int64(3), 1.0, np.int64(2))
    torch.testing.assert_close(torch.jit.script(module)(x, boxes), roi_align(x, boxes, 3, 1.0, 2))
    b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11]])
    s = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert torch.equal(nms(b, s, torch.tensor(0.5)), nms(b, s, 0.5))
    by_int = batched_nms(b, s, torch.tensor([0, 0, 1, 1]), 0.5)
    assert by_int.tolist() == [0, 2]
    assert torch.equal(batched_nms(b, s, torch.tensor([3.0, 3.0, 7.5, 7.5]), 0.5), by_int)
    assert torch.equal(batched_nms(b, s, torch.tensor([False, False, True, True]), 0.5), by_int)


def test_box_lists_of_mixed_dtypes_keep_the_wider_one():
    # under autocast the features are bf16 while a list may mix bf16 and fp32 boxes: fp32 coordinates stay fp32
    from normkit.ops.roi_common import boxes_to_rois
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16), torch.tensor([[1000.5, 2.25, 1234.5, 9.0]])]
    rois = boxes_to_rois(boxes, torch.zeros(2, 1, 4, 4, dtype=torch.bfloat16))
    assert rois.dtype == torch.float32 and rois[1, 1:].tolist() == [1000.5, 2.25, 1234.5, 9.0]
