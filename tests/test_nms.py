"""NMS and batched NMS against the definition (normkit.ops.nms_reference) and hand-built threshold cases."""
import pytest
import torch

from conftest import DEVICES
from normkit.ops import batched_nms, nms, nms_reference

try:
    import torchvision
except ImportError:  # the default CI has no torchvision
    torchvision = None


def random_boxes(n, device="cpu", dtype=torch.float32, spread=100.0):
    xy = torch.rand(n, 2, dtype=torch.float64) * spread
    wh = torch.rand(n, 2, dtype=torch.float64) * spread * 0.3 + 1
    return torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)


def pair_with_iou(iou: float, offset: int) -> torch.Tensor:
    """Two boxes of equal height h whose IoU is `iou`: (0, 0, w - o, h - o) and (s, 0, s + w - o, h - o) with
    o = offset, overlap (w - s) / (w + s) = iou -> s = w (1 - iou) / (1 + iou)."""
    w, h = 48.0, 10.0  # iou = 0.5 gives s = 16: exactly representable
    s = w * (1 - iou) / (1 + iou)
    return torch.tensor([[0.0, 0.0, w - offset, h - offset], [s, 0.0, s + w - offset, h - offset]], dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_matches_reference(device, offset, threshold):
    boxes = random_boxes(300, device)
    scores = torch.rand(300, device=device)
    keep = nms(boxes, scores, threshold, offset)
    assert keep.dtype == torch.long
    assert torch.equal(keep, nms_reference(boxes, scores, threshold, offset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(device, offset, dtype):
    boxes = random_boxes(200, device, dtype)
    scores = torch.rand(200, device=device).to(dtype)
    assert torch.equal(nms(boxes, scores, 0.5, offset), nms_reference(boxes, scores, 0.5, offset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
def test_just_above_and_below_threshold(device, offset):
    threshold = 0.5
    for iou, suppressed in ((threshold + 1e-3, True), (threshold - 1e-3, False)):
        boxes = pair_with_iou(iou, offset).float().to(device)
        keep = nms(boxes, torch.tensor([0.9, 0.8], device=device), threshold, offset).tolist()
        assert keep == ([0] if suppressed else [0, 1]), (iou, offset)
        assert keep == nms_reference(boxes, torch.tensor([0.9, 0.8], device=device), threshold, offset).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_exact_threshold_suppressed_only_by_legacy(device):
    # IoU exactly 0.5 in both conventions: torchvision keeps (IoU > t), Detectron legacy suppresses (IoU >= t).
    for offset, expected in ((0, [0, 1]), (1, [0])):
        boxes = pair_with_iou(0.5, offset).to(device)
        scores = torch.tensor([0.9, 0.8], dtype=torch.float64, device=device)
        assert nms(boxes, scores, 0.5, offset).tolist() == expected
        assert nms_reference(boxes, scores, 0.5, offset).tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_offset_changes_iou(device):
    # (0, 0, 1, 1) vs (1, 0, 2, 1): touching (IoU 0) without the +1; with it each is 2x2 and they share a
    # 1x2 column, IoU 2 / 6 = 1/3.
    boxes = torch.tensor([[0.0, 0, 1, 1], [1.0, 0, 2, 1]], device=device)
    scores = torch.tensor([0.9, 0.8], device=device)
    assert nms(boxes, scores, 0.3, 0).tolist() == [0, 1]
    assert nms(boxes, scores, 0.3, 1).tolist() == [0]
    assert nms(boxes, scores, 0.34, 1).tolist() == [0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_ties_keep_input_order(device):
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10.5, 10], [50.0, 50, 60, 60], [0.2, 0, 10.2, 10]], device=device)
    scores = torch.tensor([0.5, 0.7, 0.7, 0.7], device=device)
    # Among the 0.7s input order decides: box 1 is kept and suppresses 3 and 0; box 2 is disjoint.
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms_reference(boxes, scores, 0.5).tolist() == [1, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_degenerate(device):
    empty = torch.zeros(0, 4, device=device)
    assert nms(empty, torch.zeros(0, device=device), 0.5).shape == (0,)
    assert batched_nms(empty, torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device),
                       0.5).shape == (0,)
    # Zero-area boxes have IoU 0/0 = NaN, which never suppresses.
    points = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1]], device=device)
    assert nms(points, torch.tensor([0.9, 0.8], device=device), 0.5).tolist() == [0, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
def test_batched_nms_equals_per_class_nms(device, offset):
    boxes = random_boxes(400, device, spread=60.0)
    boxes[:50] -= 80  # negative coordinates must not let classes overlap
    scores = torch.rand(400, device=device)
    idxs = torch.randint(0, 5, (400,), device=device)
    expected = torch.cat([torch.nonzero(idxs == c).flatten()[nms_reference(boxes[idxs == c], scores[idxs == c], 0.5,
                                                                         offset)] for c in range(5)])
    expected = expected[torch.sort(scores[expected], descending=True, stable=True).indices]
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5, offset), expected)


