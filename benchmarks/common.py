"""What the benchmarks share: their command line (config, seeds, output folder, report name, resume, overrides), the
config loaded and checked before any work (exit 2 with one line), the report's provenance (command, machine,
config), its resumption after a stop, the report files written atomically, each seed's config, and the summary
tables' pieces (mean and spread over seeds, per-class recall)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from diffmic.config import PROJECT_ROOT, ConfigError, check_paths, load_config, parse_args_with_overrides
from diffmic.durable import write_atomically
from diffmic.utils import setup_logging

logger = logging.getLogger("benchmarks.common")

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
METRICS = ("acc", "f1", "auc", "kappa")


def benchmark_parser(
    description: str, config_help: str, name_help: str, config_required: bool = True
) -> argparse.ArgumentParser:
    """The arguments every benchmark of seeded runs takes: --config, --seeds, --out-dir, --name, --resume, overrides.
    A benchmark adds its own before parsing (one that can also work without a config checks --config itself)."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--config", required=config_required, help=config_help)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", help=f"result file name (default: {name_help})")
    parser.add_argument("--resume", action="store_true", help="keep the runs of <out-dir>/<name>.json (same config)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse then exits with code 2 naming the option)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's arguments (overrides may come anywhere), with the project's logging set up."""
    args = parse_args_with_overrides(parser, argv)
    setup_logging()
    return args


def checked_config(args: argparse.Namespace, check: Callable[[dict], None] | None = None) -> dict | None:
    """The benchmark's config with its overrides, checked before any work: the config's own checks, the data's
    paths (the DCG file need not exist: benchmarks train it) and the benchmark's `check`. None after logging the
    one-line reason when something is wrong (the caller returns exit code 2)."""
    try:
        base = load_config(args.config, args.overrides)
        check_paths(base, need_dcg=False)
        if check is not None:
            check(base)
    except ConfigError as err:
        logger.error("config error: %s", err)
        return None
    return base


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How to run this benchmark again, as the report records it."""
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def new_report(module: str, argv: Sequence[str] | None, name: str, base: dict, **fields) -> dict:
    """An empty report with its provenance: the command, the machine and the resolved config."""
    return {
        "dataset": name,
        **fields,
        "runs": [],
        "command": command_line(module, argv),
        "machine": machine(),
        "config": base,
    }


def resume_or_new(args: argparse.Namespace, name: str, report: dict, same: Sequence[str] = ()) -> dict | None:
    """With --resume, the report <out-dir>/<name>.json continued by `report`'s run (its runs kept; the `same` fields,
    such as epochs, must match); else `report`. None after logging why it cannot be resumed (exit 2)."""
    if not args.resume:
        return report
    path = Path(args.out_dir) / f"{name}.json"
    try:
        resumed = resumed_report(path, report)
        for field in same:
            if resumed.get(field) != report[field]:
                raise ConfigError(f"{path} was run with {field} {resumed.get(field)}, not {report[field]}")
    except ConfigError as err:
        logger.error("cannot resume: %s", err)
        return None
    return resumed


def write_report_files(out_dir: Path, name: str, report: dict, markdown: Sequence[str]) -> None:
    """<name>.json and <name>.md, each replaced whole (a reader or a kill never meets half a report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / f"{name}.json", json.dumps(report, indent=2))
    write_atomically(out_dir / f"{name}.md", "\n".join(markdown))


def seed_config(base: dict, seed: int) -> dict:
    """The config of one seed's runs: its own seed, run folder and DCG file (shared by dcg and diffmic)."""
    cfg = json.loads(json.dumps(base))
    cfg["seed"], cfg["name"] = seed, f"{base['name']}/seed_{seed}"
    cfg["dcg"]["ckpt"] = str(Path(cfg["trainer"]["log_dir"]) / cfg["name"] / "dcg.pt")
    return cfg


