"""normkit.evaluation.evaluator: the inference loop and combined evaluators."""
import pytest
import torch
from torch import nn

from normkit.evaluation import inference_on_dataset
from normkit.evaluation.evaluator import DatasetEvaluator, DatasetEvaluators


class Fixed(DatasetEvaluator):
    def __init__(self, results):
        self.results, self.seen = results, []

    def reset(self):
        self.seen = []

    def process(self, inputs, outputs):
        self.seen.append((inputs.tolist(), outputs.tolist()))

    def evaluate(self):
        return dict(self.results)


@pytest.mark.parametrize("training", [True, False])
def test_inference_runs_in_eval_mode_and_restores_the_mode_it_found(training):
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(1, 1, bias=False))
    nn.init.ones_(model[1].weight)
    model.train(training)
    evaluator = Fixed({"a": 1.0})
    assert inference_on_dataset(model, [torch.ones(2, 1), torch.full((1, 1), 3.0)], evaluator) == {"a": 1.0}
    assert evaluator.seen == [([[1.0], [1.0]], [[1.0], [1.0]]), ([[3.0]], [[3.0]])]  # no dropout
    assert model.training is training and all(m.training is training for m in model)


def test_combined_evaluators_merge_results_and_refuse_clashing_keys():
    both = DatasetEvaluators([Fixed({"bbox/AP": 0.5}), Fixed({"segm/AP": 0.25})])
    assert inference_on_dataset(nn.Identity(), [torch.zeros(1)], both) == {"bbox/AP": 0.5, "segm/AP": 0.25}
    with pytest.raises(KeyError, match="two evaluators report 'AP'"):
        DatasetEvaluators([Fixed({"AP": 0.5}), Fixed({"AP": 0.25})]).evaluate()
