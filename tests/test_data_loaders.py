"""Training/validation loaders: determinism, exact resume, distributed slicing, pipeline geometry."""
import collections
import itertools

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from normkit.data import MINI_ADE_CLASSES, build_train_loader, build_val_loader, generate_mini_ade
from normkit.data.samplers import global_batches
from normkit.data.transforms import (CSAILTrainTransform, MMSegTrainTransform, crop_with_cat_max_ratio, pad_batch,
                                     photometric_distortion, rescale_size)


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    return generate_mini_ade(tmp_path_factory.mktemp("mini"), num_train=24, num_val=5, size=40)


def config(root, pipeline):
    train = ({"pipeline": "csail", "short_sides": [32, 40, 48], "max_long_side": 56, "pad_multiple": 8}
             if pipeline == "csail" else
             {"pipeline": "mmseg", "scale": [80, 40], "ratio_range": [0.5, 2.0], "crop_size": [32, 24]})
    return {"dataset": "ade20k", "root": str(root), "num_classes": len(MINI_ADE_CLASSES), "train": train}


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("pipeline", ["csail", "mmseg"])
def test_resume_reproduces_uninterrupted_run(mini_root, pipeline):
    cfg = config(mini_root, pipeline)
    full = take(build_train_loader(cfg, 4, seed=7), 9)  # 24 samples / 4 = 6 per epoch: crosses an epoch
    resumed = take(build_train_loader(cfg, 4, seed=7, start_iter=5), 4)
    for a, b in zip(full[5:], resumed):
        assert a["meta"] == b["meta"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    other = next(build_train_loader(cfg, 4, seed=8))
    assert other["meta"]["indices"] != full[0]["meta"]["indices"]


def test_workers_give_the_same_batches(mini_root):
    cfg = config(mini_root, "mmseg")
    a = take(build_train_loader(cfg, 3, seed=1), 3)
    b = take(build_train_loader(cfg, 3, seed=1, num_workers=1), 3)
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])


def test_csail_ranks_draw_their_own_orientation_and_short_side(mini_root):
    # CSAIL's loader gives every GPU's batch its own orientation and short side
    cfg = config(mini_root, "csail")
    ranks = [take(build_train_loader(cfg, 2, seed=2, rank=r, world_size=2), 12) for r in range(2)]
    ds = build_train_loader(cfg, 2).dataset
    sides, orientations = [], []
    for r0, r1 in zip(*ranks):
        assert not set(r0["meta"]["indices"]) & set(r1["meta"]["indices"])
        per_rank = []
        for part in (r0, r1):
            landscape = {ds.image_size(i)[1] >= ds.image_size(i)[0] for i in part["meta"]["indices"]}
            assert len(landscape) == 1
            valid = (part["labels"][0] != 255).nonzero()
            h, w = (valid.max(0).values + 1).tolist()
            per_rank.append((landscape.pop(), min(h, w) if max(h, w) < 55 else None))
        orientations.append(per_rank[0][0] != per_rank[1][0])
        sides.append(None not in (per_rank[0][1], per_rank[1][1]) and per_rank[0][1] != per_rank[1][1])
    assert any(orientations) and any(sides)


def test_ranks_take_disjoint_slices_of_the_global_batch(mini_root):
    cfg = config(mini_root, "mmseg")
    single = take(build_train_loader(cfg, 4, seed=2, start_iter=3), 2)
    ranks = [take(build_train_loader(cfg, 2, seed=2, start_iter=3, rank=r, world_size=2), 2) for r in range(2)]
    for step in range(2):
        r0, r1, whole = ranks[0][step], ranks[1][step], single[step]
        assert r0["meta"]["indices"] + r1["meta"]["indices"] == whole["meta"]["indices"]
        assert not set(r0["meta"]["indices"]) & set(r1["meta"]["indices"])
        assert r0["meta"]["iteration"] == r1["meta"]["iteration"] == 3 + step
        for part, lo in ((r0, 0), (r1, 2)):  # same samples, same augmentation, whatever the world size
            for i in range(2):
                h, w = (part["labels"][i] != 255).nonzero().max(0).values + 1
                assert torch.equal(part["images"][i, :, :h, :w], whole["images"][lo + i, :, :h, :w])
                assert torch.equal(part["labels"][i, :h, :w], whole["labels"][lo + i, :h, :w])


