#!/usr/bin/env python
"""Train a config, then evaluate it on the val split and print the results (see normkit/tools/train.py).

    python tools/train.py --config mini/r18d8_sn_c1_deepsup [--work-dir DIR] [--resume | --new-run] [--set k=v ...]
    torchrun --nproc_per_node N tools/train.py --config ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from normkit.tools.train import main  # noqa: E402

if __name__ == "__main__":
    main()
