"""Evaluation: the evaluator interface and inference loop; segmentation metrics, multi-scale/flip/slide
inference and visualisation."""
from normkit.evaluation.evaluator import DatasetEvaluator, DatasetEvaluators, inference_on_dataset
from normkit.evaluation.inference import inference
from normkit.evaluation.metrics import SegmentationMetric, format_table, results_to_json
from normkit.evaluation.sem_seg import SegmentationEvaluator, SegmentationInference, evaluate
from normkit.evaluation.visualize import PALETTE, colorize, overlay, side_by_side

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset", "PALETTE", "SegmentationEvaluator",
           "SegmentationInference", "SegmentationMetric", "colorize", "evaluate", "format_table", "inference",
           "overlay", "results_to_json", "side_by_side"]
