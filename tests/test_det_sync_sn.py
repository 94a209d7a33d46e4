"""Mask R-CNN with SyncSwitchNorm on 2 gloo processes gives the losses of SwitchNorm on the concatenated batch.

Detection losses are means over sampled anchors and RoIs, so the mean of the ranks' losses equals the loss
of the whole batch only when every image contributes the same counts and nothing is drawn at random. The
tiny model here is set up for that: every anchor is kept as a proposal (NMS threshold 1, top-k above the
anchor count, zero box deltas so proposals are the anchors themselves), the samplers take every anchor and
RoI, and every image has the same ground-truth geometry (pixels differ, so batch statistics matter).
"""
import copy
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normkit.engine import convert_sync_norm
from normkit.models import build_model

SIZE = 64
NUM_IMAGES = 4
SN = {"norm": "sn", "norm_kwargs": {"using_bn": True, "using_moving_average": True, "momentum": 0.1}}
# 3 aspect ratios on 16x16, 8x8, 4x4 and 2x2 positions of a 64-pixel image: 1020 anchors per image.
ALL = 4096
CONFIG = {"model": {
    "name": "generalized_rcnn", "num_classes": 3, "legacy_plus_one": True,
    "backbone": {"name": "resnet18", "stem": "v1", "out_features": ["res2", "res3", "res4", "res5"],
                 "freeze_at": 0, **SN},
    "neck": {"name": "fpn", "in_features": ["res2", "res3", "res4", "res5"], "out_channels": 16,
             "top_block": False, **SN},
    "rpn": {"in_features": ["p2", "p3", "p4", "p5"], "anchor_sizes": [[16], [32], [64], [128]],
            "pre_nms_topk": [ALL, ALL], "post_nms_topk": [ALL, ALL], "collect": "per_image", "nms_thresh": 1.0,
            "batch_size_per_image": ALL, "bg_with_replacement": False, "straddle_thresh": -1},
    "roi_heads": {"in_features": ["p2", "p3", "p4", "p5"],
                  "box_head": {"name": "conv_fc", "num_conv": 1, "conv_dim": 16, "num_fc": 1, "fc_dim": 32, **SN},
                  "batch_size_per_image": ALL, "positive_fraction": 1.0},
    "mask_head": {"in_features": ["p2", "p3", "p4", "p5"], "num_conv": 1, "conv_dim": 16, **SN},
}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(config=CONFIG):
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        model.rpn.head.anchor_deltas.weight.zero_()  # proposals = anchors: the same RoIs in every image
        model.rpn.head.anchor_deltas.bias.zero_()
        # Predictors initialised with std 0.01 make every loss nearly constant; larger weights let the losses
        # depend on the normalised features, so that unsynchronised statistics show.
        for layer in (model.rpn.head.objectness_logits, model.roi_heads.box_predictor.cls_score,
                      model.roi_heads.box_predictor.bbox_pred, model.roi_heads.mask_head.predictor):
            layer.weight.mul_(100)
    return model.train()


def _batch(indices) -> dict:
    """Images `indices` of a fixed set of random images, each with the same two objects."""
    images = torch.randn(NUM_IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))[list(indices)]
    boxes = torch.tensor([[8.0, 10.0, 35.0, 29.0], [30.0, 34.0, 57.0, 61.0]])
    polygons = [[torch.tensor([x1, y1, x2, y1, x2, y2, x1, y2])] for x1, y1, x2, y2 in boxes.tolist()]
    n = len(indices)
    return {"images": images, "image_sizes": torch.full((n, 2), SIZE), "orig_sizes": torch.full((n, 2), SIZE),
            "scales": torch.ones(n), "image_ids": torch.tensor(list(indices)),
            "targets": [{"boxes": boxes.clone(), "labels": torch.tensor([0, 2]), "iscrowd": torch.zeros(2, dtype=bool),
                         "masks": polygons} for _ in range(n)]}


def _losses(model, batch) -> dict:
    return {k: float(v.detach()) for k, v in model(batch).items() if k.endswith("loss")}


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = convert_sync_norm(_model())
        per_rank = NUM_IMAGES // world
        losses = _losses(model, _batch(range(rank * per_rank, (rank + 1) * per_rank)))
        torch.save(losses, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_sn_detection_losses_equal_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = _losses(_model(), _batch(range(NUM_IMAGES)))
    assert set(whole) == {"rpn_cls_loss", "rpn_bbox_loss", "cls_loss", "box_reg_loss", "mask_loss"}
    synced = {k: (ranks[0][k] + ranks[1][k]) / 2 for k in whole}
    for key in whole:
        assert abs(synced[key] - whole[key]) <= 1e-5 * max(1.0, abs(whole[key])), (key, synced[key], whole[key])
    # Without synchronisation each half is normalised by its own statistics: the losses differ.
    model = _model()
    halves = [_losses(model, _batch(range(i, i + 2))) for i in (0, 2)]
    unsynced = {k: (halves[0][k] + halves[1][k]) / 2 for k in whole}
    assert any(abs(unsynced[k] - whole[k]) > 1e-3 * abs(whole[k]) for k in whole), (unsynced, whole)


def _worker_without_foreground(rank, world, port, out_dir):
    # A collective that one rank skips would block the others: the gloo timeout turns such a hang into an error.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        config = copy.deepcopy(CONFIG)
        config["model"]["roi_heads"]["proposal_append_gt"] = False
        model = convert_sync_norm(_model(config))
        batch = _batch(range(2 * rank, 2 * rank + 2))
        if rank == 1:  # 2x2-pixel objects: no RoI (the anchors) reaches the foreground IoU of 0.5
            for target in batch["targets"]:
                target["boxes"] = torch.tensor([[8.0, 10.0, 10.0, 12.0], [30.0, 34.0, 32.0, 36.0]])
                target["masks"] = [[torch.tensor([x1, y1, x2, y1, x2, y2, x1, y2])]
                                   for x1, y1, x2, y2 in target["boxes"].tolist()]
        losses = model(batch)
        sum(losses.values()).backward()
        torch.save({k: float(v) for k, v in losses.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_sn_mask_head_runs_on_a_rank_without_foreground(tmp_path):
    mp.spawn(_worker_without_foreground, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[1]["mask_loss"] == 0.0 and ranks[0]["mask_loss"] > 0.0