def test_csail_batches(mini_root):
    loader = build_train_loader(config(mini_root, "csail"), 3, seed=0)
    ds = loader.dataset
    for batch in take(loader, 8):
        images, labels = batch["images"], batch["labels"]
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[-2] % 8 == 0 and images.shape[-1] % 8 == 0
        orientations = {ds.image_size(i)[1] >= ds.image_size(i)[0] for i in batch["meta"]["indices"]}
        assert len(orientations) == 1  # one orientation per batch; squares go with landscapes (h <= w), as in CSAIL
        for i in range(3):
            valid = labels[i] != 255
            ys, xs = valid.nonzero(as_tuple=True)
            # the unpadded extent: short side from the list unless the long side cap (56) binds
            h, w = ys.max().item() + 1, xs.max().item() + 1
            assert max(h, w) <= 56 and (min(h, w) in (32, 40, 48) or max(h, w) >= 55)
            assert (images[i, :, h:, :] == 0).all() and (labels[i, h:, :] == 255).all()
        assert set(labels.unique().tolist()) <= set(range(7)) | {255}


def test_global_batches_orientation_and_size_checks():
    landscape = [True] * 5 + [False] * 3
    stream = global_batches(8, 2, 3, seed=0, landscape=landscape)
    for _ in range(10):
        batch = next(stream)
        assert len(batch) == 6 and all(len({landscape[i] for i in batch[r:r + 2]}) == 1 for r in (0, 2, 4))
    with pytest.raises(ValueError, match="one orientation"):
        next(global_batches(8, 6, 1, seed=0, landscape=landscape))
    # An orientation with fewer images than a batch still comes round: leftovers carry into the next epoch.
    few_portraits = [True] * 20 + [False] * 5
    seen = collections.Counter(i for batch in itertools.islice(global_batches(25, 8, 1, 0, few_portraits), 200)
                               for i in batch)
    assert set(seen) == set(range(25))
    assert max(seen.values()) - min(seen.values()) <= 8  # every image about equally often
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(global_batches(3, 2, 2, seed=0))


def test_mmseg_batches(mini_root):
    batch = next(build_train_loader(config(mini_root, "mmseg"), 4, seed=0))
    assert batch["images"].shape == (4, 3, 32, 24) and batch["labels"].shape == (4, 32, 24)


def test_rescale_size_matches_mmcv_keep_ratio():
    assert rescale_size(100, 200, (2048, 512)) == (512, 1024)   # short side binds
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side binds
    assert rescale_size(300, 200, (100, 50)) == (75, 50)
    # RandomResize truncates scale * ratio first: (20, 10) * 1.25 -> (25, 12), so 10x20 -> 12x24 (not 13x25)
    transform = MMSegTrainTransform(scale=(20, 10), ratio_range=(1.25, 1.25), crop_size=(40, 40), photometric=False)
    image, label = transform(np.zeros((10, 20, 3), np.uint8), np.zeros((10, 20), np.uint8), np.random.default_rng(0))
    assert image.shape == (12, 24, 3) and label.shape == (12, 24)


