"""Detection transforms, batching and sampling: geometry moves with the image, determinism, resume."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from normkit.data.detection import (CAFFE_BGR_MEAN, DetectionBatchSampler, DetectionCollate, DetectionMapper,
                                    PixelNormalizer, build_coco_train_loader, build_coco_val_loader,
                                    compute_scale, flip_boxes, pad_images, resize_scale_info)

from coco_helpers import PYCOCOTOOLS_NUMPY2_WARNING, mini_coco

pytestmark = pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2_WARNING)


# --------------------------------------------------------------------------- geometry against the pixels
def scene(legacy):
    """A 60x90 grey image with a red rectangle (box), a green triangle (polygon) and a blue disc (RLE)."""
    h, w = 60, 90
    image = np.full((h, w, 3), 100, np.uint8)
    image[10:30, 20:50] = (255, 0, 0)  # columns 20..49, rows 10..29
    tri = [60.0, 40.0, 86.0, 40.0, 86.0, 58.0]
    tri_mask = mask_util.decode(mask_util.frPyObjects([tri], h, w))[..., 0]
    image[tri_mask > 0] = (0, 255, 0)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - 45) ** 2 + (xx - 20) ** 2 <= 10 ** 2).astype(np.uint8)
    image[disc > 0] = (0, 0, 255)
    rle = mask_util.encode(np.asfortranarray(disc))
    rle["counts"] = rle["counts"].decode()
    off = 1 if legacy else 0
    tri_box = mask_util.toBbox(mask_util.frPyObjects([tri], h, w))[0]
    disc_box = mask_util.toBbox(rle)
    boxes = [[20, 10, 50 - off, 30 - off],
             [tri_box[0], tri_box[1], tri_box[0] + tri_box[2] - off, tri_box[1] + tri_box[3] - off],
             [disc_box[0], disc_box[1], disc_box[0] + disc_box[2] - off, disc_box[1] + disc_box[3] - off]]
    return {"image": image, "image_id": 3, "boxes": np.asarray(boxes, np.float32),
            "labels": np.array([0, 1, 2]), "iscrowd": np.zeros(3, bool),
            "segmentations": [[[20.0, 10.0, 50.0, 10.0, 50.0, 30.0, 20.0, 30.0]], [tri], rle]}


def colour_mask(pixels, channel):
    """Where the normalised (rgb, 0..1, mean 0, std 1) image is mostly `channel`."""
    others = [c for c in range(3) if c != channel]
    return (pixels[channel] > 0.6) & (pixels[others[0]] < 0.4) & (pixels[others[1]] < 0.4)


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


@pytest.mark.parametrize("legacy, flip, short", [(True, True, 120), (True, False, 90), (False, True, 90),
                                                 (False, False, 75), (True, True, 60), (False, True, 60)])
def test_boxes_polygons_and_bitmaps_move_with_the_image(legacy, flip, short):
    sample = scene(legacy)
    mapper = DetectionMapper(PixelNormalizer("rgb", 1, (0, 0, 0), (1, 1, 1)), [short], 1000,
                             legacy_plus_one=legacy, mask_on=True)
    out = mapper(sample, None, flip)
    scale = short / 60
    h, w = out["image_size"]
    assert (h, w) == (round(60 * scale), round(90 * scale)) and out["scale"] == pytest.approx(scale)
    assert tuple(out["image"].shape) == (3, h, w) and out["orig_size"] == (60, 90)
    pixels = out["image"].numpy()
    target = out["target"]
    off = 1 if legacy else 0
    for k, channel in enumerate((0, 1, 2)):
        region = colour_mask(pixels, channel)
        ys, xs = np.nonzero(region)
        # Pixel-inclusive extents of the object in the transformed image vs. the transformed box.
        x1, y1, x2, y2 = target["boxes"][k].tolist()
        tol = 0 if scale == 1 and k == 0 else scale + 1  # unscaled rectangle: pixel-exact, convention included
        assert abs(x1 - xs.min()) <= tol and abs(y1 - ys.min()) <= tol
        assert abs(x2 - (xs.max() + 1 - off * scale)) <= tol and abs(y2 - (ys.max() + 1 - off * scale)) <= tol
        entry = target["masks"][k]
        if isinstance(entry, list):  # polygons: rasterise them at the output size
            drawn = mask_util.decode(mask_util.merge(mask_util.frPyObjects([p.tolist() for p in entry], h, w)))
        else:
            assert entry.dtype == torch.uint8 and tuple(entry.shape) == (h, w)
            drawn = entry.numpy()
        assert iou(drawn > 0, region) > (0.8 if legacy and flip else 0.9), (k, iou(drawn > 0, region))
    assert out["flipped"] == flip


@pytest.mark.parametrize("short", [45, 75, 100, 133])
def test_bitmaps_resize_like_the_polygons(short):
    # the same shapes as polygons and as RLE: at the output size the bitmaps must cover what the scaled polygons
    # rasterise to, on average without a shift (nearest sampling by floor moved them by about half a pixel)
    h, w = 60, 90
    rng = np.random.default_rng(short)
    polygons, rles = [], []
    for _ in range(12):
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radius = rng.uniform(6, 15)
        centre = rng.uniform((15, 15), (w - 15, h - 15))
        polygon = (centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1)).ravel().tolist()
        polygons.append([polygon])
        rle = mask_util.frPyObjects([polygon], h, w)[0]
        rle["counts"] = rle["counts"].decode()
        rles.append(rle)
    n = 2 * len(polygons)
    sample = {"image": np.zeros((h, w, 3), np.uint8), "image_id": 1, "boxes": np.tile([[0, 0, 10, 10]], (n, 1)),
              "labels": np.zeros(n, np.int64), "iscrowd": np.zeros(n, bool), "segmentations": polygons + rles}
    mapper = DetectionMapper(PixelNormalizer("rgb", 1, (0, 0, 0), (1, 1, 1)), [short], 1000, legacy_plus_one=False,
                             mask_on=True)
    out = mapper(sample, None, False)
    oh, ow = out["image_size"]
    shifts, ious = [], []
    for k in range(len(polygons)):
        drawn = mask_util.decode(mask_util.frPyObjects(out["target"]["masks"][k][0][None].tolist(), oh, ow))[..., 0]
        bitmap = out["target"]["masks"][k + len(polygons)].numpy()
        shifts.append([c.mean() - d.mean() for c, d in zip(np.nonzero(bitmap), np.nonzero(drawn))])
        ious.append(iou(bitmap > 0, drawn > 0))
    assert np.abs(np.mean(shifts, 0)).max() < 0.15, np.mean(shifts, 0)
    assert np.mean(ious) > 0.9


def test_image_is_resampled_by_the_box_scale():
    # 600 x 1001 to short side 300: scale 0.5 but width round(500.5) = 500. Resampling by that size (scale
    # 500/1001) would move a step at column 900 by 0.45 px against boxes * scale; Detectron-1 resizes by factor.
    image = np.zeros((600, 1001, 3), np.uint8)
    image[:, 900:] = 255
    out = DetectionMapper(PixelNormalizer("rgb", 1, (0, 0, 0), (1, 1, 1)), [300], 2000)(
        {"image": image, "image_id": 1, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
         "iscrowd": np.zeros(0, bool)}, None, False)
    assert out["image_size"] == (300, 500) and out["scale"] == 0.5
    profile = out["image"][0, 150].double().numpy()
    j = int(np.nonzero(profile >= 0.5)[0][0])
    crossing = j - 1 + (0.5 - profile[j - 1]) / (profile[j] - profile[j - 1])
    # pixel centres map back to (j + 0.5) / scale - 0.5; the step's midpoint 899.5 lands at 900 * scale - 0.5
    assert crossing == pytest.approx(900 * 0.5 - 0.5, abs=0.05)


def test_extreme_aspect_ratio_keeps_one_pixel():
    # 1 x 3000 to long side 1333: the short side scales to 0.44 px, which cv2's factor resize would round to 0
    out = DetectionMapper(PixelNormalizer("rgb", 1, (0, 0, 0), (1, 1, 1)), [800], 1333)(
        {"image": np.zeros((1, 3000, 3), np.uint8), "image_id": 1, "boxes": np.zeros((0, 4), np.float32),
         "labels": np.zeros(0, np.int64), "iscrowd": np.zeros(0, bool)}, None, False)
    assert out["image_size"] == (1, 1333) and tuple(out["image"].shape) == (3, 1, 1333)


def test_flip_box_conventions():
    boxes = np.array([[10, 20, 29, 39]], np.float32)  # pixel columns 10..29 of a 100-wide image
    assert flip_boxes(boxes, 100, True).tolist() == [[70, 20, 89, 39]]  # columns 70..89
    assert flip_boxes(boxes + [0, 0, 1, 1], 100, False).tolist() == [[70, 20, 90, 40]]


def test_flip_polygon_conventions():
    # Detectron-1 flip_segms: x' = W - 1 - x; detectron2: x' = W - x. Scale 1 (short side = image height).
    sample = {"image": np.zeros((40, 90, 3), np.uint8), "image_id": 1, "boxes": np.array([[10, 5, 20, 15]], np.float32),
              "labels": np.zeros(1, np.int64), "iscrowd": np.zeros(1, bool),
              "segmentations": [[[10.0, 5.0, 20.0, 5.0, 20.0, 15.0]]]}
    for legacy, off in ((True, 1), (False, 0)):
        mapper = DetectionMapper(PixelNormalizer("rgb", 1, (0, 0, 0), (1, 1, 1)), [40], 1000, legacy_plus_one=legacy,
                                 mask_on=True)
        poly = mapper(sample, None, True)["target"]["masks"][0][0]
        assert poly.tolist() == [90 - off - 10, 5, 90 - off - 20, 5, 90 - off - 20, 15]


def test_random_flip_is_a_fair_coin():
    mapper = DetectionMapper(PixelNormalizer("rgb", 1, (0, 0, 0), (1, 1, 1)), [2], 1000, random_flip=True)
    sample = {"image": np.zeros((2, 2, 3), np.uint8), "image_id": 1, "boxes": np.zeros((0, 4), np.float32),
              "labels": np.zeros(0, np.int64), "iscrowd": np.zeros(0, bool)}
    rng = np.random.default_rng(0)
    flips = sum(mapper(sample, rng)["flipped"] for _ in range(1000))
    assert 440 < flips < 560  # p = 0.5: 6 standard deviations around 500


def test_scale_rule():
    assert compute_scale(480, 640, 800, 1333) == pytest.approx(800 / 480)
    assert compute_scale(500, 1500, 800, 1333) == pytest.approx(1333 / 1500)  # long side capped
    assert resize_scale_info(500, 1500, 1333 / 1500) == (444, 1333)
    assert compute_scale(600, 1000, 800, 1333) == pytest.approx(800 / 600)  # round(1333.3) = 1333 fits


def test_pixel_normalisation():
    px = np.array([[[10, 20, 30]]], np.uint8)  # one RGB pixel
    caffe = PixelNormalizer()(px)[0, 0]
    assert caffe.tolist() == pytest.approx([30 - CAFFE_BGR_MEAN[0], 20 - CAFFE_BGR_MEAN[1], 10 - CAFFE_BGR_MEAN[2]],
                                           abs=1e-4)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    imagenet = PixelNormalizer("rgb", 1, mean, std)(px)[0, 0]
    assert imagenet.tolist() == pytest.approx([(v / 255 - m) / s for v, m, s in zip((10, 20, 30), mean, std)],
                                              abs=1e-5)
    with pytest.raises(ValueError, match="data.pixel_order"):
        PixelNormalizer("yuv")
    with pytest.raises(ValueError, match="data.pixel_scale"):
        PixelNormalizer("rgb", 100)


def test_collate_pads_with_zeros_to_the_divisibility():
    samples = [{"image": torch.ones(3, 40, 70), "image_size": (40, 70), "orig_size": (20, 35), "scale": 2.0,
                "image_id": 5, "target": {"boxes": torch.zeros(0, 4)}},
               {"image": torch.full((3, 66, 30), 2.0), "image_size": (66, 30), "orig_size": (66, 30), "scale": 1.0,
                "image_id": 9, "target": {"boxes": torch.zeros(0, 4)}}]
    batch = DetectionCollate(32)(samples)
    assert batch["images"].shape == (2, 3, 96, 96) and batch["images"].dtype == torch.float32
    assert batch["images"][0, :, :40, :70].eq(1).all() and batch["images"][0, :, 40:].eq(0).all()
    assert batch["images"][1, :, :, 30:].eq(0).all()
    assert batch["image_sizes"].tolist() == [[40, 70], [66, 30]] and batch["image_sizes"].dtype == torch.int64
    assert batch["orig_sizes"].tolist() == [[20, 35], [66, 30]] and batch["scales"].tolist() == [2.0, 1.0]
    assert batch["image_ids"].tolist() == [5, 9] and len(batch["targets"]) == 2
    assert pad_images([torch.ones(3, 5, 7)], 1).shape == (1, 3, 5, 7)


# --------------------------------------------------------------------------- sampling
RATIOS = np.random.default_rng(0).choice([0.75, 1.0, 1.25, 1.6, 0.6], 37)


def take(sampler, n):
    it = iter(sampler)
    return [[k.index for k in next(it)] for _ in range(n)]


@pytest.mark.parametrize("grouping", ["orientation", "sorted", "none"])
def test_sampler_is_deterministic_per_seed_iteration_rank(grouping):
    first = take(DetectionBatchSampler(RATIOS, 2, seed=3, grouping=grouping), 30)
    assert first == take(DetectionBatchSampler(RATIOS, 2, seed=3, grouping=grouping), 30)
    assert first != take(DetectionBatchSampler(RATIOS, 2, seed=4, grouping=grouping), 30)
    assert take(DetectionBatchSampler(RATIOS, 2, seed=3, start_iter=17, grouping=grouping), 13) == first[17:]
    # Two ranks never overlap; without orientation groups (one per rank, as detectron2's per-GPU grouping) they
    # together see what one process with twice the batch sees.
    whole = take(DetectionBatchSampler(RATIOS, 4, seed=3, grouping=grouping), 20)
    ranks = [take(DetectionBatchSampler(RATIOS, 2, rank=r, world_size=2, seed=3, grouping=grouping), 20)
             for r in range(2)]
    assert all(not set(a) & set(b) for a, b in zip(*ranks))
    if grouping == "orientation":
        assert all(len({RATIOS[i] >= 1 for i in batch}) == 1 for batch in ranks[0] + ranks[1])
        assert any((RATIOS[a[0]] >= 1) != (RATIOS[b[0]] >= 1) for a, b in zip(*ranks))  # per-rank orientations
    else:
        assert [a + b for a, b in zip(*ranks)] == whole
    keys = next(iter(DetectionBatchSampler(RATIOS, 2, seed=3, start_iter=5, grouping=grouping)))
    assert all(k.iteration == 5 for k in keys)


def test_sampler_groups_by_aspect_ratio():
    for batch in take(DetectionBatchSampler(RATIOS, 4, seed=1, grouping="orientation"), 40):
        assert len({RATIOS[i] >= 1 for i in batch}) == 1
    rank_of = np.empty(len(RATIOS), int)
    rank_of[np.argsort(RATIOS, kind="stable")] = np.arange(len(RATIOS))
    for batch in take(DetectionBatchSampler(RATIOS, 4, seed=1, grouping="sorted"), 40):
        positions = sorted(rank_of[batch])
        assert positions == list(range(positions[0], positions[0] + 4)) and positions[0] % 4 == 0
    with pytest.raises(ValueError, match="data.train.grouping"):
        DetectionBatchSampler(RATIOS, 2, grouping="random")


# --------------------------------------------------------------------------- loaders on the mini set
@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = mini_coco(tmp_path_factory.mktemp("coco") / "mini", num_train=24, num_val=10, size=64)
    return {"root": str(root), "mask_on": True, "pixel_order": "rgb", "pixel_scale": 1,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "size_divisibility": 32,
            "train": {"short_sides": [64, 80, 96], "max_size": 160},
            "val": {"short_side": 80, "max_size": 160}}


def same_batch(a, b):
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["image_ids"], b["image_ids"])
    for ta, tb in zip(a["targets"], b["targets"]):
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def test_train_batches_follow_the_contract_and_resume_exactly(cfg):
    loader = build_coco_train_loader(cfg, 2, seed=7)
    batches = [next(loader) for _ in range(6)]
    sizes = set()
    for batch in batches:
        images = batch["images"]
        assert images.dtype == torch.float32 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
        for i, (h, w) in enumerate(batch["image_sizes"].tolist()):
            sizes.add(min(h, w))
            assert images[i, :, h:].eq(0).all() and images[i, :, :, w:].eq(0).all()
            target = batch["targets"][i]
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert target["iscrowd"].dtype == torch.bool and (~target["iscrowd"]).any()
            assert len(target["masks"]) == len(target["boxes"]) > 0
            assert (target["boxes"][:, 2] <= w).all() and (target["boxes"][:, 3] <= h).all()
            oh, ow = batch["orig_sizes"][i].tolist()
            assert (h, w) == resize_scale_info(oh, ow, float(batch["scales"][i]))
        assert len({w >= h for h, w in batch["orig_sizes"].tolist()}) == 1  # grouped by orientation
    assert len(sizes) > 1  # short sides drawn per image from the list
    resumed = build_coco_train_loader(cfg, 2, seed=7, start_iter=4)
    same_batch(next(resumed), batches[4])
    same_batch(next(resumed), batches[5])
    ranks = [next(build_coco_train_loader(cfg, 1, rank=r, world_size=2, seed=7)) for r in range(2)]
    assert torch.cat([b["image_ids"] for b in ranks]).tolist() == batches[0]["image_ids"].tolist()


def test_double_flip_mode_holds_each_image_and_its_mirror(cfg):
    loader = build_coco_train_loader({**cfg, "train": {**cfg["train"], "flip": "double", "short_sides": [64]}}, 2)
    samples = loader.loader.dataset
    assert len(samples) == 2 * len(loader.dataset)
    from normkit.data.samplers import SampleKey
    plain, mirror = samples[SampleKey(0, 1, None)], samples[SampleKey(0, 1 + len(loader.dataset), None)]
    assert not plain["flipped"] and mirror["flipped"]
    assert torch.allclose(plain["image"].flip(-1), mirror["image"], atol=1e-4)
    with pytest.raises(ValueError, match="data.train.flip"):
        build_coco_train_loader({**cfg, "train": {"flip": "sometimes"}}, 2)


def test_val_loader_shards_keep_every_image(cfg):
    full = build_coco_val_loader(cfg)
    ids = [i for b in full for i in b["image_ids"].tolist()]
    assert len(ids) == len(full.dataset.dataset) == 10
    shards = [[i for b in build_coco_val_loader(cfg, rank=r, world_size=3) for i in b["image_ids"].tolist()]
              for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids)
    batch = next(iter(full))
    assert min(batch["image_sizes"][0].tolist()) == 80 and "targets" in batch
    assert batch["images"].shape[0] == 1  # one image per batch unless data.val.batch_size says otherwise


def test_sorted_blocks_cover_all_full_blocks_every_epoch_in_a_new_order():
    from normkit.data.detection import sorted_block_batches
    ratios = np.arange(25, dtype=np.float64)[::-1] / 10  # sorted order: 24, 23, ..., 0
    stream = sorted_block_batches(ratios, 2, seed=1)
    epochs = [[next(stream) for _ in range(12)] for _ in range(3)]  # 12 full blocks, index 0 (largest) left over
    blocks = sorted([24 - 2 * b, 23 - 2 * b] for b in range(12))
    assert all(sorted(epoch) == blocks for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_double_flip_mode_mirrors_from_index_n_on(cfg):
    from normkit.data.samplers import SampleKey
    loader = build_coco_train_loader({**cfg, "train": {**cfg["train"], "flip": "double", "short_sides": [64]}}, 2)
    n = len(loader.dataset)
    samples = loader.loader.dataset
    assert not samples[SampleKey(0, n - 1, None)]["flipped"] and samples[SampleKey(0, n, None)]["flipped"]
    assert samples[SampleKey(0, n, None)]["image_id"] == samples[SampleKey(0, 0, None)]["image_id"]
