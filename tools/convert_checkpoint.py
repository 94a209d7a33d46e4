#!/usr/bin/env python
"""Convert a published checkpoint to normkit's layout (see normkit/tools/convert.py).

    python tools/convert_checkpoint.py --from csail encoder_epoch_20.pth decoder_epoch_20.pth \
        --out r50d8_ppm_deepsup.pth --config csail/r50d8_ppm_deepsup
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from normkit.tools.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
