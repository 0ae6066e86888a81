"""Accuracy benchmark: DiffMIC-v2 against the models a user would pick instead, on real data.

For one data set (a benchmark config) and several seeds, trains with one data pipeline and the same
number of epochs:
  resnet18  a torchvision ResNet-18 classifier trained with cross-entropy (random init);
  dcg       the DCG guidance model alone, its fused output taken as the prediction (the prior);
  diffmic   DiffMIC-v2, guided by the DCG of the same seed (trained once, shared with `dcg`).
Opt-in: diffmic_v1 is DiffMIC (v1, model.method=diffmic_v1) with that same DCG file as its start and the config's v1
section; diffmic-no_* are ablations of DiffMIC-v2 (benchmarks/README.md).
Every method keeps the checkpoint with the best validation score (macro F1) and is evaluated once on
the test split. Writes benchmarks/results/<name>.json and .md (mean and standard deviation over
seeds, per-seed rows, wall time, images per second, command, config and machine).

    python -m benchmarks.accuracy --config configs/bench_breastmnist.yml [--seeds 0 1 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from benchmarks.common import (
    METRICS,
    benchmark_parser,
    cell,
    checked_config,
    merge,
    new_report,
    parse,
    per_class_recall_table,
    provenance_lines,
    resume_or_new,
    seed_config,
    seed_spread,
    write_report_files,
)
from dataloader.datamodule import DiffMICDataModule, build_datasets
from diffmic import api
from diffmic.config import ConfigError
from diffmic.evaluation.evaluator import EvaluatedSystem
from diffmic.methods import BASELINES
from diffmic.utils import build_trainer
from pretraining.dcg import build_dcg
from pretraining.dcg_file import load_dcg
from pretraining.train_dcg import DCGSystem, pretrain_dcg

logger = logging.getLogger("benchmarks.accuracy")
# DiffMIC-v2 with one part of SPEC.md switched off, trained like `diffmic` (same DCG, seed and epochs).
ABLATIONS = {
    "diffmic-no_guided_map": {"ablation": {"guided_map": False}},
    "diffmic-no_roi_branch": {"ablation": {"roi_branch": False}},
    "diffmic-no_focal_weight": {"diffusion": {"focal_alpha": 0.0}},
    # not a part of SPEC.md but this project's departure from the authors' init (README, the demo)
    "diffmic-default_condition_init": {"model": {"condition_init": "default"}},
}
# DiffMIC (v1): the same trainer, data, DCG file, seed and epochs, with the method switched.
VARIANTS = {"diffmic_v1": {"model": {"method": "diffmic_v1"}}, **ABLATIONS}
METHODS = ("resnet18", "dcg", "diffmic", "diffmic_v1", *ABLATIONS)
# MedMNIST v2 (Yang et al., Scientific Data 2023), Table: ResNet-18 (28), test ACC / AUC.
MEDMNIST_V2_RESNET18_28 = {"retinamnist": {"acc": 0.524, "auc": 0.717}, "breastmnist": {"acc": 0.863, "auc": 0.901}}


def _evaluate_best(system: EvaluatedSystem, trainer: pl.Trainer, best: str, data) -> dict:
    trainer.validate(system, datamodule=data, ckpt_path=best, verbose=False)
    val = dict(system.last_metrics)
    trainer.test(system, datamodule=data, ckpt_path=best, verbose=False)
    return {"val": val, "test": dict(system.last_metrics)}


def run_resnet18(cfg: dict, datasets: dict) -> dict:
    pl.seed_everything(cfg["seed"], workers=True)
    system, data = BASELINES["resnet18"](cfg), DiffMICDataModule(cfg, datasets=datasets)
    # validated every epoch, like the DCG pre-training (DiffMIC-v2's DDIM validation follows trainer.val_every)
    trainer, best = build_trainer(cfg, f"{cfg['name']}/resnet18", cfg["trainer"]["max_epochs"], val_every=1)
    start = time.perf_counter()
    trainer.fit(system, datamodule=data)
    seconds = time.perf_counter() - start
    history = list(system.val_history)
    return {
        **_evaluate_best(system, trainer, best.best_model_path, data),
        "train_s": seconds,
        "epochs": cfg["trainer"]["max_epochs"],
        "val_history": history,
        "checkpoint": best.best_model_path,
    }


def run_dcg(cfg: dict, datasets: dict) -> dict:
    start = time.perf_counter()
    path = pretrain_dcg(cfg, datasets)  # keeps the best validation epoch
    seconds = time.perf_counter() - start
    return {
        **evaluate_dcg(cfg, datasets, path),
        "train_s": seconds,
        "epochs": cfg["dcg"]["epochs"],
        "dcg_ckpt": str(path),
    }


def reuse_or_train_dcg(cfg: dict, datasets: dict) -> dict:
    """This seed's DCG: the file an earlier benchmark wrote, if it was trained from this split with these settings
    (checked as `fit` checks it), else pre-trained now. Its validation and test metrics either way."""
    path = Path(cfg["dcg"]["ckpt"])
    if path.is_file():
        try:
            load_dcg(build_dcg(cfg), cfg, path, datasets["train"])
        except ConfigError as err:
            logger.info("not reusing %s (%s): pre-training the DCG again", path, err)
            path.unlink()
        else:
            logger.info("reusing the DCG file %s", path)
            reused = {"train_s": float("nan"), "epochs": cfg["dcg"]["epochs"], "dcg_ckpt": str(path)}
            return {**evaluate_dcg(cfg, datasets, path), **reused}
    return run_dcg(cfg, datasets)


def evaluate_dcg(cfg: dict, datasets: dict, path: Path) -> dict:
    """The DCG file of `cfg` on val and test."""
    system = DCGSystem(cfg)
    load_dcg(system.dcg, cfg, path)
    trainer, _ = build_trainer(cfg, f"{cfg['name']}/dcg_eval", 1, 1)
    data = DiffMICDataModule(cfg, batch_size=cfg["dcg"]["batch_size"], datasets=datasets)
    trainer.validate(system, datamodule=data, verbose=False)
    val = dict(system.last_metrics)
    trainer.test(system, datamodule=data, verbose=False)
    return {"val": val, "test": dict(system.last_metrics)}


def run_diffmic(cfg: dict, dcg_seconds: float, ckpt: str | None = None) -> dict:
    """DiffMIC-v2's own `fit` (`ckpt`: a last.ckpt to resume). Its time includes the DCG pre-training it builds on:
    `dcg_seconds` when the DCG was trained by the `dcg` method of this seed, else `fit` pre-trains it inside the timed
    call."""
    out = Path(cfg["trainer"]["log_dir"]) / cfg["name"] / "diffmic_metrics.json"
    start = time.perf_counter()
    api.fit(cfg, ckpt=ckpt, out=out)
    seconds = time.perf_counter() - start
    metrics = json.loads(out.read_text())
    return {
        "val": metrics["val"],
        "test": metrics["test"],
        "train_s": seconds + dcg_seconds,
        "denoiser_s": seconds,
        "epochs": cfg["trainer"]["max_epochs"],
        "checkpoint": metrics["checkpoint"],
        "val_history": metrics["val_history"],
    }


def reevaluate(cfg: dict, checkpoint: str, label: str, changes: dict) -> dict:
    """The trained `diffmic` checkpoint evaluated on val and test with other sampling settings (no
    retraining): another number of DDIM steps, or several samples per image."""
    cfg = merge(cfg, changes)
    out = Path(cfg["trainer"]["log_dir"]) / cfg["name"] / label
    result = {}
    for evaluate, split in ((api.validate, "val"), (api.test, "test")):
        evaluate(cfg, ckpt=checkpoint, out=out / f"{split}.json")
        result[split] = json.loads((out / f"{split}.json").read_text())[split]
    return result


def reevaluations(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(method label, config changes) of the sampling ablations asked for on the command line."""
    return [(f"diffmic-ddim_{n}", {"diffusion": {"sampling_steps": n}}) for n in args.ddim_steps] + [
        (f"diffmic-samples_{n}", {"diffusion": {"eval_samples": n}}) for n in args.eval_samples
    ]