def test_batched_nms_groups_floating_point_categories_by_value():
    # Non-integral category values (a float score-bin column, say) are distinct categories, not truncated to ints.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10.5, 10], [1.0, 0, 11, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0.25, 0.75, 0.25]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([-0.5, 0.5, 1.5]), 0.5).tolist() == [0, 1, 2]
    assert batched_nms(boxes, scores, torch.tensor([True, False, True]), 0.5).tolist() == [0, 1]


def clustered_boxes(n, generator):
    """Jittered copies of n / 10 boxes (as RPN proposals are): most boxes are suppressed by an earlier one."""
    base = random_boxes(-(-n // 10), spread=400.0).repeat(10, 1)[:n]
    return base + torch.randn(n, 4, generator=generator, dtype=torch.float64).float() * 2


def per_class_reference(boxes, scores, idxs, threshold, offset):
    """batched NMS from its definition: the reference NMS within each category, merged by decreasing score."""
    kept = [torch.nonzero(idxs == c).flatten()[nms_reference(boxes[idxs == c], scores[idxs == c], threshold, offset)]
            for c in torch.unique(idxs)]
    kept = torch.cat(kept)
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


# 2500 boxes in several categories take the CPU kernel's parallel path over categories.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n, classes", [(600, 1), (2500, 1), (2500, 4), (2500, 90)])
def test_clustered_boxes_match_reference(device, offset, n, classes):
    generator = torch.Generator().manual_seed(n + classes)
    boxes = clustered_boxes(n, generator)
    scores = torch.rand(n, generator=generator)
    idxs = torch.randint(0, classes, (n,), generator=generator)
    if classes == 1:
        expected = nms_reference(boxes, scores, 0.6, offset)
        assert torch.equal(nms(boxes.to(device), scores.to(device), 0.6, offset).cpu(), expected)
    expected = per_class_reference(boxes, scores, idxs, 0.6, offset)
    assert torch.equal(batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.6, offset).cpu(), expected)


def grouping_case(generator):
    """3000 clustered boxes: 60 small categories and one of 1000 boxes, 21 distinct scores (many ties) and NaNs."""
    boxes = clustered_boxes(3000, generator)
    scores = torch.randint(0, 21, (3000,), generator=generator).float() / 20
    scores[[5, 1700, 2999]] = float("nan")
    idxs = torch.randint(0, 60, (3000,), generator=generator)
    idxs[torch.randperm(3000, generator=generator)[:1000]] = 77
    return boxes, scores, idxs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
def test_batched_nms_in_groups_equals_one_pass(device, offset):
    # CUDA's batched_nms runs over groups of whole categories above 4096 boxes (its bitmask is quadratic in the
    # boxes it is given): any grouping must keep the boxes, and the order (ties and NaNs too), of one pass.
    boxes, scores, idxs = grouping_case(torch.Generator().manual_seed(11))
    expected = batched_nms(boxes, scores, idxs, 0.6, offset)
    assert torch.equal(expected.sort().values, per_class_reference(boxes, scores, idxs, 0.6, offset).sort().values)
    boxes, scores, idxs = boxes.to(device), scores.to(device), idxs.to(device)
    for max_group_boxes in (1, 7, 100, 999, 1000, 2999, 3000):
        kept = torch.ops.normkit._batched_nms_in_groups(boxes, scores, idxs, 0.6, offset, max_group_boxes)
        assert torch.equal(kept.cpu(), expected), max_group_boxes
    with pytest.raises(RuntimeError, match="max_group_boxes must be positive"):
        torch.ops.normkit._batched_nms_in_groups(boxes, scores, idxs, 0.6, offset, 0)


@pytest.mark.parametrize("offset", [0, 1])
def test_batched_nms_on_several_threads_matches_reference(offset):
    # From 2048 boxes the CPU kernel runs its categories as parallel tasks, each on its own slice of the scratch
    # flags: 2 and 3 threads must keep the reference set (several runs, as a shared slice would be a race).
    generator = torch.Generator().manual_seed(7)
    boxes = clustered_boxes(2500, generator)
    scores = torch.rand(2500, generator=generator)
    idxs = torch.randint(0, 4, (2500,), generator=generator)
    expected = per_class_reference(boxes, scores, idxs, 0.6, offset)
    threads = torch.get_num_threads()
    try:
        for count in (2, 3):
            torch.set_num_threads(count)
            for _ in range(3):
                assert torch.equal(batched_nms(boxes, scores, idxs, 0.6, offset), expected)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(torchvision is None, reason="needs torchvision")
@pytest.mark.parametrize("n", [500, 5000])  # torchvision's batched NMS changes strategy above 4000 boxes on CPU
@pytest.mark.parametrize("classes", [1, 3, 80])
def test_kept_indices_equal_torchvision(n, classes):
    generator = torch.Generator().manual_seed(n + classes)
    boxes = clustered_boxes(n, generator)
    # Distinct scores: torchvision's per-category strategy orders equal scores arbitrarily.
    scores = torch.randperm(n, generator=generator).float() / n
    idxs = torch.randint(0, classes, (n,), generator=generator)
    for threshold in (0.5, 0.7):
        assert torch.equal(nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))
        assert torch.equal(batched_nms(boxes, scores, idxs, threshold),
                           torchvision.ops.batched_nms(boxes, scores, idxs, threshold))


