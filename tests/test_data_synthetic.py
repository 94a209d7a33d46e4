"""The embedded mini ADE20K-layout set: real layout, deterministic, idempotent."""
import json

import numpy as np
import pytest
from PIL import Image

from normkit.data import MINI_ADE_CLASSES, build_dataset, generate_mini_ade


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_labels(tmp_path):
    root = generate_mini_ade(tmp_path / "mini", num_train=12, num_val=4, size=48)
    base = root / "ADEChallengeData2016"
    assert len(list((base / "images" / "training").glob("ADE_train_*.jpg"))) == 12
    assert len(list((base / "annotations" / "validation").glob("ADE_val_*.png"))) == 4
    records = [json.loads(line) for line in (root / "training.odgt").read_text().splitlines()]
    assert len(records) == 12
    seen = set()
    for record in records:
        with Image.open(root / record["fpath_img"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (record["width"], record["height"])
        with Image.open(root / record["fpath_segm"]) as lb:
            assert lb.format == "PNG" and lb.mode == "L" and lb.size == (record["width"], record["height"])
            values = np.asarray(lb)
        assert values.max() <= len(MINI_ADE_CLASSES)
        seen |= set(np.unique(values).tolist())
    assert seen == set(range(len(MINI_ADE_CLASSES) + 1))  # every class and the "other" label occur
    assert len({(r["height"], r["width"]) for r in records}) > 1  # both orientations for the CSAIL sampler

    ds = build_dataset({"dataset": "ade20k", "root": str(root), "num_classes": len(MINI_ADE_CLASSES)}, "val")
    assert len(ds) == 4 and ds[0]["label"].max() == 255


def test_deterministic_and_seeded(tmp_path):
    a = tree_bytes(generate_mini_ade(tmp_path / "a", num_train=5, num_val=2, size=40, seed=3))
    b = tree_bytes(generate_mini_ade(tmp_path / "b", num_train=5, num_val=2, size=40, seed=3))
    c = tree_bytes(generate_mini_ade(tmp_path / "c", num_train=5, num_val=2, size=40, seed=4))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_idempotent_and_regenerates_on_change(tmp_path):
    root = generate_mini_ade(tmp_path, num_train=3, num_val=2, size=40)
    image = root / "ADEChallengeData2016/images/training/ADE_train_00000001.jpg"
    stamp = image.stat().st_mtime_ns
    generate_mini_ade(tmp_path, num_train=3, num_val=2, size=40)
    assert image.stat().st_mtime_ns == stamp  # skipped: the manifest matches and every file exists
    image.unlink()
    generate_mini_ade(tmp_path, num_train=3, num_val=2, size=40)
    assert image.is_file()  # a missing file triggers regeneration
    generate_mini_ade(tmp_path, num_train=4, num_val=2, size=40)
    assert len((root / "training.odgt").read_text().splitlines()) == 4


def test_cli(tmp_path, capsys):
    from normkit.data.synthetic import main
    main(["--root", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "40"])
    assert "2 train / 1 val" in capsys.readouterr().out
    assert (tmp_path / "validation.odgt").is_file()


def test_class_names_come_from_the_manifest(tmp_path):
    from normkit.data.build import resolve_class_names
    root = generate_mini_ade(tmp_path, num_train=2, num_val=1, size=40)
    cfg = {"dataset": "ade20k", "root": str(root), "num_classes": len(MINI_ADE_CLASSES)}
    assert build_dataset(cfg, "train").class_names == MINI_ADE_CLASSES
    assert resolve_class_names({**cfg, "root": str(tmp_path / "absent")})[0] == "class_0"
    assert resolve_class_names({**cfg, "num_classes": 150})[0] == "wall"


def test_build_dataset_generates_the_configured_set(tmp_path):
    cfg = {"dataset": "ade20k", "root": str(tmp_path / "gen"), "num_classes": len(MINI_ADE_CLASSES),
           "synthetic": {"num_train": 3, "num_val": 2, "size": 40}}
    assert len(build_dataset(cfg, "train")) == 3 and len(build_dataset(cfg, "val")) == 2
    with pytest.raises(ValueError, match="data.synthetic must be a mapping"):
        build_dataset({**cfg, "synthetic": {"num_images": 3}}, "train")
