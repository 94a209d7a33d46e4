"""The evaluator interface and the one inference loop every task uses.

An evaluator sees every batch of a (possibly sharded) loader together with the model's outputs for it and
turns them into a results dict:

    evaluator.reset()
    for batch in loader:
        evaluator.process(batch, model(batch))
    results = evaluator.evaluate()

`evaluate()` is collective under torch.distributed: each rank processes its shard, the evaluator combines the
shards (summed counts for segmentation, gathered predictions for COCO) and every rank returns the same
dataset-wide results.
"""
from __future__ import annotations

import torch
from torch import nn

from normkit.engine.distributed import move_to_device

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset"]


class DatasetEvaluator:
    """Base class: accumulate in `process`, combine ranks and compute in `evaluate`."""

    def reset(self) -> None:
        """Forgets everything processed so far (called before a pass over the dataset)."""

    def process(self, inputs, outputs) -> None:
        """`inputs`: one batch as the loader yields it (on the model's device); `outputs`: `model(inputs)` in
        eval mode."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Results over everything processed, on every rank."""
        raise NotImplementedError


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators fed from one pass; their result dicts are merged (keys must not clash)."""

    def __init__(self, evaluators):
        self.evaluators = list(evaluators)

    def reset(self) -> None:
        for evaluator in self.evaluators:
            evaluator.reset()

    def process(self, inputs, outputs) -> None:
        for evaluator in self.evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> dict:
        results: dict = {}
        for evaluator in self.evaluators:
            for key, value in evaluator.evaluate().items():
                if key in results:
                    raise KeyError(f"two evaluators report {key!r}")
                results[key] = value
        return results


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def inference_on_dataset(model: nn.Module, loader, evaluator: DatasetEvaluator) -> dict:
    """Runs `model` in eval mode over `loader` (batches moved to the model's device), feeds `evaluator` and
    returns `evaluator.evaluate()`. The model's train/eval mode is restored afterwards."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    evaluator.reset()
    try:
        for batch in loader:
            batch = move_to_device(batch, device)
            evaluator.process(batch, model(batch))
    finally:
        model.train(was_training)
    return evaluator.evaluate()
