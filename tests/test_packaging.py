"""The editable install maps exactly the repository's modules: a new top-level module or package that
pyproject.toml does not list would import in the tests' checkout yet fail for an installed user."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_top_level_module_and_package():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {p.stem for p in ROOT.glob("*.py")}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"}
    assert set(setup["py-modules"]) == modules, "list the top-level modules in pyproject.toml [tool.setuptools]"
    assert set(setup["packages"]) == packages, "list the packages in pyproject.toml [tool.setuptools]"
