"""COCODetection and the mini COCO generator: layout, mapping, D1 filtering rules, clear errors."""
import json
import shutil

import numpy as np
import pytest
from pycocotools import mask as mask_util

from normkit.data.coco import COCODetection, load_coco_json
from normkit.data.detection import build_coco_dataset
from normkit.data.synthetic_coco import MINI_COCO_CLASSES, generate_mini_coco

from coco_helpers import PYCOCOTOOLS_NUMPY2_WARNING, mini_coco

pytestmark = pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2_WARNING)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return mini_coco(tmp_path_factory.mktemp("coco") / "mini", num_train=60, num_val=12, size=64)


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_layout_and_annotation_kinds(root):
    for split, count in (("train2017", 60), ("val2017", 12)):
        data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert len(data["images"]) == count
        assert [c["id"] for c in data["categories"]] == [1, 2, 4, 7]
        for im in data["images"]:
            assert (root / "images" / split / im["file_name"]).is_file() and im["file_name"].endswith(".jpg")
    anns = json.loads((root / "annotations" / "instances_train2017.json").read_text())["annotations"]
    kinds = {"polygon" if isinstance(a["segmentation"], list) else
             "rle-" + ("compressed" if isinstance(a["segmentation"]["counts"], str) else "uncompressed")
             for a in anns}
    assert kinds == {"polygon", "rle-compressed", "rle-uncompressed"}
    assert any(a["iscrowd"] for a in anns)
    assert {a["category_id"] for a in anns} == {1, 2, 4, 7}
    # Boxes and areas are those of the stored masks.
    coco = load_coco_json(root / "annotations" / "instances_train2017.json")
    for a in anns[:40]:
        rle = coco.annToRLE(a)
        assert np.allclose(mask_util.toBbox(rle), a["bbox"]) and mask_util.area(rle) == a["area"]


