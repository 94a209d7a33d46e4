"""The detection model on the real data pipeline: mini COCO -> train loader -> a training step, and the val
loader -> inference_on_dataset -> COCOEvaluator (the data/model/evaluator contract end to end)."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

from normkit.data.detection import build_coco_train_loader, build_coco_val_loader  # noqa: E402
from normkit.data.synthetic_coco import generate_mini_coco  # noqa: E402
from normkit.evaluation import inference_on_dataset  # noqa: E402
from normkit.evaluation.coco import COCOEvaluator  # noqa: E402
from normkit.models import build_model, read_config  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detection" / "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1.yaml"


@pytest.fixture(scope="module")
def mini_coco(tmp_path_factory):
    return generate_mini_coco(tmp_path_factory.mktemp("mini_coco"), num_train=4, num_val=2, size=64, seed=0)


def test_mask_rcnn_trains_and_evaluates_on_the_coco_pipeline(mini_coco, tmp_path):
    cfg = read_config(CONFIG)
    data = cfg["data"]
    data.update(root=str(mini_coco), num_classes=4)
    data["train"].update(short_sides=[64], max_size=96)
    data["val"].update(short_side=64, max_size=96)
    cfg["model"]["num_classes"] = 4
    cfg["model"]["rpn"].update(pre_nms_topk=[200, 100], post_nms_topk=[64, 32], batch_size_per_image=32)
    cfg["model"]["roi_heads"]["batch_size_per_image"] = 16
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = next(iter(build_coco_train_loader(data, 2)))
    model.train()
    losses = model(batch)
    total = sum(v for k, v in losses.items() if k.endswith("loss"))
    assert torch.isfinite(total) and "mask_loss" in losses
    total.backward()

    loader = build_coco_val_loader(data)
    evaluator = COCOEvaluator(loader.dataset.dataset, output_dir=str(tmp_path))
    with torch.no_grad():  # one confident class so there is something to score
        model.roi_heads.box_predictor.cls_score.bias[1] = 20.0
    results = inference_on_dataset(model, loader, evaluator)
    assert results  # bbox and segm metrics computed from the model's predictions
