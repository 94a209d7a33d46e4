from pathlib import Path

import pytest
import torch

from normkit.engine import PolyLR, WarmupStepLR, build_lr_scheduler, scale_to_total_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _optimizer(lrs):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=lrs[0])


def _lrs_over(scheduler, iterations):
    seen = []
    for _ in range(iterations):
        seen.append(scheduler.get_last_lr())
        scheduler.step()
    return seen


def test_poly_with_min_lr_matches_hand_computed_values():
    # (base - min_lr) * (1 - t/10)^0.9 + min_lr, with 0.5^0.9 = 0.535887, 0.9^0.9 = 0.909533, 0.1^0.9 = 0.125893
    scheduler = PolyLR(_optimizer([0.1, 1.0]), max_iter=10, power=0.9, min_lr=0.001)
    lrs = _lrs_over(scheduler, 11)
    assert lrs[0] == pytest.approx([0.1, 1.0])
    assert lrs[1] == pytest.approx([0.099 * 0.909533 + 0.001, 0.999 * 0.909533 + 0.001], rel=1e-5)
    assert lrs[5] == pytest.approx([0.099 * 0.535887 + 0.001, 0.999 * 0.535887 + 0.001], rel=1e-5)
    assert lrs[9] == pytest.approx([0.099 * 0.125893 + 0.001, 0.999 * 0.125893 + 0.001], rel=1e-5)
    assert lrs[10] == pytest.approx([0.001, 0.001])
    scheduler.step()  # past max_iter the rate stays at min_lr
    assert scheduler.get_last_lr() == pytest.approx([0.001, 0.001])


def test_csail_poly_without_min_lr():
    # CSAIL: lr = 0.02 * (1 - t/max)^0.9; (1 - 3/4)^0.9 = 0.25^0.9 = 0.287175
    scheduler = PolyLR(_optimizer([0.02]), max_iter=4, power=0.9)
    assert _lrs_over(scheduler, 4)[3] == pytest.approx([0.02 * 0.287175], rel=1e-5)


def test_step_with_linear_warmup():
    scheduler = WarmupStepLR(_optimizer([0.02]), steps=[6, 8], gamma=0.1, warmup_iters=4, warmup_factor=1 / 3)
    lrs = [lr[0] for lr in _lrs_over(scheduler, 10)]
    # warmup factor = 1/3 * (1 - t/4) + t/4: t=0 -> 1/3, t=2 -> 2/3, t=3 -> 5/6
    expected = [0.02 / 3, 0.02 * 0.5, 0.02 * 2 / 3, 0.02 * 5 / 6, 0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002]
    assert lrs == pytest.approx(expected)


def test_constant_warmup_and_builder():
    optimizer = _optimizer([0.1])
    scheduler = build_lr_scheduler(optimizer, {"policy": "step", "steps": [3], "warmup_iters": 2,
                                               "warmup_factor": 0.1, "warmup_method": "constant"}, max_iter=5)
    assert [lr[0] for lr in _lrs_over(scheduler, 5)] == pytest.approx([0.01, 0.01, 0.1, 0.01, 0.01])


def test_state_round_trip_sets_the_same_rate():
    first = PolyLR(_optimizer([0.1]), max_iter=10, power=2.0)
    _lrs_over(first, 7)
    optimizer = _optimizer([0.1])
    resumed = PolyLR(optimizer, max_iter=10, power=2.0)
    resumed.load_state_dict(first.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.3 ** 2)
    first.step(), resumed.step()
    assert resumed.get_last_lr() == first.get_last_lr()


def test_builder_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown train.lr_schedule.policy 'cosine'"):
        build_lr_scheduler(_optimizer([0.1]), {"policy": "cosine"}, 10)
    with pytest.raises(ValueError, match=r"train.lr_schedule.gama \(did you mean train.lr_schedule.gamma\?\)"):
        build_lr_scheduler(_optimizer([0.1]), {"policy": "step", "steps": [2], "gama": 0.1}, 10)
    with pytest.raises(ValueError, match="steps is required"):
        build_lr_scheduler(_optimizer([0.1]), {"policy": "step"}, 10)
    with pytest.raises(ValueError, match="increasing"):
        build_lr_scheduler(_optimizer([0.1]), {"policy": "step", "steps": [5, 2]}, 10)


@pytest.mark.parametrize("schedule, message", [
    ({"policy": "poly", "power": "0.9"}, "power must be a finite number, got '0.9'"),
    ({"policy": "poly", "power": -1.0}, "power must be > 0, got -1.0"),  # lr = 0 ** -1 at the last iteration
    ({"policy": "poly", "min_lr": "1e-4"}, "min_lr must be a finite number, got '1e-4'"),
    ({"policy": "poly", "min_lr": -1e-4}, "min_lr must be >= 0.0, got -0.0001"),
    ({"policy": "step", "steps": [5], "gamma": True}, "gamma must be a finite number, got True"),
    ({"policy": "step", "steps": [5], "gamma": 0}, "gamma must be > 0, got 0"),
    ({"policy": "step", "steps": [5], "warmup_iters": 2, "warmup_factor": float("nan")},
     "warmup_factor must be a finite number"),
])
def test_builder_rejects_bad_numbers_before_training(schedule, message):
    with pytest.raises(ValueError, match="train.lr_schedule." + message):
        build_lr_scheduler(_optimizer([0.1]), schedule, 10)