def test_opcheck_and_compile():
    boxes, scores = random_boxes(40), torch.rand(40)
    torch.library.opcheck(torch.ops.normkit.nms.default, (boxes, scores, 0.5, 0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(torch.ops.normkit._batched_nms_in_groups.default,
                          (boxes, scores, torch.arange(40) % 5, 0.5, 0, 16),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda b, s: nms(b, s, 0.5) * 2)
    assert torch.equal(compiled(boxes, scores), nms_reference(boxes, scores, 0.5) * 2)


def test_autocast_runs_in_float32():
    boxes, scores = random_boxes(50), torch.rand(50)
    idxs = torch.arange(50) % 3
    distinct_scores = torch.randperm(50).float() / 64  # exact in bf16: no ties to order across categories
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keep = nms(boxes, scores.bfloat16(), 0.5)
        keep_batched = batched_nms(boxes, distinct_scores.bfloat16(), idxs, 0.5)
    assert torch.equal(keep, nms_reference(boxes, scores.bfloat16().float(), 0.5))
    assert torch.equal(keep_batched, per_class_reference(boxes, distinct_scores, idxs, 0.5, 0))


@pytest.mark.parametrize("call, message", [
    (lambda: nms(torch.zeros(3, 5), torch.zeros(3), 0.5), r"boxes must be Tensor\[N, 4\].*Tensor\[3, 5\]"),
    (lambda: nms(torch.zeros(3, 4), torch.zeros(2), 0.5), r"scores must be Tensor\[3\]"),
    (lambda: nms(torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64), 0.5), r"same dtype as boxes"),
    (lambda: nms(torch.zeros(3, 4), torch.zeros(3, device="meta"), 0.5), r"same device as boxes"),
    (lambda: nms(torch.zeros(3, 4), torch.zeros(3), 0.5, offset=2), r"offset must be the int 0 .* or 1"),
    (lambda: nms(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0.5), r"floating-point"),
    (lambda: batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.long), 0.5),
     r"a Tensor\[3\] of category indices"),
    (lambda: nms(torch.zeros(3, 4), torch.zeros(3), torch.tensor([0.5, 0.7])), r"iou_threshold must be a number"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1, 63, 64, 65, 3000])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_equals_cpu(n, offset):
    boxes, scores = random_boxes(n, spread=30.0), torch.rand(n)
    expected = nms(boxes, scores, 0.5, offset)
    assert torch.equal(nms(boxes.cuda(), scores.cuda(), 0.5, offset).cpu(), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_nms_above_the_mask_limit_equals_cpu():
    # 12000 boxes: above 4096 the CUDA batched NMS runs over groups of whole categories, one larger than a group.
    generator = torch.Generator().manual_seed(3)
    boxes = torch.cat([grouping_case(generator)[0] for _ in range(4)])
    scores = torch.rand(12000, generator=generator)
    idxs = torch.randint(0, 500, (12000,), generator=generator)
    idxs[:5000] = 1000
    expected = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu(), expected)
