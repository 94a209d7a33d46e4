#!/usr/bin/env python
"""Run the test suite against another torch than the pinned one, by default the oldest that pyproject.toml accepts.

    python tools/check_torch_version.py [VERSION] [--venv DIR]

1. A virtual environment of the Python running this script (default: <tmp>/normkit-torch-VERSION-pyX.Y, reused
   when it already has that torch) gets torch==VERSION from the package index (a CUDA build pulls several GB of
   libraries; it runs on CPU too) and the other pinned requirements.
2. The committed HEAD is cloned into a temporary folder and built there against that torch, CPU kernels only.
3. pytest runs the default suite in the clone; the exit status is pytest's.

Keeps the declared minimum honest: the suite runs on the pinned torch everywhere else. A few minutes on 2 cores
once the environment exists, so CI leaves it out.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def full_version(version: str) -> str:
    """2.6 -> 2.6.0, the form torch.__version__ reports (an environment is reused when the two agree)."""
    return version if version.count(".") >= 2 else version + ".0"


def declared_minimum() -> str:
    """The version in pyproject.toml's torch>=X requirement."""
    match = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    if match is None:
        raise SystemExit("pyproject.toml names no torch>=X requirement; pass the version to check")
    return full_version(match.group(1))


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], **kwargs)


def installed_torch(python: Path) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True)
    return done.stdout.strip().split("+")[0] if done.returncode == 0 else None


def prepare_venv(venv: Path, version: str) -> Path:
    python = venv / "bin" / "python"
    if installed_torch(python) == version:
        print(f"reusing {venv} (torch {version})")
        return python
    run([sys.executable, "-m", "venv", venv], check=True)
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"torch=={version}"], check=True)
    others = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#") and not line.startswith("torch")]
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *others], check=True)
    return python


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", nargs="?", help="torch version (default: pyproject.toml's minimum)")
    parser.add_argument("--venv", type=Path, help="virtual environment to use or create "
                                                  "(default: <tmp>/normkit-torch-VERSION-pyX.Y)")
    args = parser.parse_args(argv)
    if args.version is not None and not re.fullmatch(r"[0-9]+\.[0-9]+(\.[0-9]+)?", args.version):
        parser.error(f"version must look like 2.6.0 or 2.6, got {args.version!r}")
    args.version = full_version(args.version) if args.version else declared_minimum()
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    args.venv = args.venv or Path(tempfile.gettempdir()) / f"normkit-torch-{args.version}-py{python_version}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    python = prepare_venv(args.venv, args.version)
    with tempfile.TemporaryDirectory(prefix="normkit-torch-check-") as tmp:
        clone = Path(tmp) / "normkit"
        run(["git", "clone", "-q", ROOT, clone], check=True)
        env = {**os.environ, "NORMKIT_WITH_CUDA": "0", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        run([python, "setup.py", "-q", "build_ext", "--inplace"], cwd=clone, env=env, check=True)
        status = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=clone, env=env).returncode
    outcome = "passed" if status == 0 else "FAILED"
    print(f"torch {args.version}, Python {sys.version.split()[0]}: the test suite {outcome}")
    return status


if __name__ == "__main__":
    sys.exit(main())
