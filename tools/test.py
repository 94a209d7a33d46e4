#!/usr/bin/env python
"""Evaluate a checkpoint on the val split, or watch a work dir (see normkit/tools/test.py).

    python tools/test.py --config CFG --checkpoint CKPT [--scales ...] [--flip] [--out results.json]
    python tools/test.py --config CFG --watch WORK_DIR
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from normkit.tools.test import main  # noqa: E402

if __name__ == "__main__":
    main()
