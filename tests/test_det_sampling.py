"""Matcher ties, RPN anchor sampling (Detectron-1 with replacement, detectron2 without), RoI sampling."""
import pytest
import torch

from normkit.models.detection import Matcher, rpn_anchor_labels, sample_rois, subsample_labels


def test_matcher_thresholds_and_low_quality_ties():
    iou = torch.tensor([[0.1, 0.35, 0.8, 0.2, 0.2],
                        [0.2, 0.2, 0.1, 0.2, 0.0]])
    matched, labels = Matcher((0.3, 0.7), (0, -1, 1))(iou)
    assert labels.tolist() == [0, -1, 1, 0, 0]
    assert matched.tolist() == [1, 0, 0, 0, 0]  # equal IoUs go to the first ground truth (numpy argmax)
    _, labels = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)(iou)
    # gt 1's best IoU (0.2) is shared by predictions 0, 1 and 3: all become positive
    assert labels.tolist() == [1, 1, 1, 1, 0]


def test_matcher_without_ground_truth():
    matched, labels = Matcher((0.5,), (0, 1))(torch.zeros(0, 4))
    assert labels.tolist() == [0, 0, 0, 0] and matched.tolist() == [0, 0, 0, 0]


def test_matcher_rejects_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        Matcher((0.3, 0.7), (0, 1))
    with pytest.raises(ValueError, match="increasing"):
        Matcher((0.7, 0.3), (0, -1, 1))


def test_rpn_labels_detectron_ties_and_fraction():
    gen = torch.Generator().manual_seed(0)
    iou = torch.zeros(2, 2000)
    iou[0, :300] = 0.8            # 300 clear positives
    iou[1, 1500] = 0.25           # gt 1's best anchors: 1500 and 1501 (a tie), both below 0.3
    iou[1, 1501] = 0.25
    iou[0, 300:400] = 0.5         # ignored band
    labels, matched = rpn_anchor_labels(iou, 256, 0.5, 0.7, 0.3, bg_with_replacement=True, generator=gen)
    fg = labels == 1
    assert int(fg.sum()) == 128                       # positives capped at 0.5 * 256 without replacement
    assert (labels[300:400] == -1).all()              # IoU in [0.3, 0.7) never sampled
    bg = labels == 0
    # negatives drawn with replacement: at most 128 distinct, usually a few fewer
    assert 100 < int(bg.sum()) <= 128
    assert int((labels >= 0).sum()) <= 256
    assert matched[1500].item() == 1


def test_rpn_labels_detectron_negative_can_override_tied_positive():
    # a ground truth whose best IoU is below the negative threshold: its tied best anchors are first
    # labelled positive, then (Detectron-1 order) may be drawn as negatives
    iou = torch.zeros(1, 10)
    iou[0, 3] = 0.1
    gen = torch.Generator().manual_seed(1)
    labels, _ = rpn_anchor_labels(iou, 8, 0.5, 0.7, 0.3, bg_with_replacement=True, generator=gen)
    assert labels[3].item() in (0, 1)
    # fewer negative candidates than free slots: Detectron-1 labels none of them
    labels, _ = rpn_anchor_labels(iou, 256, 0.5, 0.7, 0.3, bg_with_replacement=True, generator=gen)
    assert labels.tolist() == [-1, -1, -1, 1, -1, -1, -1, -1, -1, -1]


def test_rpn_labels_d2_without_replacement():
    gen = torch.Generator().manual_seed(0)
    iou = torch.zeros(1, 1000)
    iou[0, :10] = 0.9
    labels, _ = rpn_anchor_labels(iou, 256, 0.5, 0.7, 0.3, bg_with_replacement=False, generator=gen)
    assert int((labels == 1).sum()) == 10 and int((labels == 0).sum()) == 246


def test_subsample_labels_proportions():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([1] * 100 + [0] * 1000 + [-1] * 50)
    out = subsample_labels(labels, 512, 0.25, gen)
    assert int((out == 1).sum()) == 100 and int((out == 0).sum()) == 412
    assert (out[1100:] == -1).all()


