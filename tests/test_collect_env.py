"""python -m normkit.collect_env: versions, the compiled library and each operator's device kernels."""
import re
import subprocess
import sys
from pathlib import Path

import torch

import normkit
from normkit import _C
from normkit.collect_env import op_devices

OPS_CPP = Path(__file__).resolve().parents[1] / "csrc" / "ops.cpp"


def test_every_declared_operator_is_reported_with_its_device_kernels():
    declared = sorted(re.findall(r'm\.def\("(\w+)\(', OPS_CPP.read_text()))
    devices = op_devices()
    assert sorted(devices) == declared
    # switch_norm, its backward and the running-statistics update are composed of other operators; every other one
    # has a CPU kernel, and a CUDA kernel exactly when the library was built for CUDA targets.
    assert sorted(op for op in devices if not devices[op]) == ["_switch_norm_backward",
                                                               "_switch_norm_update_running_stats", "switch_norm"]
    expected = ["CPU", "CUDA"] if _C.cuda_archs else ["CPU"]
    assert all(kinds == expected for kinds in devices.values() if kinds)


def test_the_report_names_versions_and_the_build():
    out = subprocess.run([sys.executable, "-m", "normkit.collect_env"], capture_output=True, text=True,
                         check=True).stdout
    assert re.search(rf"^torch +{re.escape(torch.__version__)} ", out, re.M)
    assert re.search(rf"^torch CUDA +{re.escape(torch.version.cuda or 'none')}", out, re.M)
    assert re.search(rf"^normkit +{re.escape(normkit.__version__)} ", out, re.M)
    assert re.search(r"^CUDA kernels built for +" + (re.escape(_C.cuda_archs.replace(",", ", ")) if _C.cuda_archs
                                                      else "none"), out, re.M)
    assert re.search(rf"^  roi_align +CPU", out, re.M)
    assert re.search(rf"^CPU threads +{torch.get_num_threads()} intra-op", out, re.M)


def test_the_report_lists_every_operator_and_every_gpu(monkeypatch):
    from normkit.collect_env import collect_env
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Pretend GPU {index}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, index))
    lines = dict(collect_env())
    assert lines["GPU 0"] == "Pretend GPU 0 (compute capability 9.0)"
    assert lines["GPU 1"] == "Pretend GPU 1 (compute capability 9.1)"
    devices = op_devices()
    assert {label.strip(): value for label, value in lines.items() if label.startswith("  ") and "composite" not in
            label} == {op: ", ".join(kinds) for op, kinds in devices.items() if kinds}
    assert lines["  composite (of the above)"] == ", ".join(sorted(op for op, kinds in devices.items() if not kinds))
