import json

import pytest
import torch

from engine_toys import ToySegNet, toy_loader_fn
from normkit.engine import (Checkpointer, EvalHook, HookBase, MetricsWriter, PeriodicCheckpointer, PolyLR, Trainer,
                            has_evaluation_record)


class RecordLosses(HookBase):
    def __init__(self):
        self.losses = {}

    def after_step(self):
        self.losses[self.trainer.iter] = self.trainer.scalars["total_loss"]


class StopAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise KeyboardInterrupt  # a killed run: nothing after this point is saved


def _trainer(model, loader_fn, max_iter, *, iter_size=1, amp=None, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = PolyLR(optimizer, max_iter, power=0.9)
    return Trainer(model, optimizer, scheduler, loader_fn, max_iter=max_iter, iter_size=iter_size, amp=amp)


def _model(seed=0):
    torch.manual_seed(seed)
    return ToySegNet(norm="bn", dropout=0.3)  # running stats and dropout: state and RNG both matter


@pytest.mark.parametrize("iter_size", [1, 2])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, iter_size):
    # with iter_size 2 the resumed run must start at micro-batch 2 x 3 = 6, not at batch 3
    torch.manual_seed(1)
    reference = _trainer(_model(), toy_loader_fn(), max_iter=8, iter_size=iter_size)
    recorded = RecordLosses()
    reference.register_hooks([recorded])
    reference.train()

    torch.manual_seed(1)
    interrupted = _trainer(_model(), toy_loader_fn(), max_iter=8, iter_size=iter_size)
    checkpointer = Checkpointer(tmp_path)
    interrupted.register_hooks([PeriodicCheckpointer(checkpointer, period=3), StopAt(5)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert checkpointer.load()["iteration"] == 3

    torch.manual_seed(1234)  # a new process: different RNG state and model initialisation
    resumed = _trainer(_model(seed=5), toy_loader_fn(), max_iter=8, iter_size=iter_size)
    resumed.load_state_dict(checkpointer.load())
    resumed_losses = RecordLosses()
    resumed.register_hooks([resumed_losses])
    resumed.train()
    assert sorted(resumed_losses.losses) == [3, 4, 5, 6, 7]
    assert resumed_losses.losses == {i: recorded.losses[i] for i in range(3, 8)}  # bit-exact
    for got, want in zip(resumed.model.state_dict().values(), reference.model.state_dict().values()):
        assert torch.equal(got, want)


def test_non_finite_loss_names_the_iteration():
    trainer = _trainer(_model(), toy_loader_fn(nan_at=3), max_iter=6)
    with pytest.raises(FloatingPointError, match="non-finite at iteration 3"):
        trainer.train()


def test_gradient_accumulation_equals_one_big_batch():
    # GroupNorm: no batch statistics, so two half batches give exactly the big batch's gradient.
    torch.manual_seed(0)
    accumulated = _trainer(ToySegNet(norm="gn"), toy_loader_fn(batch_size=2), max_iter=3, iter_size=2)
    torch.manual_seed(0)
    big_batch_model = ToySegNet(norm="gn")

    def big_batches(start_batch):  # big batch i = half batches 2i and 2i+1 concatenated
        halves = toy_loader_fn(batch_size=2)(2 * start_batch)
        for first, second in zip(halves, halves):
            yield {k: torch.cat([first[k], second[k]]) for k in first}

    big = _trainer(big_batch_model, big_batches, max_iter=3)
    losses_accumulated, losses_big = RecordLosses(), RecordLosses()
    accumulated.register_hooks([losses_accumulated])
    big.register_hooks([losses_big])
    accumulated.train()
    big.train()
    for i in range(3):
        assert losses_accumulated.losses[i] == pytest.approx(losses_big.losses[i], rel=1e-5)
    for got, want in zip(accumulated.model.parameters(), big.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_checkpoints_the_grad_scaler(amp):
    trainer = _trainer(ToySegNet(norm="gn"), toy_loader_fn(), max_iter=3, amp=amp)
    recorded = RecordLosses()
    trainer.register_hooks([recorded])
    trainer.train()
    assert len(recorded.losses) == 3 and all(torch.isfinite(torch.tensor(list(recorded.losses.values()))))
    state = trainer.state_dict()
    assert state["iteration"] == 3
    assert bool(state["grad_scaler"]) == (amp == "fp16")  # fp16 keeps a loss scale, bf16 needs none
    if amp == "fp16":
        assert state["grad_scaler"]["scale"] > 0


def test_bad_arguments_and_models_are_reported():
    with pytest.raises(ValueError, match="unknown train.amp 'fp8'"):
        _trainer(ToySegNet(), toy_loader_fn(), 2, amp="fp8")
    with pytest.raises(ValueError, match="iter_size must be >= 1"):
        _trainer(ToySegNet(), toy_loader_fn(), 2, iter_size=0)

    class NoLoss(ToySegNet):
        def forward(self, batch):
            return {"pixel_acc": super().forward(batch)["pixel_acc"]}

    with pytest.raises(RuntimeError, match="no loss terms .* got keys \\['pixel_acc'\\]"):
        _trainer(NoLoss(), toy_loader_fn(), 2).train()
    with pytest.raises(ValueError, match="not a training checkpoint"):
        _trainer(ToySegNet(), toy_loader_fn(), 2).load_state_dict({"model": {}})


class BlowUpAt(HookBase):
    """Gives the optimizer step of `iteration` an absurd learning rate: the loss of that step is finite (it is
    computed before the step) but the weights it leaves are not."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            for group in self.trainer.optimizer.param_groups:
                group["lr"] = float("inf")


def test_a_step_that_makes_the_weights_non_finite_is_never_checkpointed(tmp_path):
    trainer = _trainer(_model(), toy_loader_fn(), max_iter=6)
    checkpointer = Checkpointer(tmp_path, max_keep=1)  # pruning must not delete the last good checkpoint either
    trainer.register_hooks([BlowUpAt(3), PeriodicCheckpointer(checkpointer, period=2)])
    with pytest.raises(FloatingPointError, match=r"not saving the checkpoint of iteration 4: non-finite values in "
                                                 r"model\.backbone\.0\.weight"):
        trainer.train()
    assert [p.name for p in checkpointer.iteration_files()] == ["iter_0000002.pth"]
    state = checkpointer.load()
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    resumed = _trainer(_model(seed=3), toy_loader_fn(), max_iter=6)
    resumed.load_state_dict(checkpointer.resume()[1])
    resumed.train()
    assert resumed.iter == 6


def test_resume_applies_the_configured_hyperparameters(tmp_path, caplog):
    first = _trainer(_model(), toy_loader_fn(), max_iter=4, lr=0.1)
    checkpointer = Checkpointer(tmp_path)
    first.register_hooks([PeriodicCheckpointer(checkpointer, period=2), StopAt(2)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    # the resumed run is configured with lr 0.01, momentum 0.5 and weight decay 0 instead of 0.1, 0.9 and 1e-4
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5, weight_decay=0.0)
    resumed = Trainer(model, optimizer, PolyLR(optimizer, 4, power=0.9), toy_loader_fn(), max_iter=4)
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(checkpointer.load())
    assert "base lr 0.1 (checkpoint) -> 0.01 (configured)" in caplog.text
    assert "weight_decay 0.0001 (checkpoint) -> 0.0 (configured)" in caplog.text
    group = resumed.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.01 * (1 - 2 / 4) ** 0.9)  # poly at iteration 2 of 4 from the new base
    assert group["weight_decay"] == 0.0
    assert "momentum 0.9 (checkpoint) -> 0.5 (configured)" in caplog.text and group["momentum"] == 0.5
    saved_momentum = checkpointer.load()["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(resumed.optimizer.state[group["params"][0]]["momentum_buffer"], saved_momentum)


def test_metrics_of_a_resumed_run_list_every_iteration_once(tmp_path):
    lines = [json.dumps({"iteration": i, "total_loss": 10.0 + i}) for i in (1, 2, 3)] + ['{"iteration": 4, "tot']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # a run killed at iteration 4, mid-line
    trainer = _trainer(_model(), toy_loader_fn(), max_iter=4)
    trainer.iter = 2  # resumed from its checkpoint of iteration 2
    trainer.register_hooks([MetricsWriter(tmp_path, period=1, tensorboard=False)])
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert [r["total_loss"] for r in records[:2]] == [11.0, 12.0]  # the records before the checkpoint are kept


def test_tensorboard_of_a_resumed_run_shows_every_iteration_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = _trainer(_model(), toy_loader_fn(), max_iter=3)  # logged iteration 3, killed before its checkpoint
    killed.register_hooks([MetricsWriter(tmp_path, period=1)])
    killed.train()
    resumed = _trainer(_model(), toy_loader_fn(), max_iter=4)
    resumed.iter = 2  # resumed from its checkpoint of iteration 2
    resumed.register_hooks([MetricsWriter(tmp_path, period=1)])
    resumed.train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/total_loss")] == [1, 2, 3, 4]


class RecordCheckpoints:
    """A stand-in Checkpointer: the iterations saved."""

    def __init__(self):
        self.saved = []

    def save(self, state, iteration):
        self.saved.append(iteration)


@pytest.mark.parametrize("period, due", [(2, [2, 4, 5]), (5, [5]), (0, [5]), (7, [5])])
def test_checkpoints_and_evaluations_come_every_period_and_after_the_last_iteration(period, due):
    trainer = _trainer(_model(), toy_loader_fn(), max_iter=5)
    checkpoints, evaluated = RecordCheckpoints(), []
    trainer.register_hooks([PeriodicCheckpointer(checkpoints, period),
                            EvalHook(lambda: evaluated.append(trainer.iter + 1) or {}, period)])
    trainer.train()
    assert checkpoints.saved == due and evaluated == due


def test_evaluation_scalars_and_the_train_mode_after_an_evaluation(tmp_path):
    trainer = _trainer(_model(), toy_loader_fn(), max_iter=3)
    modes = []

    class RecordMode(HookBase):
        def before_step(self):
            modes.append(self.trainer.model.training)

    def eval_fn():
        trainer.model.eval()  # an evaluation that leaves the model in eval mode
        return {"mean_iou": 0.25, "count": 3, "per_class_iou": [0.5, 0.0], "name": "x"}

    hook = EvalHook(eval_fn, 1)
    trainer.register_hooks([RecordMode(), hook, MetricsWriter(tmp_path, period=0, tensorboard=False)])
    trainer.train()
    assert modes == [True, True, True]
    assert {k: v for k, v in trainer.scalars.items() if k.startswith("val/")} == {"val/mean_iou": 0.25,
                                                                                    "val/count": 3.0}
    # evaluations are recorded at their iteration although the log period (0: the last iteration) is not due
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["val/mean_iou"]) for r in records] == [(1, 0.25), (2, 0.25), (3, 0.25)]


@pytest.mark.parametrize("start, evaluations", [(4, [4, 6]), (3, [4, 6])])
def test_a_missed_evaluation_is_repeated_only_at_an_evaluation_iteration(start, evaluations):
    trainer = _trainer(_model(), toy_loader_fn(), max_iter=6)
    trainer.iter = start  # resumed there; no evaluation of it was recorded
    evaluated = []

    def eval_fn():  # the completed iterations the evaluation sees: the resumed ones before training starts
        evaluated.append(trainer.iter + (trainer.scalars != {}))
        return {}

    trainer.register_hooks([EvalHook(eval_fn, 2, missed=lambda iteration: True)])
    trainer.train()
    assert evaluated == evaluations


def test_evaluation_records_are_found_by_iteration(tmp_path):
    assert not has_evaluation_record(tmp_path, 4)  # no metrics.jsonl
    lines = [{"iteration": 4, "total_loss": 1.0}, {"iteration": 2, "total_loss": 1.0, "val/mean_iou": 0.5},
             {"iteration": 6, "val/mean_iou": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"iteration": 8, "val/m\n')
    assert [has_evaluation_record(tmp_path, i) for i in (2, 4, 6, 8)] == [True, False, True, False]


def test_tensorboard_keeps_the_tags_of_evaluation_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(_model(), toy_loader_fn(), max_iter=2)
    trainer.register_hooks([EvalHook(lambda: {"mean_iou": 0.5}, 2), MetricsWriter(tmp_path, period=1)])
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "val/mean_iou" in tags and "train/total_loss" in tags and "train/val/mean_iou" not in tags
    assert [(e.step, e.value) for e in events.Scalars("val/mean_iou")] == [(2, 0.5)]


def test_logged_lr_is_the_base_rate_and_data_time_covers_every_micro_batch():
    import time

    from normkit.engine import build_param_groups
    model = _model()
    # the decode head's group (10x) comes last, after the backbone's groups at the base rate
    optimizer = torch.optim.SGD(build_param_groups(model, 0.1, 0.0, lr_mult={"decode_head": 10.0}), momentum=0.9)
    assert [g["lr_mult"] for g in optimizer.param_groups][-1] == 10.0

    def slow_loader(start_batch):
        for batch in toy_loader_fn()(start_batch):
            time.sleep(0.02)
            yield batch

    trainer = Trainer(model, optimizer, PolyLR(optimizer, 4, power=1.0), slow_loader, max_iter=2, iter_size=3)
    logged = []

    class Record(HookBase):
        def after_step(self):
            logged.append((self.trainer.scalars["lr"], self.trainer.scalars["data_time"]))

    trainer.register_hooks([Record()])
    trainer.train()
    assert [lr for lr, _ in logged] == [pytest.approx(0.1), pytest.approx(0.1 * 3 / 4)]  # the lr each step used
    assert all(data_time >= 3 * 0.02 for _, data_time in logged)
