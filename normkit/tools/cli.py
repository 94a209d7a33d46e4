"""What the command-line tools share: the config options and how a run's config is assembled from them.

A relative `data.root` is taken from the data directory: `--data-dir`, else the environment variable
NORMKIT_DATA_DIR, else the current directory. Shipped configs use relative roots (`data/mini_ade`), so an
installed package never reads or writes data inside itself, and a checkout keeps its `data/` folder.
"""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from normkit.engine import apply_overrides, load_config
from normkit.io import list_configs

__all__ = ["DATA_DIR_VARIABLE", "add_config_arguments", "data_dir", "resolve_data_root", "load_run_config",
           "train_command", "test_command", "demo_command"]

DATA_DIR_VARIABLE = "NORMKIT_DATA_DIR"


class _ListConfigs(argparse.Action):
    """--list-configs: prints the shipped config names and exits, like --help (so --config is not needed)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("\n".join(list_configs()))
        parser.exit()


def add_config_arguments(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    """--config (required), --list-configs, --set and, for tools that read data, --data-dir."""
    parser.add_argument("--config", required=True,
                        help="experiment YAML path, or the name of a shipped config (e.g. mini/r18d8_sn_c1_deepsup)")
    parser.add_argument("--list-configs", nargs=0, action=_ListConfigs, help="print the shipped config names and exit")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config entries, e.g. train.max_iter=100 train.optimizer.lr=0.01 (may be "
                             "repeated)")
    if data:
        parser.add_argument("--data-dir", help=f"folder that a relative data.root is taken from (default: "
                                               f"${DATA_DIR_VARIABLE}, else the current directory)")


def data_dir(explicit: str | None = None) -> Path:
    """The folder relative data roots are taken from (see the module docstring)."""
    return Path(explicit or os.environ.get(DATA_DIR_VARIABLE) or ".")


def resolve_data_root(cfg: dict, folder: Path) -> dict:
    """`cfg` with a relative `data.root` placed under `folder` (a copy when it changes)."""
    root = (cfg.get("data") or {}).get("root")
    if root is None or Path(root).is_absolute():
        return cfg
    return {**cfg, "data": {**cfg["data"], "root": os.fspath(folder / root)}}


def load_run_config(args: argparse.Namespace) -> dict:
    """The config of a run: --config read, --set applied, then the data root resolved (see the module
    docstring); the result is what the work dir's config.yaml records."""
    cfg = apply_overrides(load_config(args.config), args.set)
    return resolve_data_root(cfg, data_dir(getattr(args, "data_dir", None)))


def console_command(tool: str):
    """The console-script entry point of normkit.tools.<tool>: runs its main() and exits 0. main() returns
    results for Python callers; a console script would take that value for its exit status."""
    def command() -> None:
        importlib.import_module(f"normkit.tools.{tool}").main()
    command.__name__ = f"{tool}_command"
    return command


train_command = console_command("train")
test_command = console_command("test")
demo_command = console_command("demo")
