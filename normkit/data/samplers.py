"""Deterministic, resumable batch streams for infinite training and rank-sharded validation.

The training stream is a sequence of *global* batches (batch_size x world_size sample indices), one per
iteration; rank r takes the r-th slice. Epoch e shuffles all indices with a Generator seeded by (seed, e).
Without grouping, N processes together see exactly the batch a single process with N x batch_size would see.
With orientation grouping (CSAIL) each rank's batch is a group of its own, as each GPU's batch in CSAIL's
loader: the shuffled indices are dealt into a landscape and a portrait bucket, a full bucket (batch_size
images) becomes the next rank's batch, and the CSAIL short side is drawn per rank; a bucket's leftovers at the
end of an epoch wait for the next epoch's indices (as in CSAIL), so an orientation with fewer images than a
batch is still trained; as there, a batch can then hold an image twice (once left over, once drawn again).
The stream depends only on indices, so skipping to `start_iter` costs no image decoding.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np


class SampleKey(NamedTuple):
    """What a training-set worker needs to produce one augmented sample deterministically."""
    iteration: int
    index: int
    short_side: int | None  # the batch-wide CSAIL short side, None for per-sample pipelines


def global_batches(num_samples: int, batch_size: int, world_size: int, seed: int,
                   landscape=None) -> Iterator[list[int]]:
    """Infinite stream of global batches of batch_size x world_size dataset indices, rank r's batch the r-th
    slice. `landscape`: optional bool per sample; when given, every rank's batch holds images of a single
    orientation (the ranks' orientations may differ)."""
    global_batch = batch_size * world_size
    if landscape is None:
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                             f"({global_batch} = batch size x world size)")
    else:
        landscape = np.asarray(landscape, bool)
        largest = max(int(landscape.sum()), int((~landscape).sum()))
        if largest < batch_size:
            raise ValueError(f"orientation-grouped batches need {batch_size} images of one orientation "
                             f"(the batch size), but the dataset has at most {largest}")
    buckets: dict[bool, list[int]] = {True: [], False: []}
    pending: list[int] = []
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
        if landscape is None:
            for start in range(0, num_samples - global_batch + 1, global_batch):
                yield order[start:start + global_batch].tolist()
        else:
            for index in order.tolist():
                bucket = buckets[bool(landscape[index])]
                bucket.append(index)
                if len(bucket) == batch_size:
                    pending.extend(bucket)
                    bucket.clear()
                    if len(pending) == global_batch:
                        yield pending
                        pending = []
        epoch += 1


class TrainBatchSampler:
    """Yields this rank's batch of `SampleKey`s for iterations start_iter, start_iter + 1, ... forever."""

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_iter: int = 0, landscape=None, short_sides=None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_iter < 0:
            raise ValueError(f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size and start_iter >= 0; "
                             f"got batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"start_iter={start_iter}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_iter = start_iter
        self.landscape = landscape
        self.short_sides = tuple(short_sides) if short_sides else None

    def __iter__(self) -> Iterator[list[SampleKey]]:
        stream = global_batches(self.num_samples, self.batch_size, self.world_size, self.seed, self.landscape)
        lo = self.rank * self.batch_size
        for iteration, batch in enumerate(stream):
            if iteration < self.start_iter:
                continue
            short_side = None
            if self.short_sides:  # one size for the rank's batch, as CSAIL draws one per GPU
                short_side = self.short_sides[np.random.default_rng([self.seed, iteration, 1, self.rank]).integers(
                    len(self.short_sides))]
            yield [SampleKey(iteration, index, short_side) for index in batch[lo:lo + self.batch_size]]


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Validation shard of a rank: indices rank, rank + world_size, ... (disjoint, covering every sample once;
    metrics are sums, so uneven shards need no padding)."""
    return list(range(rank, num_samples, world_size))


def sample_rng(seed: int, key: SampleKey) -> np.random.Generator:
    """The augmentation Generator of one sample in one iteration."""
    return np.random.default_rng([seed, key.iteration, key.index, 2])
