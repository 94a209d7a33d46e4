#!/usr/bin/env python
"""Segment one image or every image in a folder and write colour overlays (see normkit/tools/demo.py).

    python tools/demo.py --config CFG --checkpoint CKPT --image IMG_OR_DIR [--out OUT] [--scales ...] [--flip]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from normkit.tools.demo import main  # noqa: E402

if __name__ == "__main__":
    main()