def test_generator_is_deterministic_and_idempotent(tmp_path):
    a = generate_mini_coco(tmp_path / "a", num_train=4, num_val=2, size=64, seed=5)
    b = generate_mini_coco(tmp_path / "b", num_train=4, num_val=2, size=64, seed=5)
    assert tree_bytes(a) == tree_bytes(b)
    stamp = (a / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    generate_mini_coco(a, num_train=4, num_val=2, size=64, seed=5)
    assert (a / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp  # skipped
    c = generate_mini_coco(tmp_path / "c", num_train=4, num_val=2, size=64, seed=6)
    assert tree_bytes(c) != tree_bytes(a)


def test_records_and_contiguous_labels(root):
    ds = COCODetection(root, "train2017", mask_on=True)
    assert ds.class_names == MINI_COCO_CLASSES and ds.num_classes == 4
    assert ds.contiguous_to_cat_id == [1, 2, 4, 7] and ds.cat_id_to_contiguous[7] == 3
    labels = np.concatenate([r["labels"] for r in ds.records])
    assert set(labels.tolist()) == {0, 1, 2, 3}
    sample = ds[0]
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (sample["height"], sample["width"], 3)
    # Legacy boxes: x2 = x + w - 1; detectron2 boxes: x2 = x + w.
    plain = COCODetection(root, "train2017", legacy_plus_one=False, mask_on=False)
    ann = ds.coco.imgToAnns[ds.records[0]["image_id"]][0]
    x, y, w, h = ann["bbox"]
    assert ds.records[0]["boxes"][0].tolist() == pytest.approx([x, y, x + w - 1, y + h - 1])
    assert plain.records[0]["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h])
    assert plain.records[0]["segmentations"] is None


def test_empty_images_dropped_for_training_only(root):
    train = COCODetection(root, "train2017", filter_empty=True)
    everything = COCODetection(root, "train2017", filter_empty=False)
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    with_objects = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    assert len(everything) == 60
    assert {r["image_id"] for r in train.records} == with_objects
    assert train.stats["dropped_images"] == 60 - len(with_objects) > 0
    assert all((~r["iscrowd"]).any() for r in train.records)


def write_json(root, name, data):
    path = root / "annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def small_set(tmp_path, anns, size=(20, 30)):
    """One 20x30 image and the given annotations (category 5)."""
    root = tmp_path / "set"
    (root / "images" / "val2017").mkdir(parents=True)
    from PIL import Image
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / "images" / "val2017" / "a.png")
    images = [{"id": 1, "file_name": "a.png", "height": size[0], "width": size[1]}]
    anns = [{"id": i + 1, "image_id": 1, "category_id": 5, "iscrowd": 0, **a} for i, a in enumerate(anns)]
    write_json(root, "instances_val2017.json",
               {"images": images, "annotations": anns, "categories": [{"id": 5, "name": "thing"}]})
    return root


def test_zero_and_negative_boxes_are_dropped_and_counted(tmp_path):
    poly = [[2.0, 2.0, 8.0, 2.0, 8.0, 8.0]]
    root = small_set(tmp_path, [
        {"bbox": [2, 2, 6, 6], "area": 20.0, "segmentation": poly},    # kept
        {"bbox": [2, 2, 0, 6], "area": 0.0, "segmentation": poly},     # zero width
        {"bbox": [2, 2, -3, 6], "area": 4.0, "segmentation": poly},    # negative width
        {"bbox": [2, 2, 6, 6], "area": 0.0, "segmentation": poly},     # zero area
        {"bbox": [2, 2, 1, 6], "area": 6.0, "segmentation": poly},     # 1 px wide: x2 = x1 under D1's rule
        {"bbox": [40, 2, 5, 5], "area": 25.0, "segmentation": poly},   # entirely right of the image
        {"bbox": [2, 2, 6, 6], "area": 20.0, "segmentation": [[1.0, 2.0, 3.0, 4.0]]},  # no valid polygon
    ])
    ds = COCODetection(root, "val2017", mask_on=True)
    assert len(ds.records[0]["boxes"]) == 1 and ds.stats["dropped_annotations"] == 6
    # Without the legacy +1 the 1-pixel-wide box has x2 > x1 and stays.
    assert COCODetection(root, "val2017", legacy_plus_one=False, mask_on=True).stats["dropped_annotations"] == 5


def test_boxes_are_clipped_to_the_image(tmp_path):
    root = small_set(tmp_path, [{"bbox": [-3, 5, 40, 30], "area": 50.0, "segmentation": [[0, 5, 29, 5, 29, 19]]}])
    assert COCODetection(root, "val2017").records[0]["boxes"][0].tolist() == [0, 5, 29, 19]
    assert COCODetection(root, "val2017", legacy_plus_one=False).records[0]["boxes"][0].tolist() == [0, 5, 30, 20]


def test_missing_areas_are_filled_in_as_coco_defines_them(tmp_path):
    poly = [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0]]  # a right triangle of 10 x 8 px
    root = small_set(tmp_path, [{"bbox": [2, 2, 10, 8], "segmentation": poly},
                                {"bbox": [20, 4, 6, 5]},
                                {"bbox": [2, 2, 10, 8], "area": 7.0, "segmentation": poly},
                                {"bbox": [1, 1, 4, 3], "segmentation": [[1.0, 1.0, 5.0, 4.0]]}])  # no valid polygon
    anns = load_coco_json(root / "annotations" / "instances_val2017.json").dataset["annotations"]
    expected = float(mask_util.area(mask_util.merge(mask_util.frPyObjects(poly, 20, 30))))
    assert 35 < expected < 50  # about half the box: the mask's area, not the box's
    assert [a["area"] for a in anns] == [expected, 30.0, 7.0, 12.0]  # a given area is kept


def test_2014_splits_use_the_val2014_folder(root, tmp_path):
    other = tmp_path / "coco2014"
    shutil.copytree(root / "images" / "val2017", other / "val2014")  # the cocodataset.org zip layout
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    write_json(other, "instances_minival2014.json", data)
    ds = COCODetection(other, "minival2014")
    assert ds.img_dir == other / "val2014" and len(ds) == 12 and ds[3]["image"].ndim == 3
    with pytest.raises(FileNotFoundError, match="instances_valminusminival2014.json"):
        COCODetection(other, "valminusminival2014")


def test_missing_files_are_named(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO dataset root not found: .*nowhere"):
        COCODetection(tmp_path / "nowhere", "val2017")
    (tmp_path / "empty" / "images" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*instances_val2017\.json"):
        COCODetection(tmp_path / "empty", "val2017")
    (tmp_path / "noimg" / "annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="image folder of COCO split val2017 not found"):
        COCODetection(tmp_path / "noimg", "val2017")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    ds = COCODetection(copy, "val2017")
    missing = ds.records[2]["file"]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=missing.name):
        ds[2]


def test_corrupt_and_mismatched_images(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    ds = COCODetection(copy, "val2017")
    bad = ds.records[0]["file"]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(RuntimeError, match=f"cannot decode image file .*{bad.name}"):
        ds[0]
    from PIL import Image
    Image.fromarray(np.zeros((10, 11, 3), np.uint8)).save(ds.records[1]["file"], format="JPEG")
    with pytest.raises(ValueError, match="is 10x11 but .* says"):
        ds[1]


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "not a COCO annotation file: expected a JSON object"),
    ("{not json", "not valid JSON"),
    ('{"images": [], "annotations": []}', "'categories' must be a list, got nothing"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}',
     r"an entry of 'images' lacks \['file_name', 'height', 'width'\]"),
    ('{"images": [], "annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], '
     '"iscrowd": 0}], "categories": [{"id": 1, "name": "a"}]}', "refers to image 9"),
])
def test_json_that_is_not_coco(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_coco_json(path)


def test_rle_size_must_match_the_image(tmp_path):
    rle = {"counts": [0, 4], "size": [2, 2]}
    root = small_set(tmp_path, [{"bbox": [2, 2, 6, 6], "area": 20.0, "segmentation": rle}])
    with pytest.raises(ValueError, match=r"RLE size \[2, 2\] differs from the image size \[20, 30\]"):
        COCODetection(root, "val2017", mask_on=True)


def test_config_checks(root):
    cfg = {"root": str(root), "num_classes": 4, "val": {"split": "val2017"}}
    assert build_coco_dataset(cfg, "val").num_classes == 4
    with pytest.raises(ValueError, match="data.num_classes is 80 but .* has 4 categories"):
        build_coco_dataset({**cfg, "num_classes": 80}, "val")
    assert build_coco_dataset({**cfg, "class_names": list("abcd")}, "val").class_names == tuple("abcd")
    with pytest.raises(ValueError, match="needs `data.root`"):
        build_coco_dataset({}, "train")


def test_training_drops_images_whose_only_annotations_are_crowd(tmp_path):
    # Detectron-1 trains only on images with a non-crowd box (the RPN needs one)
    root = small_set(tmp_path, [{"bbox": [2, 2, 6, 6], "area": 20.0, "iscrowd": 1,
                                 "segmentation": [[2.0, 2.0, 8.0, 2.0, 8.0, 8.0]]}])
    assert len(COCODetection(root, "val2017", filter_empty=False)) == 1
    with pytest.raises(ValueError, match="no image left"):
        COCODetection(root, "val2017", filter_empty=True)


def test_contiguous_labels_follow_the_category_ids_not_the_file_order(tmp_path):
    root = small_set(tmp_path, [])
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"] = [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}, {"id": 7, "name": "seven"}]
    data["annotations"] = [{"id": 1, "image_id": 1, "category_id": 9, "iscrowd": 0, "bbox": [2, 2, 6, 6], "area": 36.0},
                           {"id": 2, "image_id": 1, "category_id": 5, "iscrowd": 0, "bbox": [1, 1, 4, 4], "area": 16.0}]
    path.write_text(json.dumps(data))
    ds = COCODetection(root, "val2017", mask_on=False)
    assert ds.contiguous_to_cat_id == [5, 7, 9] and ds.class_names == ("five", "seven", "nine")
    assert ds.records[0]["labels"].tolist() == [2, 0]