def test_sample_rois_fraction_no_replacement_and_crowd():
    gen = torch.Generator().manual_seed(0)
    overlaps = torch.cat((torch.full((200,), 0.6), torch.full((1000,), 0.2), torch.full((5,), -1.0),
                          torch.full((10,), 0.55)))
    fg, bg = sample_rois(overlaps, 512, 0.25, 0.5, 0.5, 0.0, gen)
    assert fg.numel() == 128 and bg.numel() == 384
    assert fg.unique().numel() == 128 and bg.unique().numel() == 384   # without replacement
    assert (overlaps[fg] >= 0.5).all() and ((overlaps[bg] >= 0) & (overlaps[bg] < 0.5)).all()
    # few candidates: everything is used, crowd (-1) never
    fg, bg = sample_rois(overlaps[1200:], 512, 0.25, 0.5, 0.5, 0.0, gen)
    assert fg.numel() == 10 and bg.numel() == 0
    # C4 setting: 256 RoIs -> 64 foreground
    fg, bg = sample_rois(overlaps, 256, 0.25, 0.5, 0.5, 0.0, gen)
    assert fg.numel() == 64 and bg.numel() == 192


def test_thresholds_at_their_exact_values():
    # Detectron-1 / detectron2: positive at IoU >= 0.7 (RPN) and >= 0.5 (RoIs), negative below 0.3 (RPN) and in
    # [0, 0.5) (RoIs); the bounds are exact in float32 so the comparisons decide
    iou = torch.tensor([[0.7, 0.3, 0.29, 0.69, 0.0, 0.75]])
    _, labels = Matcher((0.3, 0.7), (0, -1, 1))(iou)
    assert labels.tolist() == [1, -1, 0, -1, 0, 1]
    labels, _ = rpn_anchor_labels(iou, 256, 0.5, 0.7, 0.3, bg_with_replacement=False)
    assert labels.tolist() == [1, -1, 0, -1, 0, 1]
    # Detectron-1 order: positives first; 2 negative candidates and 254 free slots -> none drawn
    labels, _ = rpn_anchor_labels(iou, 256, 0.5, 0.7, 0.3, bg_with_replacement=True)
    assert labels.tolist() == [1, -1, -1, -1, -1, 1]
    fg, bg = sample_rois(torch.tensor([0.5, 0.49, 0.0, 1.0, -1.0]), 512, 0.25, 0.5, 0.5, 0.0)
    assert sorted(fg.tolist()) == [0, 3] and sorted(bg.tolist()) == [1, 2]


def test_rpn_labels_detectron_draws_negatives_only_when_they_outnumber_the_slots():
    iou = torch.zeros(1, 12)
    iou[0, 0] = 0.9                       # 1 positive; 11 negative candidates
    gen = torch.Generator().manual_seed(0)
    labels, _ = rpn_anchor_labels(iou, 12, 0.5, 0.7, 0.3, bg_with_replacement=True, generator=gen)
    assert labels.tolist() == [1] + [-1] * 11                          # 11 candidates, 11 free slots: none
    labels, _ = rpn_anchor_labels(iou, 11, 0.5, 0.7, 0.3, bg_with_replacement=True, generator=gen)
    assert labels[0].item() == 1 and 1 <= int((labels == 0).sum()) <= 10  # 11 > 10: 10 draws with replacement
    # an IoU of exactly 0.3 is not negative: never drawn
    iou = torch.cat((torch.tensor([0.9]), torch.full((20,), 0.3), torch.zeros(20)))[None]
    labels, _ = rpn_anchor_labels(iou, 12, 0.5, 0.7, 0.3, bg_with_replacement=True, generator=gen)
    assert (labels[1:21] == -1).all() and int((labels[21:] == 0).sum()) >= 1


def test_rpn_labels_d2_low_quality_matches():
    # detectron2 (allow_low_quality_matches): each ground truth's best anchors are positive even below 0.3
    iou = torch.tensor([[0.1, 0.25, 0.25, 0.0], [0.8, 0.0, 0.0, 0.0]])
    labels, matched = rpn_anchor_labels(iou, 256, 0.5, 0.7, 0.3, bg_with_replacement=False)
    assert labels.tolist() == [1, 1, 1, 0] and matched.tolist() == [1, 0, 0, 0]


def test_subsample_labels_caps_the_positives():
    gen = torch.Generator().manual_seed(0)
    out = subsample_labels(torch.tensor([1] * 300 + [0] * 1000), 256, 0.5, gen)
    assert int((out == 1).sum()) == 128 and int((out == 0).sum()) == 128
    out = subsample_labels(torch.tensor([1] * 300 + [0] * 1000), 512, 0.25, gen)
    assert int((out == 1).sum()) == 128 and int((out == 0).sum()) == 384


def test_sample_rois_fills_the_batch_with_background_when_foreground_is_scarce():
    gen = torch.Generator().manual_seed(0)
    overlaps = torch.cat((torch.full((20,), 0.7), torch.full((1000,), 0.1)))
    fg, bg = sample_rois(overlaps, 512, 0.25, 0.5, 0.5, 0.0, gen)
    assert fg.numel() == 20 and bg.numel() == 492   # 512 - 20, not 512 - 128
