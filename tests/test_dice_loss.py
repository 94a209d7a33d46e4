"""normkit.nn.dice_loss / DiceLoss against a loop-by-loop reference written from the definition."""
import math

import pytest
import torch

from normkit.nn import DiceLoss, dice_loss


def dice_reference(logits, target, ignore_index=255, smooth=1e-5, exponent=2, mask_denominator=False):
    """MMSegmentation 0.x DiceLoss, pixel by pixel: softmax over classes; per sample and class,
    1 - (2 * sum(p * t * valid) + smooth) / (sum(p^e + t^e) + smooth), where an ignored pixel's one-hot
    label is its label clamped to K-1 (and it is dropped from the denominator with mask_denominator);
    classes summed (skipping k == ignore_index), divided by K, averaged over the batch."""
    b_size, k_size = logits.shape[:2]
    prob = torch.softmax(logits.double(), dim=1).reshape(b_size, k_size, -1)
    labels = target.reshape(b_size, -1)
    total = 0.0
    for b in range(b_size):
        sample = 0.0
        for k in range(k_size):
            if k == ignore_index:
                continue
            intersection = denominator = 0.0
            for i in range(labels.shape[1]):
                label = int(labels[b, i])
                valid = label != ignore_index
                t = 1.0 if min(max(label, 0), k_size - 1) == k else 0.0
                p = float(prob[b, k, i])
                if valid:
                    intersection += p * t
                if valid or not mask_denominator:
                    denominator += p ** exponent + t ** exponent
            sample += 1 - (2 * intersection + smooth) / (denominator + smooth)
        total += sample / k_size
    return total / b_size


def sample(b=2, k=4, h=3, w=5, ignored=3):
    logits = torch.randn(b, k, h, w, dtype=torch.float64) * 2
    target = torch.randint(0, k, (b, h, w))
    target.view(-1)[torch.randperm(target.numel())[:ignored]] = 255
    return logits, target


@pytest.mark.parametrize("mask_denominator", [False, True])
@pytest.mark.parametrize("exponent", [2, 1])
@pytest.mark.parametrize("smooth", [1e-5, 1.0])
def test_matches_definition(mask_denominator, exponent, smooth):
    logits, target = sample()
    got = dice_loss(logits, target, smooth=smooth, exponent=exponent, mask_denominator=mask_denominator)
    expected = dice_reference(logits, target, smooth=smooth, exponent=exponent, mask_denominator=mask_denominator)
    assert math.isclose(got.item(), expected, rel_tol=1e-9)


def test_hand_computed():
    # One pixel, logits (0, 0) -> p = (1/2, 1/2), label 0. Class 0: 1 - (1 + s) / (1/4 + 1 + s);
    # class 1: 1 - s / (1/4 + s). Mean over the two classes.
    s = 1e-5
    expected = ((1 - (1 + s) / (1.25 + s)) + (1 - s / (0.25 + s))) / 2
    got = dice_loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_ignore_index_inside_class_range_skips_that_class():
    logits, target = sample(k=5, ignored=0)
    assert math.isclose(dice_loss(logits, target, ignore_index=2).item(),
                        dice_reference(logits, target, ignore_index=2), rel_tol=1e-9)


def test_all_ignored_and_low_precision():
    logits, _ = sample()
    target = torch.full((2, 3, 5), 255)
    assert math.isclose(dice_loss(logits, target).item(), dice_reference(logits, target), rel_tol=1e-9)
    got = dice_loss(logits.to(torch.bfloat16), _)
    assert got.dtype == torch.float32 and abs(got.item() - dice_reference(logits, _)) < 0.02


def test_target_resized_nearest_like_official():
    logits, target = sample(h=3, w=4)
    big = target.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # each label a 2x2 block
    torch.testing.assert_close(dice_loss(logits, big), dice_loss(logits, target))


def test_gradient_flows_and_module_weight():
    logits, target = sample()
    logits.requires_grad_()
    loss = DiceLoss(loss_weight=0.2)(logits, target)
    assert math.isclose(loss.item(), 0.2 * dice_reference(logits.detach(), target), rel_tol=1e-9)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("logits_shape, target, kwargs, match", [
    ((2, 4, 3, 5), torch.zeros(2, 3, 5, dtype=torch.long), {"num_classes": 5}, "4 classes but num_classes=5"),
    ((2, 4, 3, 5), torch.zeros(3, 3, 5, dtype=torch.long), {}, r"target must be Tensor\[2, H, W\]"),
    ((2, 4, 3, 5), torch.zeros(2, 3, 5), {}, "integer labels"),
    ((2, 4, 3, 5), torch.full((2, 3, 5), 4), {}, r"labels must be in \[0, 4\)"),
    ((2, 4, 15), torch.zeros(2, 3, 5, dtype=torch.long), {}, r"logits must be Tensor\[B, K, H, W\]"),
])
def test_bad_inputs(logits_shape, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dice_loss(torch.randn(logits_shape), target, **kwargs)
