"""What the command-line tools share: --list-configs, shipped config names, and where relative data roots go."""
import subprocess
import sys

import pytest

import normkit
from normkit.tools import cli, train


def test_list_configs_prints_the_shipped_names_without_needing_a_config():
    out = subprocess.run([sys.executable, "-m", "normkit.tools.train", "--list-configs"], capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == normkit.list_configs()


def run_config(argv, monkeypatch, environment=None):
    monkeypatch.delenv(cli.DATA_DIR_VARIABLE, raising=False)
    if environment:
        monkeypatch.setenv(cli.DATA_DIR_VARIABLE, environment)
    return cli.load_run_config(train.parse_args(["--config", "mini/r18d8_sn_c1_deepsup", *argv]))


def test_relative_data_roots_are_taken_from_the_data_dir(tmp_path, monkeypatch):
    assert run_config([], monkeypatch)["data"]["root"] == "data/mini_ade"  # the current directory
    assert run_config([], monkeypatch, environment=str(tmp_path / "env"))["data"]["root"] == \
        str(tmp_path / "env" / "data" / "mini_ade")
    assert run_config(["--data-dir", str(tmp_path / "flag")], monkeypatch, environment=str(tmp_path / "env")) \
        ["data"]["root"] == str(tmp_path / "flag" / "data" / "mini_ade")
    absolute = str(tmp_path / "mine")
    assert run_config(["--data-dir", "elsewhere", "--set", f"data.root={absolute}"], monkeypatch) \
        ["data"]["root"] == absolute


def test_repeated_set_options_all_apply(monkeypatch):
    cfg = run_config(["--set", "train.max_iter=7", "--set", "train.optimizer.lr=0.5", "train.log_period=3"],
                     monkeypatch)
    assert (cfg["train"]["max_iter"], cfg["train"]["optimizer"]["lr"], cfg["train"]["log_period"]) == (7, 0.5, 3)


@pytest.mark.parametrize("tool", ["train", "test", "demo"])
def test_console_commands_run_the_tool_and_discard_its_results(tool, monkeypatch):
    calls = []
    monkeypatch.setattr(f"normkit.tools.{tool}.main", lambda: calls.append(tool) or {"results": 1})
    assert getattr(cli, f"{tool}_command")() is None
    assert calls == [tool]
