"""Two gloo processes on CPU train exactly like one process on the concatenated batch."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine_toys import ToySegNet, toy_loader_fn
from normkit.engine import (HookBase, PolyLR, Trainer, build_param_groups, convert_sync_norm, destroy_distributed,
                            init_distributed, wrap_ddp)

ITERATIONS = 4
PER_RANK_BATCH = 2


class RecordLosses(HookBase):
    def __init__(self):
        self.losses = []

    def after_step(self):
        self.losses.append(self.trainer.scalars["total_loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(norm: str, rank: int, world_size: int) -> tuple[list[float], dict]:
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = ToySegNet(norm=norm)
    if info.distributed:
        model = convert_sync_norm(model)
    optimizer = torch.optim.SGD(build_param_groups(model, 0.2, 1e-4, lr_mult={"decode_head": 2.0}), momentum=0.9)
    model = wrap_ddp(model, info)
    trainer = Trainer(model, optimizer, PolyLR(optimizer, ITERATIONS),
                      toy_loader_fn(batch_size=PER_RANK_BATCH * 2 // world_size, rank=rank, world_size=world_size),
                      max_iter=ITERATIONS)
    recorded = RecordLosses()
    trainer.register_hooks([recorded])
    trainer.train()
    state = {k: v.tolist() for k, v in trainer.state_dict()["model"].items()}
    return recorded.losses, state


def _worker(rank: int, world_size: int, port: int, norm: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    losses, state = _train(norm, rank, world_size)
    destroy_distributed()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "state": state}, f)


# gn: plain DDP gradient averaging; sn: SwitchNorm converted to SyncSwitchNorm, whose BN statistics span both ranks.
@pytest.mark.parametrize("norm", ["gn", "sn"])
def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(tmp_path, norm, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(_worker, args=(2, _free_port(), norm, str(tmp_path)), nprocs=2, join=True)
    single_losses, single_state = _train(norm, rank=0, world_size=1)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            result = json.load(f)
        assert result["losses"] == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
        for key, value in single_state.items():
            torch.testing.assert_close(torch.tensor(result["state"][key]), torch.tensor(value), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("local_rank,visible,device", [(3, 2, None), (2, 2, None), (3, 1, 0), (1, 2, 1)])
def test_each_local_rank_gets_a_gpu_of_its_own(monkeypatch, local_rank, visible, device):
    # Two GPUs and a fourth process per node would share a GPU (NCCL: "Duplicate GPU detected"): refused. One
    # visible GPU per process (CUDA_VISIBLE_DEVICES set per rank) is that process's device 0.
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if device is None:
        with pytest.raises(RuntimeError, match="only 2 GPUs are visible"):
            init_distributed("cuda")
    else:
        assert init_distributed("cuda").device == torch.device("cuda", device)


def test_gradient_accumulation_all_reduces_once_per_step_after_the_last_micro_batch(tmp_path):
    # One gloo process: DDP's communication hook sees each all-reduced bucket. With iter_size 3 the gradients of
    # micro-batches 0 and 1 accumulate locally (no_sync) and the backward of micro-batch 2 all-reduces their sum
    # with its own, i.e. the whole step's gradient; syncing an earlier micro-batch would leave later ones unsynced.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    reduced = []

    def record(state, bucket):
        reduced.append(bucket.buffer().detach().clone().sum())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    class CompareWithStepGradient(HookBase):
        def after_step(self):
            grads = [p.grad.sum() for p in self.trainer.model.parameters()]
            steps.append((list(reduced), torch.stack(grads).sum()))
            reduced.clear()

    steps = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(ToySegNet(norm="gn"), bucket_cap_mb=1000)  # one bucket
        model.register_comm_hook(None, record)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = Trainer(model, optimizer, PolyLR(optimizer, 2), toy_loader_fn(batch_size=1), max_iter=2,
                          iter_size=3)
        trainer.register_hooks([CompareWithStepGradient()])
        trainer.train()
    finally:
        dist.destroy_process_group()
    assert len(steps) == 2
    for buckets, step_gradient in steps:
        assert len(buckets) == 1
        torch.testing.assert_close(buckets[0], step_gradient)


def test_without_local_rank_a_process_uses_the_gpu_of_its_rank(monkeypatch):
    # torchrun always sets LOCAL_RANK; other launchers may set only RANK and WORLD_SIZE (one node)
    import torch.distributed as dist
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the process group is someone else's business here
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    info = init_distributed("cuda")
    assert (info.rank, info.local_rank, info.device) == (1, 1, torch.device("cuda", 1))


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_the_world_is_refused(monkeypatch, rank, world_size):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ValueError, match="must lie in"):
        init_distributed("cpu")


def test_only_rank_0_logs_below_warnings():
    import logging

    from normkit.engine import setup_logging
    logger = logging.getLogger("normkit")
    saved = list(logger.handlers), logger.level, logger.propagate
    try:
        setup_logging(1)
        assert logger.level == logging.WARNING
        setup_logging(0)
        assert logger.level == logging.INFO
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
