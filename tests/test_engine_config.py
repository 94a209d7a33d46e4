import pytest

from normkit.engine import apply_overrides, load_config


def test_overrides_parse_yaml_values_into_dotted_keys():
    cfg = {"train": {"max_iter": 10, "optimizer": {"lr": 0.1}}, "model": {}}
    out = apply_overrides(cfg, ["train.max_iter=20", "train.optimizer.lr=1e-3", "train.amp=bf16", "train.x=[1, 2]",
                                "train.optimizer.lr_mult={decode_head: 10}", "model.pretrained=null"])
    assert out == {"train": {"max_iter": 20, "amp": "bf16", "x": [1, 2],
                             "optimizer": {"lr": 1e-3, "lr_mult": {"decode_head": 10}}},
                   "model": {"pretrained": None}}
    assert cfg["train"]["max_iter"] == 10  # the input is left alone


def test_bad_overrides_are_reported():
    with pytest.raises(ValueError, match="must look like dotted.key=value"):
        apply_overrides({}, ["train.max_iter"])
    with pytest.raises(KeyError, match="trian is not a section"):
        apply_overrides({"train": {}}, ["trian.max_iter=3"])


def test_load_config_checks_the_top_level(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: x}\ntrain: {max_iter: 3}\n")
    assert load_config(path) == {"model": {"name": "x"}, "train": {"max_iter": 3}, "data": {}, "evaluation": {}}
    path.write_text("modle: {}\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown config key modle \(did you mean model\?\)"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
