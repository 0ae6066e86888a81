"""No module of the installed packages (diffmic, dataloader, pretraining, EfficientSAM) keeps mutable state at module
level (the project's rule): state that lives in a module is shared by every model, Trainer and test of a process,
and couples code that never names it (a weight cache that the sampler read from a global, a stack of step recorders,
a data root's file-name index). State lives on objects, and callbacks are passed down (e.g. the samplers' on_step).

The check reads the source: a module-level name bound to a mutable value (a list, dict or set, literal,
comprehension or constructor call) that is not an UPPER_CASE constant, a `global` statement, and a function that
mutates a module-level name (a mutating method, or an item assigned or deleted), constants included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffmic", "dataloader", "pretraining", "EfficientSAM")
MODULES = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))
MUTABLE_TYPES = {"list", "dict", "set", "defaultdict", "OrderedDict", "deque", "Counter", "bytearray"}
MUTATING_METHODS = {
    "append",
    "appendleft",
    "extend",
    "extendleft",
    "insert",
    "pop",
    "popitem",
    "remove",
    "clear",
    "update",
    "add",
    "discard",
    "setdefault",
    "sort",
    "reverse",
}


def _is_mutable(value: ast.expr) -> bool:
    if isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        return True
    if isinstance(value, ast.Call):
        func = value.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        return name in MUTABLE_TYPES
    return False


def _targets(node: ast.stmt) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def module_state(source: str, name: str) -> list[str]:
    """The module-level mutable state of a module's source, one line per finding ("<name>:<line>: what")."""
    tree = ast.parse(source)
    found, module_names = [], set()
    for node in tree.body:
        for target in _targets(node):
            module_names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            value = getattr(node, "value", None)
            mutable_binding = value is not None and _is_mutable(value) and isinstance(target, ast.Name)
            if mutable_binding and not target.id.isupper() and target.id != "__all__":
                found.append(f"{name}:{node.lineno}: {target.id} is a mutable module-level value")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"{name}:{node.lineno}: global {', '.join(node.names)}")
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for function in functions:
        local = {a.arg for a in ast.walk(function.args) if isinstance(a, ast.arg)}
        local |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(function):
            bases = []
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATING_METHODS
            ):
                bases.append(node.func.value)
            if isinstance(node, (ast.Assign, ast.Delete, ast.AugAssign)):
                targets = [node.target] if isinstance(node, ast.AugAssign) else node.targets
                bases += [t.value for t in targets if isinstance(t, ast.Subscript)]
            for base in bases:
                if isinstance(base, ast.Name) and base.id in module_names and base.id not in local:
                    found.append(f"{name}:{node.lineno}: a function changes the module-level {base.id}")
    return found


def test_the_check_finds_module_level_state():
    """What the package once held (recording.py's stack of recorders, model.py's weight cache) and the other forms."""
    recorders = "from typing import Callable\n_recorders: list[Callable] = []\ndef push(f):\n    _recorders.append(f)\n"
    cache = "_cache = None\ndef use():\n    global _cache\n    _cache = {}\n"
    registry = "REGISTRY = {}\ndef register(name, cls):\n    REGISTRY[name] = cls\n"
    comprehension = "_seen = {k: 0 for k in 'ab'}\nseen = set()\n"
    assert len(module_state(recorders, "recording")) == 2
    assert module_state(cache, "model") == ["model:3: global _cache"]
    assert module_state(registry, "methods") == ["methods:3: a function changes the module-level REGISTRY"]
    assert len(module_state(comprehension, "c")) == 2
    # constants, loggers, immutable values and a function's own names are not state
    clean = (
        "import logging\nlogger = logging.getLogger(__name__)\nNAMES = ('a', 'b')\nMETHODS = {'a': int}\n"
        "limit = 3\ndef f(x):\n    out = []\n    out.append(x)\n    d = {}\n    d['k'] = METHODS['a']\n    return out\n"
    )
    assert module_state(clean, "clean") == []


def test_the_check_reads_every_installed_package():
    assert {path.relative_to(ROOT).parts[0] for path in MODULES} == set(PACKAGES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_of_the_installed_packages_keeps_mutable_state(path):
    assert module_state(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []
