"""The package's layers import only downwards, and no module imports another package's private module.

    tools -> engine / evaluation / data / convert -> models -> nn -> ops -> normkit._C      (io: everyone)
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "normkit"
# Each package's level; a module may import packages of its own level or below.
LEVELS = {"_C": 0, "_extension": 0, "io": 0, "ops": 1, "nn": 2, "models": 3, "engine": 4, "evaluation": 4,
          "data": 4, "convert": 4, "tools": 5, "collect_env": 5}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.stem != "__init__")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downwards_and_skip_private_modules_of_other_packages(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "normkit" or len(parts) < 2:
            continue
        target = parts[1]
        if target not in LEVELS:
            continue  # a name imported from the top-level package (normkit.__version__ ...)
        assert LEVELS[target] <= LEVELS[own], f"{path.relative_to(PACKAGE)} imports upwards: {name}"
        if target != own and len(parts) > 2:
            assert not parts[2].startswith("_"), f"{path.relative_to(PACKAGE)} imports a private module: {name}"


def test_the_engine_loads_no_model_code():
    code = "import normkit.engine, sys; print(sorted(m for m in sys.modules if m.startswith('normkit.models')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
