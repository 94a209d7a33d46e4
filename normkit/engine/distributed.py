"""One code path from a single process to many: torchrun environment, DDP wrapping, sync-norm conversion."""
from __future__ import annotations

import gc
import logging
import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "move_to_device", "init_distributed", "get_rank", "get_world_size", "is_main_process", "barrier",
           "convert_sync_norm", "wrap_ddp", "unwrap_model", "all_gather_objects", "broadcast_object",
           "mean_over_ranks", "seed_all",
           "setup_logging", "destroy_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun), picks the device and, when WORLD_SIZE > 1,
    initialises the default process group (NCCL on GPU, gloo on CPU) from MASTER_ADDR / MASTER_PORT.

    device: "auto" (this rank's GPU when CUDA is available, else CPU), "cpu" or "cuda".
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown train.device {device!r}; choose auto, cpu or cuda")
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
        visible = torch.cuda.device_count()
        # One visible GPU per process (CUDA_VISIBLE_DEVICES set per rank) is device 0; otherwise each local rank
        # needs a GPU of its own, or NCCL fails later with "Duplicate GPU detected".
        if visible > 1 and local_rank >= visible:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {visible} GPUs are visible: start at most "
                               f"{visible} processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank % visible)
        torch_device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
        # 30 minutes (detectron2's default) rather than NCCL's 10: rank 0 runs COCOeval alone while the others wait.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                device_id=torch_device if use_cuda else None, timeout=timedelta(minutes=30))
    return DistInfo(rank, world_size, local_rank, torch_device)


def destroy_distributed(wait_for_others: bool = True) -> None:
    """Tears the process group down; on the normal path every rank first waits for the others (a rank that
    leaves early can abort its peers' transport). Pass False when leaving on an error: the others may never come."""
    if dist.is_initialized():
        gc.collect()  # a DistributedDataParallel left in a reference cycle must go before its process group
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (e.g. a decision only rank 0 can make); `obj` in a single process."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Averages scalar tensors over ranks with one packed all-reduce; returns Python floats."""
    if not values:
        return {}
    keys = sorted(values)
    packed = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if get_world_size() > 1:
        dist.all_reduce(packed)
        packed /= get_world_size()
    return dict(zip(keys, packed.tolist()))


def convert_sync_norm(model: nn.Module, process_group=None) -> nn.Module:
    """BatchNorm -> SyncBatchNorm and SwitchNorm -> SyncSwitchNorm, keeping the same parameter tensors' values."""
    from normkit.nn import convert_sync_switchnorm  # compiled ops needed only when SN layers are converted
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return convert_sync_switchnorm(model, process_group)


def wrap_ddp(model: nn.Module, info: DistInfo, *, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel over `model` when running on several processes; the model itself otherwise."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def move_to_device(batch, device: torch.device | str):
    """`batch` with every tensor moved to `device` (non-blocking), through nested dicts, lists and tuples;
    anything else is returned as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(value, device) for value in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_all(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Log records from rank 0 at `level`; other ranks report warnings and errors only, tagged with their rank."""
    root = logging.getLogger("normkit")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    tag = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False
