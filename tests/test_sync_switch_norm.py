"""SyncSwitchNorm on 2 gloo processes equals SwitchNorm2d on the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normkit.nn import SwitchNorm2d, SyncSwitchNorm, convert_sync_switchnorm

C = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_batch(total: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(total, C, 5, 4, generator=g, dtype=torch.float64) * 3 + 1
    grad = torch.randn(total, C, 5, 4, generator=g, dtype=torch.float64)
    return x, grad


def _init_module(m):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _worker(rank, world, port, sizes, out_dir, channels_last):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x_all, g_all = _full_batch(sum(sizes))
        start = sum(sizes[:rank])
        x = x_all[start:start + sizes[rank]].clone()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        norm = _init_module(SyncSwitchNorm(C, momentum=0.1).double())
        for _ in range(2):  # two steps: running stats accumulate over synchronized statistics
            y = norm(x)
        y.backward(g_all[start:start + sizes[rank]])
        grads = {name: p.grad.clone() for name, p in norm.named_parameters()}
        for t in grads.values():
            dist.all_reduce(t)  # parameter gradients summed over ranks = gradient of the summed loss
        torch.save({"y": y.detach(), "dx": x.grad, "grads": grads, "running_mean": norm.running_mean,
                    "running_var": norm.running_var}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes,channels_last", [((3, 5), False), ((3, 5), True), ((0, 8), False), ((0, 0), False)])
def test_sync_switchnorm_equals_full_batch(tmp_path, sizes, channels_last):
    mp.spawn(_worker, args=(2, _free_port(), sizes, str(tmp_path), channels_last), nprocs=2, join=True)
    x_all, g_all = _full_batch(sum(sizes))
    x = x_all.clone().requires_grad_()
    ref = _init_module(SwitchNorm2d(C, momentum=0.1).double())
    for _ in range(2):
        y = ref(x)
    y.backward(g_all)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), x.grad)
    for name, p in ref.named_parameters():
        for r in results:
            torch.testing.assert_close(r["grads"][name], p.grad, msg=lambda m: f"{name}: {m}")
    for r in results:
        torch.testing.assert_close(r["running_mean"], ref.running_mean)
        torch.testing.assert_close(r["running_var"], ref.running_var)


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = convert_sync_switchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), SwitchNorm2d(4), nn.ReLU(),
                                                      nn.Conv2d(4, 2, 1)))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            loss = ddp(torch.randn(2 + rank, 3, 8, 8, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(out_dir, f"ddp{rank}.pt"))
        del ddp, opt  # release DDP's reducer (it holds the process group) before tearing the group down
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sync_switchnorm_under_ddp_keeps_replicas_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"ddp{r}.pt", weights_only=True) for r in range(2))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("using_moving_average", [True, False])
def test_synchronized_path_updates_the_running_statistics_in_either_mode(tmp_path, monkeypatch, using_moving_average):
    # The synchronized forward (all_gather of the BN statistics, then the running-statistics update) on a
    # one-process group, forced on: it must give SwitchNorm2d's outputs and buffers, also in the official
    # batch-average mode (sums of E[x] and E[x^2] terms), and leave them as they are for an empty batch.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(SyncSwitchNorm, "_synchronized", lambda self: True)
        sync = _init_module(SyncSwitchNorm(C, momentum=0.25, using_moving_average=using_moving_average).double())
        local = _init_module(SwitchNorm2d(C, momentum=0.25, using_moving_average=using_moving_average).double())
        for m in (sync, local):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(2.0)
        x, _ = _full_batch(4)
        for step in range(2):
            torch.testing.assert_close(sync(x * (step + 1)), local(x * (step + 1)))
        planes = (x * 2).reshape(4, C, -1)
        mean_bn = planes.mean(-1).mean(0)
        var_bn = (planes.var(-1) + planes.mean(-1) ** 2).mean(0) - mean_bn ** 2
        if not using_moving_average:  # hand check of the last step's sums
            planes1 = x.reshape(4, C, -1)
            mean1 = planes1.mean(-1).mean(0)
            second1 = (planes1.var(-1) + planes1.mean(-1) ** 2).mean(0)
            torch.testing.assert_close(sync.running_mean, 0.5 + mean1 + mean_bn)
            torch.testing.assert_close(sync.running_var, 2.0 + second1 + var_bn + mean_bn ** 2)
        torch.testing.assert_close(sync.running_mean, local.running_mean)
        torch.testing.assert_close(sync.running_var, local.running_var)
        before = sync.running_mean.clone(), sync.running_var.clone()
        sync(torch.zeros(0, C, 5, 4, dtype=torch.float64))
        assert torch.equal(sync.running_mean, before[0]) and torch.equal(sync.running_var, before[1])
    finally:
        dist.destroy_process_group()
