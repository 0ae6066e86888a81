"""What `pip install -e .` puts on a user's path: the library package `diffmic` and the design's folders, no
generic top-level names (`config`, `utils`, `model`, ...) that would shadow, or be shadowed by, a user's own."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = {"diffmic", "dataloader", "pretraining", "EfficientSAM"}
GENERIC = [
    "config",
    "utils",
    "model",
    "metrics",
    "figures",
    "methods",
    "pipeline",
    "evaluation",
    "benchmarks",
    "faults",
    "guided",
    "seeding",
    "uncertainty",
    "diffuser_trainer",
    "checkpoints",
    "explain",
]


def test_pyproject_installs_the_package_and_the_design_folders_only():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["py-modules"] == []
    assert {name.split(".")[0] for name in setup["packages"]} == INSTALLED
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("diffmic/**/__init__.py")}
    on_disk |= {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "benchmarks")}
    assert set(setup["packages"]) == on_disk, "list every package in pyproject.toml [tool.setuptools] packages"


def test_generic_names_do_not_import_outside_the_checkout(tmp_path):
    """From another folder, the installed names import and the generic ones do not."""
    code = (
        "import importlib.util, sys\n"
        f"assert all(importlib.util.find_spec(n) for n in {sorted(INSTALLED)!r})\n"
        f"found = [n for n in {GENERIC!r} if importlib.util.find_spec(n)]\n"
        "print(found); sys.exit(1 if found else 0)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
