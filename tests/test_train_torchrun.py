"""The same tools/train.py command under torchrun: 2 gloo processes on CPU with SyncSwitchNorm."""
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_tool import _args

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_train_checkpoint_and_evaluate(tmp_path):
    work_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(ROOT / "tools" / "train.py"),
               *_args(tmp_path, work_dir, "train.device=cpu", "train.sync_norm=true", "train.batch_size=1")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(re.findall(r"^mIoU [\d.]+  pixel acc", done.stdout, re.M)) == 1  # only rank 0 reports
    results = json.loads((work_dir / "eval_results.json").read_text())
    assert 0.0 <= results["mean_iou"] <= 1.0
    assert (work_dir / "latest.pth").is_file()
