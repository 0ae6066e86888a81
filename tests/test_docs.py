"""The READMEs and docs/ hold: every relative link resolves, every command in a code block names files, configs and
modules that exist, the README stays short, and the result figures are drawn again from the committed reports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a word of a command that names a file of the project: a path ending in a known suffix, or `-m package.module`
PROJECT_FILE = re.compile(r"^[\w./-]+\.(?:py|yml|yaml|sh)$")
# paths a user gives (their own data, configs they write, outputs, placeholders) rather than files of the project
USER_PATHS = ("/", "../", "data/", "logs/", "my_", "$", "[", "<", "RUN/", "train.sh")
COMMANDS = ("python", "bash", "srun", "torchrun", "unzip", "tensorboard")


def relative_links(path: Path) -> list[str]:
    return [
        link for link in LINK.findall(path.read_text()) if not link.startswith(("http://", "https://", "mailto:", "#"))
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    missing = [link for link in relative_links(doc) if not (doc.parent / link.split("#")[0]).exists()]
    assert not missing, f"{doc.relative_to(ROOT)}: links to nothing: {missing}"


def commands(doc: Path) -> list[str]:
    """The command lines of the doc's bash code blocks (or blocks without a language), continuation lines joined,
    comments dropped."""
    lines, language, block = [], None, []
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            if language is None:
                language, block = line[3:].strip(), []
                continue
            if language in ("", "bash", "sh"):
                for command in "\n".join(block).replace("\\\n", " ").splitlines():
                    command = command.split(" #")[0].strip()
                    if command.split(" ", 1)[0] in COMMANDS:
                        lines.append(command)
            language = None
            continue
        if language is not None:
            block.append(line)
    return lines


def named_files(command: str) -> list[str]:
    words = command.replace("=", " ").split()
    names = [w for w in words if PROJECT_FILE.match(w) and not w.startswith(USER_PATHS)]
    # `python -m module`: the module python runs (a later -m is that program's own option, e.g. pytest's marker)
    names += [
        words[i + 1].replace(".", "/") + ".py"
        for i, w in enumerate(words[:-1])
        if w == "-m" and i > 0 and words[i - 1].startswith("python")
    ]
    return [n for n in names if not n.startswith(("pytest", "pip"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_names_files_that_exist(doc):
    missing = {}
    for command in commands(doc):
        absent = [name for name in named_files(command) if not (ROOT / name).exists()]
        if absent:
            missing[command[:100]] = absent
    assert not missing, f"{doc.relative_to(ROOT)}: commands name files that do not exist: {missing}"


def test_the_checks_find_what_they_look_for(tmp_path):
    """The two checks above can fail: a made-up link and command are caught."""
    doc = tmp_path / "x.md"
    doc.write_text(
        "see [a](nowhere.md) and [b](https://example.org)\n```bash\npython -m benchmarks.nothing\n"
        "python diffuser_trainer.py --config configs/missing.yml data.root=/data/x\n```\n"
    )
    assert relative_links(doc) == ["nowhere.md"]
    assert [named_files(c) for c in commands(doc)] == [
        ["benchmarks/nothing.py"],
        ["diffuser_trainer.py", "configs/missing.yml"],
    ]


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 260, f"README.md has {lines} lines: measurements and their history go to benchmarks/ or docs/"


def test_the_figures_are_drawn_again_from_the_committed_results(tmp_path):
    from benchmarks import plots

    drawn = plots.regenerate(plots.RESULTS_DIR, tmp_path)
    assert (plots.RESULTS_DIR / "speed_cpu.json") in drawn
    for png in sorted(tmp_path.glob("*.png")):
        committed = plots.RESULTS_DIR / png.name
        assert committed.is_file(), f"{png.name} is drawn from the results but not committed"
        with Image.open(png) as new, Image.open(committed) as old:
            assert new.size == old.size, png.name
    assert {"accuracy.png", "speed_cpu.png"} <= {p.name for p in tmp_path.glob("*.png")}
