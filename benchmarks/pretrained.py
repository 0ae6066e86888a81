"""Pre-trained-encoder benchmark: does the diffusion add anything over a good encoder and its DCG?

No EfficientSAM weights exist here, so the image encoder is pre-trained on the benchmark's own training split
(pretraining/train_encoder.py: supervised, in-domain, small images; a stand-in, not SAM's pre-training). For each
seed, in this order (every row is written to the report as it ends; --resume skips the rows already there, and a
DiffMIC-v2 row cut off mid-way resumes from its run's last.ckpt, exactly as `fit --ckpt last` does):
  encoder             the pre-trained encoder's own classifier (linear head, cross-entropy, encoder_pretraining.epochs)
  dcg                 the DCG guidance model (dcg.epochs), shared by both DiffMIC-v2 rows
  diffmic_pretrained  DiffMIC-v2 with model.efficientsam_weights = that seed's encoder file, --epochs epochs
  resnet18            a ResNet-18 trained encoder_pretraining.epochs + --epochs epochs (as long as the encoder's
                      pre-training and the diffusion's training together)
  diffmic             DiffMIC-v2 from random initialisation, --epochs epochs; with --reuse REPORT, the rows of a
                      learning-curves report (benchmarks/learning_curves.py) of the same config and epochs instead
Each is tested once at its best validation epoch (macro F1). Test ACC, macro F1, AUC, kappa, per-class recall, and
from the saved outputs (benchmarks/uncertainty.py) the ECE after a temperature fitted on the validation split and the
E-AURC of each confidence score. Writes benchmarks/results/<name>.{json,md,png} (the validation curves of both
DiffMIC-v2 rows).

    python -m benchmarks.pretrained --config configs/bench_ham10000.yml --epochs 12 --seeds 0 1 2 \\
        --name ham10000_pretrained --reuse benchmarks/results/ham10000_long.json [--resume] [key=value ...]

`--rewrite --name NAME` writes <name>.md, .png and the summary in .json again from the runs <name>.json holds (after a
change to the report's format), training nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.accuracy import (
    reuse_or_train_dcg,
    run_diffmic,
    run_resnet18,
)
from benchmarks.common import (
    METRICS,
    benchmark_parser,
    cell,
    checked_config,
    config_changes,
    has_key,
    new_report,
    parse,
    per_class_recall_table,
    positive_int,
    provenance_lines,
    resume_or_new,
    seed_config,
    seed_spread,
    write_report_files,
)
from benchmarks.learning_curves import best_epoch, curves, long_config
from benchmarks.plots import pretrained_curves_figure
from benchmarks.uncertainty import measure, outputs_of, split_outputs
from dataloader.datamodule import build_datasets
from diffmic.config import ConfigError, read_run_config
from diffmic.evaluation.uncertainty import SAMPLE_SCORES
from pretraining.train_encoder import load_classifier, pretrain_encoder, sidecar_path, trained_from

logger = logging.getLogger("benchmarks.pretrained")
METHODS = ("encoder", "dcg", "diffmic_pretrained", "resnet18", "diffmic")
LABELS = {
    "encoder": "pre-trained encoder's classifier",
    "dcg": "DCG",
    "diffmic_pretrained": "DiffMIC-v2, pre-trained encoder",
    "resnet18": "ResNet-18, as many epochs",
    "diffmic": "DiffMIC-v2, random init",
}
SCORES = ("max_prob", *SAMPLE_SCORES)  # the confidence scores whose E-AURC is reported
# keys in which a reused report's config may differ: where the images are unzipped and where runs are written
REUSE_IGNORED = ("data.root", "trainer.log_dir")


def encoder_path(cfg: dict) -> Path:
    """One seed's encoder file, in the seed's run folder beside its DCG file."""
    return Path(cfg["trainer"]["log_dir"]) / cfg["name"] / "encoder.pt"


def with_encoder_file(cfg: dict) -> dict:
    """A copy of `cfg` whose encoder_pretraining.ckpt is the seed's encoder file."""
    cfg = json.loads(json.dumps(cfg))
    cfg["encoder_pretraining"]["ckpt"] = str(encoder_path(cfg))
    return cfg


