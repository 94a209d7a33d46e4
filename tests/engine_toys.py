"""A tiny segmentation model and a deterministic batch stream for the engine and training tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 3


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "gn":
        return nn.GroupNorm(2, channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    from normkit.nn import build_norm
    return build_norm(kind, channels)


class ToySegNet(nn.Module):
    """conv-norm-relu backbone, optional dropout, 1x1 classifier head; the segmentation model API of the
    toolkit: `model(batch)` -> `{"ce_loss", "pixel_acc"}` in training, logits in eval mode."""

    def __init__(self, norm: str = "gn", dropout: float = 0.0, width: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), _norm(norm, width), nn.ReLU())
        self.decode_head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(width, NUM_CLASSES, 1))

    def forward(self, batch):
        images, labels = (batch, None) if torch.is_tensor(batch) else (batch["images"], batch.get("labels"))
        logits = self.decode_head(self.backbone(images))
        if labels is None or not self.training:
            return logits
        loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
        valid = labels != 255
        acc = ((logits.argmax(1) == labels) & valid).sum() / valid.sum().clamp(min=1)
        return {"ce_loss": loss, "pixel_acc": acc}


def toy_batch(seed: int, index: int, batch_size: int, size: int = 8) -> dict:
    """Batch number `index` of the stream: random images whose label is the argmax of a smoothed image channel
    (learnable by the toy model), with some ignore pixels."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    images = torch.randn(batch_size, 3, size, size, generator=gen)
    labels = F.avg_pool2d(images, 3, 1, 1).argmax(1)
    labels[:, 0, :2] = 255
    return {"images": images, "labels": labels}


def toy_loader_fn(seed: int = 0, batch_size: int = 4, *, rank: int = 0, world_size: int = 1, nan_at: int | None = None):
    """`data_loader_fn` for the Trainer: micro-batch i is rank `rank`'s slice of global batch i of
    `batch_size * world_size` images, so R ranks together see exactly the batches of one process."""
    def loader(start_batch: int):
        index = start_batch
        while True:
            batch = toy_batch(seed, index, batch_size * world_size)
            batch = {k: v[rank * batch_size:(rank + 1) * batch_size] for k, v in batch.items()}
            if index == nan_at:
                batch["images"] = torch.full_like(batch["images"], float("nan"))
            yield batch
            index += 1
    return loader