def test_linear_scaling_rule_scales_lr_and_schedule_with_the_total_batch():
    train = {"max_iter": 180000, "batch_size": 2,
             "optimizer": {"name": "sgd", "lr": 0.02, "reference_batch": 16, "bias_lr_mult": 2.0},
             "lr_schedule": {"policy": "step", "steps": [120000, 160000], "warmup_iters": 500}}
    # 8 processes x 2 images: the reference batch, nothing changes but the key disappears
    assert scale_to_total_batch(train, 16) == {
        "max_iter": 180000, "batch_size": 2, "optimizer": {"name": "sgd", "lr": 0.02, "bias_lr_mult": 2.0},
        "lr_schedule": {"policy": "step", "steps": [120000, 160000], "warmup_iters": 500}}
    # one process with 2 images: lr / 8, iterations x 8 (Detectron's GETTING_STARTED example)
    one_gpu = scale_to_total_batch(train, 2)
    assert one_gpu["optimizer"]["lr"] == pytest.approx(0.0025)
    assert (one_gpu["max_iter"], one_gpu["lr_schedule"]["steps"], one_gpu["lr_schedule"]["warmup_iters"]) == \
        (1440000, [960000, 1280000], 4000)
    # 64 images: lr x 4, iterations / 4
    big = scale_to_total_batch(train, 64)
    assert big["optimizer"]["lr"] == pytest.approx(0.08)
    assert (big["max_iter"], big["lr_schedule"]["steps"], big["lr_schedule"]["warmup_iters"]) == \
        (45000, [30000, 40000], 125)
    # 128 images: warmup 500 / 8 = 62.5 rounds half up to 63, as Detectron.pytorch's int(x * scale + 0.5)
    assert scale_to_total_batch(train, 128)["lr_schedule"]["warmup_iters"] == 63
    assert train["optimizer"]["reference_batch"] == 16  # the input is not modified
    # a poly schedule's floor scales with the lr (CondNet: 0.01 -> 1e-4 at 16 images)
    poly = {"max_iter": 160000, "optimizer": {"lr": 0.01, "reference_batch": 16},
            "lr_schedule": {"policy": "poly", "power": 0.9, "min_lr": 1e-4}}
    assert scale_to_total_batch(poly, 128)["lr_schedule"] == {"policy": "poly", "power": 0.9,
                                                              "min_lr": pytest.approx(8e-4)}
    no_reference = {"max_iter": 10, "optimizer": {"lr": 0.1}}
    assert scale_to_total_batch(no_reference, 64) is no_reference
    # a schedule shorter than one iteration at this batch still trains one (1 x 16 / 64 = 0.25 rounds to 0)
    assert scale_to_total_batch({"max_iter": 1, "optimizer": {"lr": 0.1, "reference_batch": 16}}, 64)["max_iter"] == 1
    for bad in (0, True, 16.0):
        with pytest.raises(ValueError, match="reference_batch must be a positive integer"):
            scale_to_total_batch({"optimizer": {"lr": 0.1, "reference_batch": bad}}, 8)


def test_detectron_recipe_rates_at_given_iterations():
    """scratch Mask R-CNN SN 3x on one process with 2 images: lr 0.02 x 2/16, warmup 4000 iterations from 1/3,
    decay x0.1 at 1680000 and 2000000; biases at twice the rate of the weights."""
    from normkit.engine import build_optimizer, load_config
    from normkit.nn import SwitchNorm2d

    cfg = load_config(CONFIGS / "detection" / "scratch_e2e_mask_rcnn_R-50-FPN_3x_sn.yaml")
    train = scale_to_total_batch(cfg["train"], cfg["train"]["batch_size"])
    assert train["max_iter"] == 2160000
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), SwitchNorm2d(4))
    optimizer = build_optimizer(model, train["optimizer"])
    scheduler = build_lr_scheduler(optimizer, train["lr_schedule"], train["max_iter"])
    weight = next(i for i, g in enumerate(optimizer.param_groups) if g["weight_decay"] == 1e-4)
    bias = next(i for i, g in enumerate(optimizer.param_groups) if g["lr_mult"] == 2.0)
    expected = {0: 0.0025 / 3, 2000: 0.0025 * (1 / 3 * 0.5 + 0.5), 4000: 0.0025, 1679999: 0.0025,
                1680000: 0.00025, 2000000: 0.000025, 2159999: 0.000025}
    for iteration, lr in expected.items():
        scheduler.iteration = iteration - 1
        scheduler.step()
        rates = scheduler.get_last_lr()
        assert rates[weight] == pytest.approx(lr, rel=1e-9), iteration
        assert rates[bias] == pytest.approx(2 * lr, rel=1e-9), iteration
