"""tools/gpu_check.py judges the benchmarks' result rows right: the one GPU run must not pass or fail wrongly."""
import importlib.util
from pathlib import Path

GPU_CHECK = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

ROI_HEADERS = ["workload", "pass", "normkit ms", "torchvision ms", "reference ms", "normkit / torchvision",
               "reference / normkit", "note"]


def result(headers, rows):
    return {"headers": headers, "sections": [{"threads": 1, "rows": rows}]}


def test_roi_rows_need_torchvision_speed_and_nms_its_indices():
    rows = [["NMS 4000 boxes, IoU 0.7", "fwd", 1.0, 1.1, "", 0.91, "", "700 kept, INDICES DIFFER FROM TORCHVISION"],
            ["batched NMS 4000 boxes, 80 classes, IoU 0.5", "fwd", 1.0, 1.0, "", 1.0, "",
             "900 kept, same indices as torchvision"],
            ["RoIAlign FPN", "fwd", 1.2, 1.0, "", 1.2, "", ""],
            ["RoIPool C4", "fwd", 1.0, "", 2.0, "", 2.0, ""]]
    verdicts = [(name, ok) for name, ok, _ in gpu_check.roi_targets(result(ROI_HEADERS, rows))]
    assert verdicts == [("NMS 4000 boxes, IoU 0.7 fwd <= 1.0x torchvision", True),
                        ("NMS 4000 boxes, IoU 0.7 keeps torchvision's indices", False),
                        ("batched NMS 4000 boxes, 80 classes, IoU 0.5 fwd <= 1.0x torchvision", True),
                        ("batched NMS 4000 boxes, 80 classes, IoU 0.5 keeps torchvision's indices", True),
                        ("RoIAlign FPN fwd <= 1.0x torchvision", False),
                        ("RoIPool C4 fwd <= 1.0x torchvision", None)]  # torchvision absent: not judged


def test_cond_classifier_ops_need_1_5x_and_the_head_1x():
    headers = ["problem", "op", "fwd+bwd speedup"]
    rows = [["B=2", "dynamic_classify", 1.4], ["B=2", "class_embedding", 1.6], ["B=2", "head", 1.0]]
    verdicts = [ok for _, ok, _ in gpu_check.cond_classifier_targets(result(headers, rows))]
    assert verdicts == [False, True, True]


def test_switch_norm_bandwidth_is_judged_against_the_peak_beyond_the_l2_cache():
    headers = ["shape", "layer", "fwd+bwd / BN", "reference / this (fwd+bwd)", "fwd GB/s (3x model)"]
    rows = [["(16, 256, 128, 128)", "normkit SN", 1.1, 9.0, 2500.0], ["(16, 256, 128, 128)", "BatchNorm2d", 1, 0, 1],
            ["(2, 256, 128, 128)", "normkit SN", 1.3, 4.0, 2000.0]]
    l2 = 50 * 2 ** 20
    checks = gpu_check.switch_norm_targets(result(headers, rows), peak=3000.0, l2_bytes=l2)
    # 268 MB: 83% of the peak, 1.1x BN, 9x the reference; 33.5 MB fits in L2: bandwidth not judged, 1.3x, 4x
    assert [ok for _, ok, _ in checks] == [True, True, True, None, False, False]
    assert gpu_check.switch_norm_targets(result(headers, rows), peak=3200.0, l2_bytes=l2)[0][1] is False


def test_toolkit_root_finds_the_runtime_library(tmp_path):
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "lib64").mkdir()
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    (tmp_path / "cuda" / "lib64" / "libcudart.so.13").write_text("")
    assert gpu_check.toolkit_root(str(tmp_path / "cuda" / "bin" / "nvcc")) == str(tmp_path / "cuda")


def _collected_files(args, env=None):
    import os
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                           "cuda", *args], cwd=GPU_CHECK.parents[1], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}


