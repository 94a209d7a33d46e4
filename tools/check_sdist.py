#!/usr/bin/env python
"""Build the source archive and install it as a user would, then use it from outside the checkout.

    python tools/check_sdist.py [--keep]

1. `setup.py sdist` into build/sdist; the archive must hold every file under csrc/ and every shipped config
   (compared with the checkout), and no compiled library.
2. A fresh virtual environment in a temporary folder gets the pinned torch, setuptools and ninja from
   requirements.txt, then `pip install --no-build-isolation` of the archive (which compiles the ops).
3. From a temporary folder, with no path into the checkout, the environment's python runs this script with
   --installed: normkit comes from the environment, an SN op matches its reference, a model is built from a
   shipped config name; then `normkit-train --help`, `normkit-train --list-configs` and
   `python -m normkit.collect_env` run.

Uses the standard library only, so that the --installed half imports nothing from the checkout.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST_DIR = ROOT / "build" / "sdist"
# Installed into the fresh environment before the archive: what building it needs (pip's build isolation is
# off, so that it compiles against the pinned torch).
BUILD_REQUIREMENTS = ("torch", "setuptools", "ninja")


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def build_sdist() -> Path:
    for old in SDIST_DIR.glob("normkit-*.tar.gz"):
        old.unlink()
    run([sys.executable, "setup.py", "-q", "sdist", "-d", SDIST_DIR], cwd=ROOT, stdout=subprocess.DEVNULL)
    (archive,) = SDIST_DIR.glob("normkit-*.tar.gz")
    return archive


def check_contents(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        top = archive.name[:-len(".tar.gz")]
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    expected |= {f"normkit/configs/{p.relative_to(ROOT / 'configs').as_posix()}"
                 for p in (ROOT / "configs").glob("*/*.yaml")}
    missing = sorted(expected - members)
    compiled = sorted(m for m in members if m.endswith((".so", ".o")))
    if missing or compiled:
        raise SystemExit(f"{archive.name}: missing {missing}, compiled files {compiled}")
    print(f"{top}: {len(members)} files, every csrc/ file and {len(list((ROOT / 'configs').glob('*/*.yaml')))} "
          f"configs included", flush=True)


def install(archive: Path, venv: Path) -> None:
    run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "-c", ROOT / "requirements.txt"]
    run(pip + list(BUILD_REQUIREMENTS))
    start = time.time()
    run(pip + ["--no-build-isolation", archive])
    print(f"installed {archive.name} in {time.time() - start:.0f}s", flush=True)


def check_installed_from_outside(venv: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory(prefix="normkit-outside-") as outside:
        script = Path(outside) / "check_installed.py"  # a copy: no path into the checkout at all
        script.write_text(Path(__file__).read_text())
        for cmd in ([venv / "bin" / "python", script, "--installed", ROOT],
                    ["normkit-train", "--help"],
                    ["normkit-train", "--list-configs"],
                    [venv / "bin" / "python", "-m", "normkit.collect_env"]):
            run(cmd, cwd=outside, env=env)


def installed_checks(checkout: Path) -> None:
    """Runs in the fresh environment, from a folder outside the checkout."""
    import importlib.metadata

    import torch

    import normkit
    from normkit.ops import switch_norm, switch_norm_reference

    location = Path(normkit.__file__).resolve()
    assert checkout not in location.parents, f"normkit imported from the checkout: {location}"
    assert Path(sys.prefix) in location.parents, f"normkit not imported from the environment: {location}"
    assert normkit.has_extension(), "normkit._C did not load"
    assert importlib.metadata.version("normkit") == normkit.__version__

    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    weights = (torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64),
               torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    for op in (switch_norm, switch_norm_reference):  # fresh running statistics: training updates them in place
        running = (torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
        outputs = (op(x, *weights, *running, training=True, momentum=0.1), *running)
        if op is switch_norm:
            expected = outputs
    torch.testing.assert_close(outputs, expected)

    shipped = sorted(p.relative_to(checkout / "configs").with_suffix("").as_posix()
                     for p in (checkout / "configs").glob("*/*.yaml"))
    assert normkit.list_configs() == shipped, "the installed configs differ from the checkout's"
    model = normkit.build_model("mini/r18d8_sn_c1_deepsup").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 7, 64, 64), logits.shape
    print(f"normkit {normkit.__version__} from {location.parent}: SN op matches its reference, "
          f"{len(shipped)} configs, mini/r18d8_sn_c1_deepsup built and run", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the virtual environment (its path is printed)")
    parser.add_argument("--installed", type=Path, metavar="CHECKOUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.installed:
        installed_checks(args.installed)
        return 0
    archive = build_sdist()
    check_contents(archive)
    venv = Path(tempfile.mkdtemp(prefix="normkit-sdist-venv-"))
    try:
        install(archive, venv)
        check_installed_from_outside(venv)
    finally:
        if args.keep:
            print(f"kept the environment {venv}")
        else:
            subprocess.run(["rm", "-rf", str(venv)], check=False)
    print("sdist check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
