import pytest
import torch

from normkit.engine import PolyLR, WarmupStepLR, build_lr_scheduler


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