def uncertainty_summary(outputs: dict[str, dict], names: list[str]) -> dict:
    """What the report keeps of benchmarks.uncertainty.measure: the temperature and the test metrics before and
    after it (not the curves)."""
    m = measure(outputs, names)
    return {"temperature": m["temperature"], "test": m["test"], "test_scaled": m["test_scaled"]}


def run_encoder(cfg: dict, datasets: dict, names: list[str]) -> dict:
    """Row 1: the seed's encoder file (reused when its JSON records this training split and these settings,
    pre-trained otherwise) and its classifier's metrics."""
    cfg = with_encoder_file(cfg)
    path = encoder_path(cfg)
    side = sidecar_path(path)
    start = time.perf_counter()
    report = json.loads(side.read_text()) if path.is_file() and side.is_file() else None
    if report is not None:
        want = trained_from(cfg, datasets, report["trained_from"].get("best_epoch"))
        if report["trained_from"] != want:
            logger.info("not reusing %s: trained from %s, this run %s", path, report["trained_from"], want)
            report = None
        else:
            logger.info("reusing the encoder file %s", path)
    seconds = float("nan")
    if report is None:
        report = pretrain_encoder(cfg, datasets)
        seconds = time.perf_counter() - start
    system = load_classifier(cfg, path).eval()
    return {
        "val": report["val"],
        "test": report["test"],
        "train_s": seconds,
        "epochs": cfg["encoder_pretraining"]["epochs"],
        "best_epoch": report["trained_from"]["best_epoch"],
        "val_history": report["val_history"],
        "encoder_file": str(path),
        "sha256": report["sha256"],
        "uncertainty": uncertainty_summary(split_outputs(system, cfg, datasets, "encoder"), names),
    }


def run_dcg_row(cfg: dict, datasets: dict, names: list[str]) -> dict:
    """Row 2: the seed's DCG (its file reused when it fits, as the other benchmarks do)."""
    result = reuse_or_train_dcg(cfg, datasets)
    result["uncertainty"] = uncertainty_summary(outputs_of("dcg", 0, cfg, datasets, {"dcg": result["dcg_ckpt"]}), names)
    return result