def ablation_config(cfg: dict, method: str) -> dict:
    """The config of DiffMIC v1 or an ablation of one seed: its own run folder, the seed's DCG file."""
    ablation = merge(cfg, VARIANTS[method])
    ablation["name"] = f"{cfg['name']}/{method}"
    return ablation


def record(report: dict, result: dict, out_dir: Path, name: str) -> None:
    """Add one run to the report, log it, and rewrite the report files (a stopped benchmark keeps its runs)."""
    report["runs"].append(result)
    logger.info(
        "%s seed %d test: %s (%.0f s)",
        result["method"],
        result["seed"],
        ", ".join(f"{k} {result['test'][k]:.4f}" for k in METRICS),
        result["train_s"],
    )
    report["summary"] = summarise(report["runs"])
    write_report(out_dir, name, report)


def summarise(runs: list[dict]) -> dict:
    table = {}
    for method in dict.fromkeys(r["method"] for r in runs):  # in the order they ran
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        entry = seed_spread(rows)
        for key in ("train_s", "images_per_s"):
            entry[key] = float(np.median([r[key] for r in rows]))
        entry["seeds"] = [r["seed"] for r in rows]
        table[method] = entry
    return table


def write_report(out_dir: Path, name: str, report: dict) -> None:
    lines = [
        f"# Accuracy benchmark: {name}",
        "",
        f"Test split, mean ± standard deviation over seeds {report['seeds']}; training time and images per second are "
        "medians over seeds (DiffMIC-v2's time includes pre-training its DCG).",
        "",
        "| method | test ACC | macro F1 | AUC | kappa | train time (s) | train images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, e in report["summary"].items():
        cells = [cell(e, k) for k in METRICS]
        time_cells = "| – | – |" if np.isnan(e["train_s"]) else f"| {e['train_s']:.0f} | {e['images_per_s']:.1f} |"
        lines.append(f"| {method} | {' | '.join(cells)} {time_cells}")
    ref = MEDMNIST_V2_RESNET18_28.get(report["dataset"])
    if ref:
        lines.append(f"| MedMNIST v2 ResNet-18 (28), published | {ref['acc']:.3f} | | {ref['auc']:.3f} | | | |")
    lines += per_class_recall_table(report["summary"])
    lines += [
        "",
        "Per seed:",
        "",
        "| method | seed | test ACC | macro F1 | AUC | kappa | val F1 | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['method']} | {r['seed']} | "
            + " | ".join(f"{r['test'][k]:.3f}" for k in METRICS)
            + f" | {r['val']['f1']:.3f} | "
            + ("–" if np.isnan(r["train_s"]) else f"{r['train_s']:.0f}")
            + " |"
        )
    lines += provenance_lines(report)
    write_report_files(out_dir, name, report, lines)
    logger.info("wrote %s and %s", out_dir / f"{name}.md", out_dir / f"{name}.json")


def recorded_dcg_seconds(run: dict | None) -> float | None:
    """The training time of a seed's DCG kept from an earlier report, if its file is still there to guide the
    DiffMIC runs (else None: `fit` pre-trains the DCG again and times it)."""
    if run is None or not Path(run.get("dcg_ckpt", "")).is_file():
        return None
    return run["train_s"]


def same_epochs(base: dict) -> None:
    if base["dcg"]["epochs"] != base["trainer"]["max_epochs"]:
        raise ConfigError(
            f"dcg.epochs ({base['dcg']['epochs']}) and trainer.max_epochs "
            f"({base['trainer']['max_epochs']}) must agree: every method trains the same epochs"
        )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, "benchmark config, e.g. configs/bench_breastmnist.yml", name_help="data.flag or the config's name"
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        choices=METHODS,
        default=["resnet18", "dcg", "diffmic"],
        help="diffmic_v1 is DiffMIC v1, diffmic-no_* are ablations of DiffMIC-v2 (default: the three compared methods)",
    )
    parser.add_argument(
        "--ddim-steps",
        type=int,
        nargs="*",
        default=[],
        help="also sample each diffmic checkpoint with these numbers of DDIM steps (ablation)",
    )
    parser.add_argument(
        "--eval-samples",
        type=int,
        nargs="*",
        default=[],
        help="also evaluate each diffmic checkpoint with the mean of this many DDIM samples per image",
    )
    args = parse(parser, argv)
    base = checked_config(args, same_epochs)
    if base is None:
        return 2
    try:
        base_datasets = build_datasets(base)
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    name = args.name or base["data"]["flag"] or base["name"]
    report = new_report("benchmarks.accuracy", argv, name, base, seeds=args.seeds, methods=args.methods)
    report = resume_or_new(args, name, report)
    if report is None:
        return 2
    done = {(r["method"], r["seed"]): r for r in report["runs"]}
    num_train = len(base_datasets["train"])
    for seed in args.seeds:
        cfg = seed_config(base, seed)
        # the split `fit` builds for this seed: a validation set carved from the training list depends on the seed,
        # and every method of the seed (the DCG that guides DiffMIC above all) must train on the same images
        datasets = build_datasets(cfg) if seed != base["seed"] else base_datasets
        dcg_seconds = recorded_dcg_seconds(done.get(("dcg", seed)))  # set once this seed's DCG is trained
        for method in args.methods:
            if (method, seed) in done:
                logger.info("=== %s, seed %d: %s, kept from the report ===", name, seed, method)
                continue
            logger.info("=== %s, seed %d: %s ===", name, seed, method)
            if method == "resnet18":
                result = run_resnet18(cfg, datasets)
            elif method == "dcg":
                result = run_dcg(cfg, datasets)
                dcg_seconds = result["train_s"]
            elif method == "diffmic":
                if dcg_seconds is None and Path(cfg["dcg"]["ckpt"]).exists():
                    # a DCG left by an earlier benchmark: train afresh, so that the timing includes it
                    logger.info("removing %s from an earlier benchmark run", cfg["dcg"]["ckpt"])
                    Path(cfg["dcg"]["ckpt"]).unlink()
                result = run_diffmic(cfg, dcg_seconds or 0.0)
            else:  # v1 or an ablation: this seed's DCG (pre-trained here if no earlier method made it)
                result = run_diffmic(ablation_config(cfg, method), dcg_seconds or 0.0)
            result.update(
                method=method,
                seed=seed,
                images_per_s=num_train * result["epochs"] / max(result.get("denoiser_s", result["train_s"]), 1e-9),
            )
            record(report, result, Path(args.out_dir), name)
        if reevaluations(args):
            # this seed's diffmic checkpoint, trained above or by an earlier benchmark run: evaluated only
            fitted = Path(cfg["trainer"]["log_dir"]) / cfg["name"] / "diffmic_metrics.json"
            if not fitted.is_file():
                logger.error("--ddim-steps / --eval-samples need %s: run the diffmic method first", fitted)
                return 2
            checkpoint = json.loads(fitted.read_text())["checkpoint"]
            for label, changes in reevaluations(args):
                if (label, seed) in done:
                    continue
                result = reevaluate(cfg, checkpoint, label, changes)
                result.update(
                    method=label,
                    seed=seed,
                    epochs=cfg["trainer"]["max_epochs"],
                    train_s=float("nan"),
                    images_per_s=float("nan"),
                )  # no training: the same checkpoint
                record(report, result, Path(args.out_dir), name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