def test_the_cuda_test_files_hold_every_cuda_test_and_need_no_pycocotools(tmp_path):
    files = gpu_check.cuda_test_files()
    assert set(files) == _collected_files(["tests"])  # what -m cuda selects from the whole suite
    # The GPU machine's image lacks pycocotools: the selected files must collect without it.
    (tmp_path / "pycocotools").mkdir()
    (tmp_path / "pycocotools" / "__init__.py").write_text("raise ImportError('pycocotools is not installed')")
    assert _collected_files(files, {"PYTHONPATH": str(tmp_path)}) == set(files)


def test_steps_keep_packages_carried_on_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert gpu_check.child_env(MAX_JOBS="16")["PYTHONPATH"].split(":") == [gpu_check.ROOT, "/tmp/site"]
    monkeypatch.delenv("PYTHONPATH")
    assert gpu_check.child_env()["PYTHONPATH"] == gpu_check.ROOT


def test_targets_hold_exactly_at_their_thresholds():
    headers = ["shape", "layer", "fwd+bwd / BN", "reference / this (fwd+bwd)", "fwd GB/s (3x model)"]
    rows = [["(16, 256, 128, 128)", "normkit SN", 1.2, 5.0, 2400.0],   # 80% of 3000 GB/s, 1.2x BN, 5x
            ["(16, 256, 128, 128)", "normkit SN", 1.21, 4.99, 2399.0]]  # just short of each
    checks = gpu_check.switch_norm_targets(result(headers, rows), peak=3000.0, l2_bytes=0)
    assert [ok for _, ok, _ in checks] == [True, True, True, False, False, False]
    # a tensor exactly the L2's size is partly read from it: its bandwidth is not judged
    nbytes = 4 * 16 * 256 * 128 * 128
    assert [ok for _, ok, _ in gpu_check.switch_norm_targets(result(headers, rows[:1]), 3000.0, nbytes)] == \
        [None, True, True]


def test_peak_bandwidth_counts_both_edges_of_the_memory_clock(monkeypatch):
    import types

    import torch
    h100 = types.SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # kHz, bits (H100 SXM)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: h100)
    assert gpu_check.peak_bandwidth_gbs() == 2 * 2.619e9 * 5120 / 8 / 1e9  # 3352 GB/s
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace())
    assert gpu_check.peak_bandwidth_gbs() is None


def _main_with(monkeypatch, failing_step, verdicts, capsys):
    """gpu_check.main() on a pretend GPU: every step succeeds but `failing_step` (a word of its command), each
    benchmark's targets are `verdicts`. Returns the exit status and the benchmarks run."""
    import json
    import types

    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(L2_cache_size=0))
    monkeypatch.setattr(gpu_check, "peak_bandwidth_gbs", lambda: 3000.0)
    benchmarks = []

    def run(cmd, limit, env=None, shown=3000):
        if gpu_check.DRIVER in cmd:
            benchmarks.append(Path(cmd[4]).name)
            with open(cmd[5], "w") as f:
                json.dump({"path": str(Path(gpu_check.ROOT) / "benchmarks" / "results" / "x.md")}, f)
        return (failing_step not in " ".join(cmd)), "done"

    monkeypatch.setattr(gpu_check, "run", run)
    monkeypatch.setattr(gpu_check, "TARGETS", {script: (lambda r, gpu: [("target", ok, "") for ok in verdicts])
                                               for script, _, _ in gpu_check.BENCHMARKS})
    status = gpu_check.main([])
    capsys.readouterr()
    return status, benchmarks


def test_the_summary_fails_on_a_failed_step_or_target_but_not_on_an_unjudged_one(monkeypatch, capsys):
    every = [script for script, _, _ in gpu_check.BENCHMARKS]
    assert _main_with(monkeypatch, "no step fails", [True, None], capsys) == (0, every)  # n/a: not judged
    assert _main_with(monkeypatch, "no step fails", [True, False], capsys) == (1, every)
    # failing CUDA tests fail the check, and the benchmarks still run (the build works)
    assert _main_with(monkeypatch, "pytest", [True], capsys) == (1, every)
    assert _main_with(monkeypatch, "build_ext", [True], capsys) == (1, [])