def unfinished_run(run_cfg: dict) -> Path | None:
    """The last.ckpt of an earlier attempt at this very run (the same resolved config.yaml beside it) that was cut off
    (a stopped session, a kill): resumed instead of trained again from its start. Resume is exact at the epoch
    boundary and the checkpoint carries the validation history, so the row is the one an uninterrupted run gives (its
    train_s counts the resumed part only)."""
    base = Path(run_cfg["trainer"]["log_dir"]) / run_cfg["name"]
    versions = sorted(base.glob("version_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]), reverse=True)
    for version in versions:
        last, config = version / "checkpoints" / "last.ckpt", version / "config.yaml"
        if not (last.is_file() and config.is_file()):
            continue
        try:
            stored = read_run_config(config)  # an older version's: its later keys filled in from default.yml
        except ConfigError as err:  # a feature this version lacks: not this run
            logger.warning("not resuming %s: %s", last, err)
            continue
        if stored == run_cfg:
            return last
    return None


def run_diffmic_row(cfg: dict, datasets: dict, names: list[str], method: str, epochs: int, resume: bool) -> dict:
    """Rows 4 and 5: DiffMIC-v2 trained `epochs` epochs, validated every epoch, guided by the seed's DCG; row 5 starts
    its image encoder from the seed's encoder file (model.efficientsam_weights). `resume` (--resume): an earlier
    attempt at this very run that was cut off continues from its last.ckpt."""
    run_cfg = long_config(cfg, method, epochs)
    if method == "diffmic_pretrained":
        path = encoder_path(cfg)
        if not path.is_file():
            raise ConfigError(f"{path}: the encoder method of this seed must run before diffmic_pretrained")
        run_cfg["model"]["efficientsam_weights"] = str(path)
    last = unfinished_run(run_cfg) if resume else None
    if last is not None:
        logger.info("%s: resuming the cut-off run from %s", run_cfg["name"], last)
    result = run_diffmic(run_cfg, 0.0, ckpt=None if last is None else str(last))
    if last is not None:
        result["resumed_from"] = str(last)
    result["best_epoch"] = best_epoch(result["val_history"])
    samples = run_cfg["diffusion"]["eval_samples"]
    outputs = outputs_of("diffmic", samples, run_cfg, datasets, {"diffmic": result["checkpoint"]})
    result["uncertainty"] = uncertainty_summary(outputs, names)
    return result


def run_resnet18_row(cfg: dict, datasets: dict, names: list[str], epochs: int) -> dict:
    """Row 3: a ResNet-18 trained as many epochs as the encoder's pre-training plus the diffusion's training."""
    run_cfg = long_config(cfg, "resnet18", cfg["encoder_pretraining"]["epochs"] + epochs)
    result = run_resnet18(run_cfg, datasets)
    result["best_epoch"] = best_epoch(result["val_history"])
    outputs = outputs_of("resnet18", 0, run_cfg, datasets, {"resnet18": result["checkpoint"]})
    result["uncertainty"] = uncertainty_summary(outputs, names)
    return result


def reusable_rows(path: Path, base: dict, epochs: int) -> list[dict]:
    """The random-init DiffMIC-v2 rows of a learning-curves report, if it was run with this config (up to where the
    images and runs live, and keys the project gained since) and these epochs; else none, with the reason logged."""
    old = json.loads(path.read_text())
    if old.get("epochs") != epochs:
        logger.warning("not reusing %s: its DiffMIC-v2 trained %s epochs, this run %d", path, old.get("epochs"), epochs)
        return []
    differ = [
        k
        for k in config_changes(old["config"], base)
        if k not in REUSE_IGNORED and has_key(old["config"], k) and not k.startswith("encoder_pretraining.")
    ]
    if differ:
        logger.warning("not reusing %s: its config differs in %s", path, ", ".join(differ))
        return []
    return [{**r, "reused_from": path.name} for r in old["runs"] if r["method"] == "diffmic"]


def summarise(report: dict) -> dict:
    """Per method: mean and standard deviation over seeds of the test metrics (seed_spread), of the ECE after
    temperature and of each score's E-AURC (runs without them, reused ones, left out); the validation curves."""
    summary = {}
    for method in (m for m in METHODS if any(r["method"] == m for r in report["runs"])):
        rows = [r for r in report["runs"] if r["method"] == method]
        entry = seed_spread(rows)
        entry["seeds"] = [r["seed"] for r in rows]
        # a reused row has only its test metrics at T = 1: the E-AURC of the samples' agreement and spread is the same
        # after T (neither the scores nor which images are right depend on T), the softmax's and the ECE are not
        measured = [
            r["uncertainty"]["test_scaled"]
            if "uncertainty" in r
            else {k: v for k, v in r["test"].items() if k in [f"selective/eaurc/{s}" for s in SAMPLE_SCORES]}
            for r in rows
        ]
        keys = {"ece_after_t": "calib/ece", **{f"eaurc/{s}": f"selective/eaurc/{s}" for s in SCORES}}
        for name, key in keys.items():
            values = np.array([m[key] for m in measured if key in m])
            if len(values):
                entry[name] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "seeds": len(values),
                }
        if method in ("dcg", "encoder"):  # fixed lines in the plot: their best validation epoch's values
            entry["curves"] = curves([{**r, "method": "dcg"} for r in rows], "dcg", report["epochs"])
        elif method != "resnet18":
            entry["curves"] = curves(rows, method, report["epochs"])
        summary[method] = entry
    return summary


def write_report(out_dir: Path, name: str, report: dict) -> None:
    """<name>.json, <name>.md and the validation-curve plot <name>.png."""
    report["summary"] = summarise(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    pretrained_curves_figure(report, out_dir / f"{name}.png")
    s, cfg, epochs = report["summary"], report["config"], report["epochs"]
    encoder_epochs = cfg["encoder_pretraining"]["epochs"]
    lines = [
        f"# Pre-trained encoder: {name}",
        "",
        f"The image encoder ({cfg['model']['image_encoder']}, {cfg['data']['image_size']} px) pre-trained "
        f"{encoder_epochs} epochs as a classifier on the training split of each seed (pretraining/train_encoder.py; "
        "in-domain, supervised, small images: a stand-in for EfficientSAM's weights, not SAM's pre-training on 11 "
        f"million images). DiffMIC-v2 trained {epochs} epochs from it and from random initialisation, guided by the "
        f"seed's DCG ({cfg['dcg']['epochs']} epochs); a ResNet-18 trained {encoder_epochs + epochs} epochs. Test "
        "split, mean ± standard deviation over the seeds a method has finished (the seeds column, of "
        f"{report['seeds']}), each method at its best validation epoch "
        "(macro F1). ECE after T: 15 bins, top label, after a temperature fitted on the validation split. E-AURC: "
        "the area under the risk-coverage curve above the oracle's (lower: the score ranks the model's own errors "
        "better); max prob is the softmax (DiffMIC-v2: the mean grid) after T, agreement and spread come from "
        f"DiffMIC-v2's {cfg['diffusion']['eval_samples']} DDIM samples per image.",
        "",
        f"![validation curves]({name}.png)",
        "",
        "| method | seeds | test ACC | macro F1 | AUC | kappa | ECE after T | E-AURC max prob | E-AURC agreement "
        "| E-AURC spread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, e in s.items():
        cells = [cell(e, k) for k in (*METRICS, "ece_after_t", *(f"eaurc/{sc}" for sc in SCORES))]
        seeds = ", ".join(str(seed) for seed in sorted(e["seeds"]))
        lines.append(f"| {LABELS[method]} | {seeds} | " + " | ".join(cells) + " |")
    lines += per_class_recall_table({LABELS[m]: e for m, e in s.items()})
    lines += [
        "",
        "Per seed (epochs: trained / best validation epoch; train s: training time on this machine, – where reused, "
        "the part after the resume where a cut-off run was resumed):",
        "",
        "| seed | method | test ACC | macro F1 | AUC | kappa | ECE after T | val F1 | epochs | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["runs"], key=lambda r: (r["seed"], METHODS.index(r["method"]))):
        ece = r.get("uncertainty", {}).get("test_scaled", {}).get("calib/ece")
        best = "–" if "best_epoch" not in r else str(r["best_epoch"] + 1)
        seconds = float("nan") if "reused_from" in r else r.get("train_s", float("nan"))  # timed elsewhere
        lines.append(
            f"| {r['seed']} | {r['method']} | "
            + " | ".join(f"{r['test'][k]:.3f}" for k in METRICS)
            + f" | {'–' if ece is None else f'{ece:.3f}'} | {r['val']['f1']:.3f} | {r['epochs']} / {best} | "
            + ("–" if not np.isfinite(seconds) else f"{seconds:.0f}")
            + (", resumed" if "resumed_from" in r else "")
            + " |"
        )
    reused = sorted({r["reused_from"] for r in report["runs"] if "reused_from" in r})
    if reused:
        lines += [
            "",
            f"The random-init DiffMIC-v2 rows are reused from {', '.join(reused)} (the same config and epochs; their "
            "DCGs were trained from the same split and settings on another machine, and their checkpoints are not "
            "here: their ECE after T and the softmax's E-AURC after T are not measured; the E-AURC of the samples' "
            "agreement and spread does not depend on T and is theirs).",
        ]
    lines += [
        "",
        "One seed's encoder, as the benchmark trains it: `python pretraining/train_encoder.py --config "
        f"configs/bench_ham10000.yml seed=<seed> encoder_pretraining.epochs={encoder_epochs}` (the benchmark writes "
        "it to <trainer.log_dir>/<name>/seed_<seed>/encoder.pt, with encoder.pt.json beside it).",
    ]
    lines += provenance_lines(report)
    write_report_files(out_dir, name, report, lines)
    logger.info("wrote %s, .json and .png", out_dir / f"{name}.md")


def rewrite(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--rewrite: <name>.md, .png and the summary in <name>.json written again in today's format from the runs the
    JSON holds and its own config; nothing is trained, and neither the data nor the config file is read."""
    if args.name is None or args.config or args.resume or args.reuse or args.overrides:
        parser.error("--rewrite takes --name and --out-dir only (no --config, --resume, --reuse or overrides)")
    path = Path(args.out_dir) / f"{args.name}.json"
    if not path.is_file():
        logger.error("--rewrite: no report %s to rewrite", path)
        return 2
    write_report(Path(args.out_dir), args.name, json.loads(path.read_text()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__,
        "benchmark config, e.g. configs/bench_ham10000.yml (not with --rewrite)",
        name_help="<config name>_pretrained",
        config_required=False,
    )
    parser.add_argument("--epochs", type=positive_int, default=12, help="epochs of both DiffMIC-v2 rows (default 12)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--reuse", help="a learning-curves report whose random-init DiffMIC-v2 rows to reuse")
    parser.add_argument(
        "--rewrite", action="store_true", help="with --name: write <name>.md, .png and .json again; train nothing"
    )
    args = parse(parser, argv)
    if args.rewrite:
        return rewrite(parser, args)
    if args.config is None:
        parser.error("the following arguments are required: --config")

    def check(base: dict) -> None:
        if args.reuse is not None and not Path(args.reuse).is_file():
            raise ConfigError(f"--reuse {args.reuse}: no such report")

    base = checked_config(args, check)
    if base is None:
        return 2
    name = args.name or f"{base['name']}_pretrained"
    fields = {"epochs": args.epochs, "seeds": args.seeds, "methods": args.methods}
    report = resume_or_new(args, name, new_report("benchmarks.pretrained", argv, name, base, **fields), ["epochs"])
    if report is None:
        return 2
    out_dir = Path(args.out_dir)
    done = {(r["method"], r["seed"]) for r in report["runs"]}
    if args.reuse is not None and "diffmic" in args.methods:
        for row in reusable_rows(Path(args.reuse), base, args.epochs):
            if row["seed"] in args.seeds and ("diffmic", row["seed"]) not in done:
                logger.info("seed %d: the random-init DiffMIC-v2 row is reused from %s", row["seed"], args.reuse)
                report["runs"].append(row)
                done.add(("diffmic", row["seed"]))
        write_report(out_dir, name, report)
    names = base["data"]["class_names"] or [str(c) for c in range(base["data"]["num_classes"])]
    for seed in args.seeds:
        cfg = seed_config(base, seed)
        datasets = None
        for method in (m for m in METHODS if m in args.methods):
            if (method, seed) in done:
                logger.info("=== %s, seed %d: %s, kept from the report ===", name, seed, method)
                continue
            logger.info("=== %s, seed %d: %s ===", name, seed, method)
            datasets = datasets if datasets is not None else build_datasets(cfg)  # this seed's validation carve
            start = time.perf_counter()
            try:
                if method == "encoder":
                    result = run_encoder(cfg, datasets, names)
                elif method == "dcg":
                    result = run_dcg_row(cfg, datasets, names)
                elif method == "resnet18":
                    result = run_resnet18_row(cfg, datasets, names, args.epochs)
                else:
                    result = run_diffmic_row(cfg, datasets, names, method, args.epochs, args.resume)
            except ConfigError as err:
                logger.error("config error: %s", err)
                return 2
            result.update(method=method, seed=seed, wall_s=time.perf_counter() - start)
            report["runs"].append(result)
            done.add((method, seed))
            logger.info("%s seed %d test: %s", method, seed, ", ".join(f"{k} {result['test'][k]:.4f}" for k in METRICS))
            write_report(out_dir, name, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
