#!/usr/bin/env python
"""Evaluate a checkpoint on the val split, or watch a work dir (see normkit/tools/test.py).

    python tools/test.py --config CFG --checkpoint CKPT [--scales ...] [--flip] [--out results.json]
    python tools/test.py --config CFG --watch WORK_DIR
"""
import os
import sys
from pathlib import Path

# Before torch loads OpenMP (importing normkit loads torch): idle OpenMP workers sleep instead of spinning. On a
# CPU shared with other jobs, spinning workers wait for descheduled peers at every parallel op (measured on 2 busy
# cores: a ResNet-18 step 4.5 s spinning vs 0.6 s sleeping); on an idle machine it costs little. The installed
# normkit-* commands start after torch is loaded: set OMP_WAIT_POLICY=PASSIVE in the environment there.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from normkit.tools.test import main  # noqa: E402

if __name__ == "__main__":
    main()