@pytest.mark.parametrize("backend", ["pil", "cv2"])
def test_csail_resize_truncates_and_uses_the_recipes_library(backend):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (37, 53), dtype=np.uint8)
    transform = CSAILTrainTransform((20,), 1000, flip=False, image_resize=backend)
    out_image, out_label = transform(image, label, rng, 20)
    # scale 20/37: 53 * 20 / 37 = 28.6 -> 28 (CSAIL's int32 sizes truncate)
    assert out_image.shape == (20, 28, 3) and out_label.shape == (20, 28)
    if backend == "pil":  # CSAIL: PIL BILINEAR (widened filter when shrinking) and NEAREST at pixel centres
        expected_image = np.asarray(Image.fromarray(image).resize((28, 20), Image.BILINEAR))
        expected_label = np.asarray(Image.fromarray(label).resize((28, 20), Image.NEAREST))
    else:
        expected_image = cv2.resize(image, (28, 20), interpolation=cv2.INTER_LINEAR)
        expected_label = cv2.resize(label, (28, 20), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(out_image, expected_image)
    np.testing.assert_array_equal(out_label, expected_label)


def test_cat_max_ratio_rejects_single_class_crops():
    label = np.zeros((4, 40), np.uint8)
    label[:, 30:] = 1  # only crops that reach column 30 hold two classes
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, x = crop_with_cat_max_ratio(label, (4, 12), 0.75, rng, tries=50)
        crop = label[y:y + 4, x:x + 12]
        assert (crop == 1).mean() > 0.25 and (crop == 0).mean() > 0.25
    ignored = np.full((4, 40), 255, np.uint8)
    ignored[:, :2] = 0
    rng, twin = np.random.default_rng(0), np.random.default_rng(0)
    y, x = crop_with_cat_max_ratio(ignored, (4, 12), 0.75, rng)  # every check fails: 10 redraws, the last unchecked
    draws = [(int(twin.integers(0, 1)), int(twin.integers(0, 29))) for _ in range(11)]
    assert (y, x) == draws[-1] and rng.bit_generator.state == twin.bit_generator.state


def test_cat_max_ratio_leaves_ignored_pixels_out_of_the_class_shares():
    # mmseg's RandomCrop counts the classes of a crop without the ignore index. Columns 0-19 alternate class 1 and
    # ignore (a crop inside them holds one class), columns 20-39 alternate classes 2 and 3.
    label = np.array([[1, 255] * 10 + [2, 3] * 10], np.uint8)
    for seed in range(30):
        y, x = crop_with_cat_max_ratio(label, (1, 10), 0.75, np.random.default_rng(seed))
        values, counts = np.unique(label[y, x:x + 10], return_counts=True)
        counts = counts[values != 255]
        assert len(counts) > 1 and counts.max() / counts.sum() < 0.75, (seed, x)


def _left_bright(height, width):
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :width // 2] = 200
    label = np.full((height, width), 2, np.uint8)
    label[:, :width // 2] = 1
    return image, label


@pytest.mark.parametrize("pipeline", ["csail", "mmseg"])
def test_training_pipelines_flip_half_of_the_images(pipeline):
    # CSAIL's TrainDataset and mmseg's RandomFlip(prob=0.5): each image mirrored with probability 1/2
    if pipeline == "csail":
        transform, kwargs = CSAILTrainTransform(short_sides=(8,), max_long_side=100), {"short_side": 8}
    else:
        transform, kwargs = MMSegTrainTransform(scale=(16, 8), ratio_range=(1.0, 1.0), crop_size=(8, 16),
                                                cat_max_ratio=1.0, photometric=False), {}
    image, label = _left_bright(8, 16)
    flips = 0
    for seed in range(200):
        out_image, out_label = transform(image, label, np.random.default_rng(seed), **kwargs)
        assert out_image.shape[:2] == out_label.shape == (8, 16)
        flipped = out_label[0, 0] == 2
        assert (out_image[0, 0, 0] < 100) == flipped and (out_label[0, -1] == 1) == flipped
        flips += flipped
    assert 70 <= flips <= 130  # binomial(200, 1/2): 100 +- 7; with 1/4 it would be 50 +- 6


def test_photometric_distortion_stays_in_range_and_is_seeded():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a = photometric_distortion(image, np.random.default_rng(5))
    b = photometric_distortion(image, np.random.default_rng(5))
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, b)
    changed = [not np.allclose(photometric_distortion(image, np.random.default_rng(s)), image) for s in range(8)]
    assert any(changed)


class ScriptedRng:
    """Hands out the given draws in order (random(), uniform(), integers() alike)."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)

    def uniform(self, low, high):
        return self.draws.pop(0)

    def integers(self, low, high):
        assert (low, high) == (-18, 18)  # mmseg's randint(-18, 18): -18..17
        return self.draws.pop(0)


def test_photometric_distortion_works_in_uint8_as_mmseg():
    image = np.array([[[100, 100, 100], [200, 0, 0]]], np.uint8)
    # brightness +10.7 (truncated to uint8 after the step), contrast last but skipped, saturation skipped,
    # hue +10 on OpenCV's 0..179 scale
    out = photometric_distortion(image, ScriptedRng(0.0, 10.7, 0.9, 0.9, 0.0, 10, 0.9))
    assert out.dtype == np.float32 and out[0, 0].tolist() == [110, 110, 110]  # grey: hue leaves it
    brightened = np.array([[[210, 10, 10]]], np.uint8)  # 200 + 10.7 and 0 + 10.7, truncated
    hsv = cv2.cvtColor(brightened, cv2.COLOR_RGB2HSV)
    hsv[..., 0] += 10
    assert out[0, 1].tolist() == cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].tolist()
    # contrast first (x1.26: 100 -> 126), saturation x0.5 on uint8 S
    out = photometric_distortion(image, ScriptedRng(0.9, 0.0, 0.0, 1.26, 0.0, 0.5, 0.9))
    assert out[0, 0].tolist() == [126, 126, 126]
    hsv = cv2.cvtColor(np.array([[[252, 0, 0]]], np.uint8), cv2.COLOR_RGB2HSV)
    hsv[..., 1] = (hsv[..., 1] * 0.5).astype(np.uint8)
    assert out[0, 1].tolist() == cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].tolist()


def test_mmseg_transform_small_image_is_padded_by_collate():
    transform = MMSegTrainTransform(scale=(20, 10), ratio_range=(1, 1), crop_size=(16, 16), photometric=False)
    image = np.full((10, 20, 3), 128, np.uint8)
    label = np.ones((10, 20), np.uint8)
    img, lab = transform(image, label, np.random.default_rng(0))
    assert img.shape == (10, 16, 3) and lab.shape == (10, 16)
    images, labels = pad_batch([torch.ones(3, 10, 16)], [torch.from_numpy(lab.astype(np.int64))], 1, (16, 16))
    assert images.shape == (1, 3, 16, 16) and (labels[0, 10:] == 255).all() and (images[0, :, 10:] == 0).all()


def test_val_loader_shards(mini_root):
    cfg = config(mini_root, "csail")
    names = [b["meta"]["names"][0] for b in build_val_loader(cfg)]
    shards = [[b["meta"]["names"][0] for b in build_val_loader(cfg, rank=r, world_size=2)] for r in range(2)]
    assert len(names) == 5 and sorted(shards[0] + shards[1]) == sorted(names) and not set(shards[0]) & set(shards[1])
    batch = next(iter(build_val_loader(cfg)))
    h, w = batch["meta"]["ori_sizes"][0]
    assert batch["images"].shape == (1, 3, h, w) and batch["labels"].shape == (1, h, w)
    # ImageNet normalisation of an RGB uint8 image
    assert batch["images"].min() >= -0.485 / 0.229 - 1e-5 and batch["images"].max() <= (1 - 0.406) / 0.225 + 1e-5


def test_creating_a_loader_iterator_leaves_the_global_torch_rng_alone():
    """The model's random sampling draws from the global stream that checkpoints save; a loader iterator
    created after a restore (a resumed run) must not shift it."""
    from torch.utils.data import DataLoader

    from normkit.data.base import worker_options
    state = torch.get_rng_state()
    next(iter(DataLoader(list(range(4)), batch_size=2, **worker_options(0))))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("available,initialized,pinned", [(False, False, False), (True, False, False),
                                                          (True, True, True)])
def test_batches_are_pinned_only_for_a_process_that_uses_cuda(monkeypatch, available, initialized, pinned):
    # A CPU run on a machine with GPUs must not open a CUDA context (on GPU 0, for every rank) to pin memory.
    from normkit.data.base import worker_options
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    assert worker_options(0)["pin_memory"] is pinned and worker_options(2)["pin_memory"] is pinned


def test_every_epoch_holds_each_sample_once_in_a_new_order():
    # 12 samples, global batch 4: epoch e is batches 3e..3e+2, a fresh permutation of all 12 samples
    batches = list(itertools.islice(global_batches(12, 2, 2, seed=5), 9))
    epochs = [sum(batches[3 * e:3 * e + 3], []) for e in range(3)]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_an_orientation_with_exactly_one_batch_of_images_is_enough():
    landscape = [True, False, True, False, True, False]
    for batch in itertools.islice(global_batches(6, 3, 1, seed=0, landscape=landscape), 4):
        assert len({landscape[i] for i in batch}) == 1 and len(batch) == 3


@pytest.mark.parametrize("kwargs", [{"rank": 2, "world_size": 2}, {"rank": -1, "world_size": 2}, {"start_iter": -1},
                                    {"batch_size": 0}, {"world_size": 0, "rank": 0}])
def test_train_batch_sampler_rejects_impossible_positions(kwargs):
    from normkit.data.samplers import TrainBatchSampler
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        TrainBatchSampler(12, **{"batch_size": 2, **kwargs})


def test_each_sample_is_augmented_by_the_generator_of_its_seed_iteration_and_index(mini_root):
    # the documented contract: sample i of iteration t draws from numpy Generator([seed, t, i, 2]) (resumable,
    # independent of the batch it lands in); labels carry every geometric draw (rescale, crop, flip)
    cfg = config(mini_root, "mmseg")
    loader = build_train_loader(cfg, 3, seed=7)
    transform = MMSegTrainTransform(scale=(80, 40), ratio_range=(0.5, 2.0), crop_size=(32, 24))
    for iteration in range(2):
        batch = next(loader)
        assert batch["meta"]["iteration"] == iteration
        for i, index in enumerate(batch["meta"]["indices"]):
            sample = loader.dataset[index]
            _, label = transform(sample["image"], sample["label"], np.random.default_rng([7, iteration, index, 2]))
            h, w = label.shape
            assert torch.equal(batch["labels"][i, :h, :w], torch.from_numpy(label.astype(np.int64)))
            assert (batch["labels"][i, h:] == 255).all() and (batch["labels"][i, :, w:] == 255).all()


def test_csail_batches_are_padded_to_multiples_of_8_by_default(mini_root):
    train = {"pipeline": "csail", "short_sides": [33], "max_long_side": 50}
    cfg = {**config(mini_root, "csail"), "train": train}
    shapes = [tuple(b["images"].shape[-2:]) for b in take(build_train_loader(cfg, 2, seed=0), 4)]
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in shapes)
    unpadded = {**cfg, "train": {**train, "pad_multiple": 1}}
    assert any(h % 8 or w % 8 for b in take(build_train_loader(unpadded, 2, seed=0), 4)
               for h, w in [b["images"].shape[-2:]])