def merge(cfg: dict, changes: dict) -> dict:
    """A copy of `cfg` with the nested `changes` applied."""
    cfg = json.loads(json.dumps(cfg))
    for section, values in changes.items():
        cfg[section].update(values)
    return cfg


def seed_spread(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over the runs (seeds) of each test metric, and of each class's recall where
    every run has it (reports written before it existed have none; NaN recalls, a class absent, are left out)."""
    entry = {}
    for key in METRICS:
        values = np.array([r["test"][key] for r in rows])
        entry[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    for key in (k for k in rows[0]["test"] if k.startswith("recall/") and all(k in r["test"] for r in rows)):
        values = np.array([r["test"][key] for r in rows])
        entry[key] = {
            "mean": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
            "std": float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else 0.0,
        }
    return entry


def provenance_lines(report: dict, config_title: str = "Config (resolved):") -> list[str]:
    """The end of every benchmark report: the command, the commands that resumed it, the machine, the config."""
    return [
        "",
        f"Command: `{report['command']}`",
        "",
        *[
            f"Resumed with{'' if times == 1 else f' ({times} times)'}: `{command}`\n"
            for command, times in Counter(report.get("resumed_with", [])).items()  # in the order first used
        ],
        f"Machine: {report['machine']}",
        "",
        config_title,
        "",
        "```yaml",
        yaml.safe_dump(report["config"], sort_keys=False).rstrip(),
        "```",
        "",
    ]


def cell(entry: dict, key: str) -> str:
    """A summary entry's 'mean ± std' to three places, '–' where it is missing or not finite."""
    if key not in entry or not np.isfinite(entry[key]["mean"]):
        return "–"
    return f"{entry[key]['mean']:.3f} ± {entry[key]['std']:.3f}"


def per_class_recall_table(summary: dict) -> list[str]:
    """Markdown lines: test recall of each class (mean ± std over seeds), a row per method."""
    names = [k.removeprefix("recall/") for k in next(iter(summary.values()), {}) if k.startswith("recall/")]
    if not names:
        return []
    lines = ["", "Test recall per class (mean ± standard deviation over seeds):", ""]
    lines += ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method, e in summary.items():
        cells = [cell(e, f"recall/{n}") for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def resumed_report(path: Path, fresh: dict) -> dict:
    """The report at `path` to be continued by the run described by `fresh`: its runs are kept, so the config must be
    the same (a run of another config would be mixed into one table)."""
    if not path.is_file():
        raise ConfigError(f"no report {path} to resume: run without --resume first")
    report = json.loads(path.read_text())
    old, new = report["config"], json.loads(json.dumps(fresh["config"]))
    changed = config_changes(old, new)
    # keys the project gained after the report was written: its runs had no such setting, so they do not conflict
    added = [key for key in changed if not has_key(old, key)]
    if len(added) < len(changed):
        different = ", ".join(k for k in changed if k not in added)
        raise ConfigError(f"{path} was written with another config (differs in {different})")
    if added:
        logger.warning("resuming %s: keys added to the project since it was written, kept as given: %s", path, added)
        report.setdefault("keys_added_on_resume", {}).update({k: get_key(new, k) for k in added})
    logger.info("resuming %s: %d run(s) kept", path, len(report["runs"]))
    report["seeds"] = list(dict.fromkeys([*report["seeds"], *fresh["seeds"]]))
    if "methods" in fresh:  # the uncertainty benchmark's reports have no list of methods
        report["methods"] = list(dict.fromkeys([*report.get("methods", []), *fresh["methods"]]))
    report.setdefault("resumed_with", []).append(fresh["command"])
    return report


def has_key(tree: dict, dotted: str) -> bool:
    """Whether the nested config `tree` has the dotted key."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def get_key(tree: dict, dotted: str):
    """The value of a dotted key of a nested config."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def cpu_name() -> str:
    """The CPU's model name where Linux tells it (platform.processor() is empty there), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The machine a report was measured on, in one line."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_name()}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {device}"
    )
