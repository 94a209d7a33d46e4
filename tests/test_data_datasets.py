"""Dataset readers on files written in each dataset's real layout, and their errors."""
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from normkit.data import ADE20KDataset, PascalContextDataset, VOCDataset, build_dataset


def write_jpg(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def write_png(path, array, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(array, np.uint8), mode="L")
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette)
    im.save(path)


ADE_RAW = np.array([[0, 1, 2], [150, 75, 0]], np.uint8)
ADE_EXPECTED = np.array([[255, 0, 1], [149, 74, 255]], np.uint8)  # 0 = other -> ignored, k -> k - 1


@pytest.fixture
def ade_root(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    records = []
    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(2):
            name = f"ADE_{prefix}_{i + 1:08d}"
            write_jpg(base / "images" / split / f"{name}.jpg", 2, 3, seed=i)
            write_png(base / "annotations" / split / f"{name}.png", ADE_RAW)
            if split == "training":
                records.append({"fpath_img": f"ADEChallengeData2016/images/{split}/{name}.jpg",
                                "fpath_segm": f"ADEChallengeData2016/annotations/{split}/{name}.png",
                                "width": 3, "height": 2})
    (tmp_path / "training.odgt").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_ade20k_odgt_shifts_labels(ade_root):
    ds = ADE20KDataset(ade_root, source="odgt", list_file="training.odgt")
    assert len(ds) == 2 and ds.class_names[0] == "wall" and ds.class_names[149] == "flag"
    item = ds[1]
    np.testing.assert_array_equal(item["label"], ADE_EXPECTED)
    assert item["image"].shape == (2, 3, 3) and item["image"].dtype == np.uint8
    assert item["name"] == "ADE_train_00000002" and item["ori_size"] == (2, 3)
    assert ds.image_size(0) == (2, 3)


@pytest.mark.parametrize("use_parent", [True, False])
def test_ade20k_folder_layout(ade_root, use_parent):
    root = ade_root if use_parent else ade_root / "ADEChallengeData2016"
    ds = ADE20KDataset(root, source="folder", split="validation")
    assert [s.name for s in ds.samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    np.testing.assert_array_equal(ds[0]["label"], ADE_EXPECTED)
    assert ds.image_size(1) == (2, 3)  # from the image header


def test_build_dataset_ade20k_defaults(ade_root):
    ds = build_dataset({"dataset": "ade20k", "root": str(ade_root), "num_classes": 150}, "train")
    assert len(ds) == 2
    val = build_dataset({"dataset": "ade20k", "root": str(ade_root), "num_classes": 150,
                         "val": {"source": "folder"}}, "val")
    assert val.samples[0].name == "ADE_val_00000001"


VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]


def voc_layout(root, ann_dir="SegmentationClass"):
    raw = np.array([[0, 1, 255], [2, 20, 1]], np.uint8)
    for name in ("2007_000032", "2007_000033"):
        write_jpg(root / "JPEGImages" / f"{name}.jpg", 2, 3)
        write_png(root / ann_dir / f"{name}.png", raw, palette=VOC_PALETTE)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2007_000032\n2007_000033\n\n")
    (lists / "deeplab.txt").write_text(f"/JPEGImages/2007_000033.jpg /{ann_dir}/2007_000033.png\n")
    return raw


def test_voc_reads_palette_png_indices(tmp_path):
    raw = voc_layout(tmp_path)
    # cv2 decodes a palette PNG to its colours: class 1 would come back as (0, 0, 128) BGR, not 1.
    decoded = cv2.imread(str(tmp_path / "SegmentationClass" / "2007_000032.png"), cv2.IMREAD_UNCHANGED)
    assert decoded.ndim == 3
    ds = VOCDataset(tmp_path, list_file="ImageSets/Segmentation/val.txt", ann_dir="SegmentationClass")
    assert len(ds) == 2 and ds.class_names[15] == "person"
    np.testing.assert_array_equal(ds[0]["label"], raw)  # VOC labels are used as is, 255 stays ignored
    deeplab = VOCDataset(tmp_path, list_file="ImageSets/Segmentation/deeplab.txt")
    assert [s.name for s in deeplab.samples] == ["2007_000033"]
    np.testing.assert_array_equal(deeplab[0]["label"], raw)


def test_build_dataset_voc_val_defaults(tmp_path):
    voc_layout(tmp_path)
    ds = build_dataset({"dataset": "voc", "root": str(tmp_path), "num_classes": 21}, "val")
    assert len(ds) == 2 and ds.samples[0].label.parent.name == "SegmentationClass"


def test_pascal_context59_reduces_zero_label(tmp_path):
    raw = np.array([[0, 1, 59], [30, 0, 2]], np.uint8)
    write_jpg(tmp_path / "JPEGImages" / "2008_000002.jpg", 2, 3)
    write_png(tmp_path / "SegmentationClassContext" / "2008_000002.png", raw)
    (tmp_path / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (tmp_path / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    ds = build_dataset({"dataset": "pascal_context", "root": str(tmp_path), "num_classes": 59}, "val")
    assert isinstance(ds, PascalContextDataset) and ds.class_names[0] == "aeroplane"
    np.testing.assert_array_equal(ds[0]["label"], [[255, 0, 58], [29, 255, 1]])


# ---- errors -------------------------------------------------------------------------------------------

def test_missing_root_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset({"dataset": "ade20k", "root": str(tmp_path / "nowhere"), "num_classes": 150}, "train")


def test_missing_list_names_it(ade_root):
    with pytest.raises(FileNotFoundError, match="validation.odgt"):
        build_dataset({"dataset": "ade20k", "root": str(ade_root), "num_classes": 150}, "val")


def test_missing_folder_split_names_it(ade_root):
    with pytest.raises(FileNotFoundError, match="testing"):
        ADE20KDataset(ade_root, source="folder", split="testing")


def test_bad_odgt_line(tmp_path):
    (tmp_path / "training.odgt").write_text('{"fpath_img": "a.jpg"}\n')
    with pytest.raises(ValueError, match=r"training.odgt:1.*fpath_segm"):
        ADE20KDataset(tmp_path, list_file="training.odgt")


def test_missing_image_file_names_it(ade_root):
    ds = ADE20KDataset(ade_root, list_file="training.odgt")
    ds.samples[0].image.unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000001.jpg"):
        ds[0]


def test_unreadable_files_name_them(ade_root):
    ds = ADE20KDataset(ade_root, list_file="training.odgt")
    ds.samples[0].image.write_bytes(b"not a jpeg at all")
    with pytest.raises(RuntimeError, match="cannot decode image file .*ADE_train_00000001.jpg"):
        ds[0]
    ds.samples[1].label.write_bytes(b"\x89PNG broken")
    with pytest.raises(RuntimeError, match="cannot decode label file .*ADE_train_00000002.png"):
        ds[1]


def test_rgb_label_is_rejected(ade_root):
    ds = ADE20KDataset(ade_root, list_file="training.odgt")
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(ds.samples[0].label)
    with pytest.raises(RuntimeError, match="single-channel.*got mode RGB"):
        ds[0]


def test_size_mismatch(ade_root):
    ds = ADE20KDataset(ade_root, list_file="training.odgt")
    write_png(ds.samples[0].label, np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"size mismatch.*2x3.*3x3"):
        ds[0]


def test_label_values_beyond_num_classes(ade_root):
    ds = ADE20KDataset(ade_root, list_file="training.odgt", num_classes=100)
    with pytest.raises(ValueError, match=r"values \[150\].*num_classes"):
        ds[0]


def test_config_errors(ade_root):
    with pytest.raises(ValueError, match="unknown dataset 'coco_stuff'"):
        build_dataset({"dataset": "coco_stuff", "root": str(ade_root), "num_classes": 3}, "train")
    with pytest.raises(ValueError, match="data.num_classes"):
        build_dataset({"dataset": "ade20k", "root": str(ade_root)}, "train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_dataset({"dataset": "ade20k", "root": str(ade_root), "num_classes": 150}, "test")
    with pytest.raises(ValueError, match="unknown ADE20K source 'lmdb'"):
        build_dataset({"dataset": "ade20k", "root": str(ade_root), "num_classes": 150,
                       "train": {"source": "lmdb"}}, "train")
    with pytest.raises(ValueError, match="3 class names for num_classes=150"):
        build_dataset({"dataset": "ade20k", "root": str(ade_root), "num_classes": 150,
                       "class_names": ["a", "b", "c"]}, "train")


def test_more_classes_than_8_bit_labels_hold(ade_root):
    # with 0 reduced, raw 255 (ignore) would otherwise be read as class 254
    with pytest.raises(ValueError, match="255 classes do not fit in 8-bit labels with 255 ignored and 0 reduced: "
                                         "at most 254"):
        build_dataset({"dataset": "ade20k", "root": str(ade_root), "num_classes": 255}, "train")
    assert len(build_dataset({"dataset": "ade20k", "root": str(ade_root), "num_classes": 254}, "train")) > 0


def test_label_lookup_tables_map_exactly_the_dataset_classes():
    from normkit.data.base import label_lut
    voc = label_lut(21, reduce_zero_label=False)  # raw k -> k for k < 21; 21..254 must not occur; 255 ignored
    assert voc[:21].tolist() == list(range(21)) and voc[21] == -1 and voc[254] == -1 and voc[255] == 255
    context = label_lut(59, reduce_zero_label=True)  # raw 0 ignored, raw k -> k - 1 for 1..59; 60 must not occur
    assert context[0] == 255 and context[1:60].tolist() == list(range(59)) and context[60] == -1
    assert context[255] == 255


def test_16_bit_images_keep_their_values(tmp_path):
    from normkit.data.base import read_image
    grey = np.array([[0, 257 * 100, 65535], [128, 257 * 200, 30000]], np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # stored as 16 bits
    rgb = read_image(path)
    expected = np.array([[0, 100, 255], [0, 200, 117]], np.uint8)  # round(v / 257): 128 -> 0, 30000 -> 117
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    odd = tmp_path / "grey16_odd.png"  # round(v / 257), not a shift by 8 bits: 129 -> 1, 65406 -> 254
    Image.fromarray(np.array([[129, 65406]], np.uint16)).save(odd)
    np.testing.assert_array_equal(read_image(odd)[..., 0], [[1, 254]])
    colour = tmp_path / "rgb48.png"  # 16 bits per channel: written by OpenCV (PIL cannot write it), BGR order
    cv2.imwrite(str(colour), np.array([[[65535, 0, 257 * 10]]], np.uint16))
    np.testing.assert_array_equal(read_image(colour), [[[10, 0, 255]]])


def test_decompression_bombs_name_the_file(tmp_path, monkeypatch):
    from normkit.data.base import image_size, read_image
    path = tmp_path / "bomb.png"
    Image.new("RGB", (60, 60)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 3600 pixels: more than twice the limit
    for read in (read_image, image_size):
        with pytest.raises(RuntimeError, match=r"cannot decode image file .*bomb.png: .*decompression bomb"):
            read(path)
