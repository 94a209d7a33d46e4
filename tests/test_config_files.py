"""Configs by shipped name or path, `_base_` inheritance, and the listing of shipped configs."""
import copy
from pathlib import Path

import pytest
import yaml

import normkit
from normkit.engine import load_config
from normkit.models import read_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINI = "mini/r18d8_sn_c1_deepsup"


def parse(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_list_configs_names_every_yaml_under_configs():
    expected = sorted(str(p.relative_to(CONFIGS))[:-len(".yaml")] for p in CONFIGS.glob("*/*.yaml"))
    assert normkit.list_configs() == expected
    assert MINI in expected and "csail/r50d8_ppm_deepsup" in expected


@pytest.mark.parametrize("name", [MINI, MINI + ".yaml"])
def test_a_shipped_name_reads_the_same_config_as_its_path(name):
    assert read_config(name) == parse(CONFIGS / f"{MINI}.yaml")
    assert load_config(name) == load_config(CONFIGS / f"{MINI}.yaml")


def test_build_model_by_name():
    model = normkit.build_model("csail/r18d8_c1_deepsup")
    reference = normkit.build_model(CONFIGS / "csail" / "r18d8_c1_deepsup.yaml")
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    (tmp_path / "mini").mkdir()
    (tmp_path / "mini" / "r18d8_sn_c1_deepsup.yaml").write_text("model: {name: mine}\n")
    monkeypatch.chdir(tmp_path)
    assert read_config("mini/r18d8_sn_c1_deepsup.yaml") == {"model": {"name": "mine"}}
    assert read_config(MINI) == parse(CONFIGS / f"{MINI}.yaml")  # no such file without the suffix


def test_unknown_names_suggest_close_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"not the name of a shipped config \(close: csail/r50d8_ppm_deepsup"):
        read_config("csail/r50d8_ppm_deepsp")


def test_base_merges_mappings_and_replaces_other_values(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(f"_base_: {MINI}\n"
                    "model: {backbone: {norm: bn, norm_kwargs: {eps: 0.001}}}\n"
                    "data: {train: {short_sides: [64]}}\n"
                    "train: {max_iter: 3}\n")
    expected = copy.deepcopy(parse(CONFIGS / f"{MINI}.yaml"))
    expected["model"]["backbone"]["norm"] = "bn"
    expected["model"]["backbone"]["norm_kwargs"] = {"momentum": 0.1, "eps": 0.001}
    expected["data"]["train"]["short_sides"] = [64]
    expected["train"]["max_iter"] = 3
    assert read_config(path) == expected
    assert load_config(path) == expected


def test_base_chains_resolve_paths_from_the_including_file(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "a.yaml").write_text(f"_base_: {MINI}\ntrain: {{max_iter: 5, seed: 1}}\n")
    (tmp_path / "b.yaml").write_text("_base_: bases/a.yaml\ntrain: {max_iter: 7}\n")
    cfg = read_config(tmp_path / "b.yaml")
    assert (cfg["train"]["max_iter"], cfg["train"]["seed"]) == (7, 1)
    assert cfg["model"] == parse(CONFIGS / f"{MINI}.yaml")["model"]


def test_base_cycles_and_bad_values_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ValueError, match="_base_ cycle"):
        read_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: [a.yaml, b.yaml]\n")
    with pytest.raises(ValueError, match="must be one config name or path"):
        read_config(tmp_path / "c.yaml")


def test_yaml_reads_exponent_floats_and_refuses_duplicate_keys(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 and 1.0e4 as strings: a schedule's min_lr would then fail deep inside training
    (tmp_path / "floats.yaml").write_text("_base_: " + str(CONFIGS / f"{MINI}.yaml") + "\n"
                                          "train: {lr_schedule: {policy: poly, power: 0.9, min_lr: 1e-4},\n"
                                          "        optimizer: {weight_decay: 1.0e-4, lr: .5e-1}}\n")
    train = read_config(tmp_path / "floats.yaml")["train"]
    assert train["lr_schedule"]["min_lr"] == 1e-4 and train["optimizer"]["weight_decay"] == 1e-4
    assert train["optimizer"]["lr"] == 0.05
    # an exponent without its sign too (1e4, 1.5E3), and only numbers become floats
    from normkit.io import parse_yaml
    assert parse_yaml("a: 1e4\nb: 1.5E3\nc: -2e-2\nd: 1e\ne: e4\n") == {
        "a": 1e4, "b": 1500.0, "c": -0.02, "d": "1e", "e": "e4"}
    (tmp_path / "twice.yaml").write_text("train: {max_iter: 10}\nmodel: {}\ntrain: {max_iter: 20}\n")
    with pytest.raises(ValueError, match="duplicate key 'train'"):
        read_config(tmp_path / "twice.yaml")
