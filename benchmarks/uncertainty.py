"""Uncertainty benchmark: is DiffMIC-v2's sampled uncertainty worth more than a classifier's softmax?

For one data set (a benchmark config) and several seeds: the ResNet-18, the DCG and DiffMIC-v2 of the accuracy
benchmark (trained here, or their checkpoints and DCG file reused when `benchmarks/accuracy.py` left them in the same
run folders), each evaluated on the validation and test splits; DiffMIC-v2 with S = 1 (the paper) and S = 16 DDIM
samples per image from the same checkpoint. From the saved outputs (uncertainty.py): ECE before and after a
temperature fitted on the validation split, Brier, NLL, and for every confidence score AURC, E-AURC (AURC above the
oracle's at the same accuracy) and accuracy at 80 % coverage; for DiffMIC-v2 also the validation calibration of two
candidate probabilities (the mean grid on the simplex, which the project uses, and the share of cell votes). Writes
benchmarks/results/<name>.{json,md} and the plots <name>_reliability.png and <name>_risk_coverage.png.

    python -m benchmarks.uncertainty --config configs/bench_breastmnist.yml --seeds 0 1 2 --name uncertainty_breastmnist
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from benchmarks.accuracy import (
    reuse_or_train_dcg,
    run_diffmic,
    run_resnet18,
    same_epochs,
)
from benchmarks.common import (
    benchmark_parser,
    cell,
    checked_config,
    new_report,
    parse,
    provenance_lines,
    resume_or_new,
    seed_config,
    write_report_files,
)
from benchmarks.plots import uncertainty_figures
from dataloader.datamodule import DiffMICDataModule, build_datasets
from diffmic.checkpoints import read_checkpoint
from diffmic.evaluation.figures import save
from diffmic.evaluation.uncertainty import (
    COVERAGES,
    SAMPLE_SCORES,
    apply_temperature,
    confidences,
    fit_temperature,
    optimal_aurc,
    reliability_bins,
    risk_coverage,
    uncertainty_metrics,
)
from diffmic.methods import BASELINES, build_system
from diffmic.utils import build_trainer
from pretraining.dcg_file import load_dcg
from pretraining.train_dcg import DCGSystem

logger = logging.getLogger("benchmarks.uncertainty")
# (label, method, samples): the methods compared, DiffMIC-v2 at the paper's one sample and at 16
VARIANTS = (
    ("resnet18", "resnet18", 0),
    ("dcg", "dcg", 0),
    ("diffmic_s1", "diffmic", 1),
    ("diffmic_s16", "diffmic", 16),
)
CURVE_POINTS = 101  # risk-coverage curves are stored at this many coverages, for the plots


def split_outputs(system, cfg: dict, datasets: dict, label: str) -> dict[str, dict]:
    """The gathered outputs (labels, probabilities, sample scores) of `system` on the validation and test splits."""
    trainer, _ = build_trainer(cfg, f"{cfg['name']}/uncertainty_eval/{label}", 1, 1, resumable=False)
    batch = cfg["dcg"]["batch_size"] if isinstance(system, DCGSystem) else None
    data = DiffMICDataModule(cfg, batch_size=batch, datasets=datasets)
    out = {}
    for split, run in (("val", trainer.validate), ("test", trainer.test)):
        run(system, datamodule=data, verbose=False)
        out[split] = {k: v for k, v in system.last_outputs.items() if k != "error"}
    return out


def outputs_of(method: str, samples: int, cfg: dict, datasets: dict, trained: dict) -> dict[str, dict]:
    """Evaluate one method's trained model (the checkpoint or DCG file in `trained[method]`)."""
    if method == "dcg":
        system = DCGSystem(cfg)
        load_dcg(system.dcg, cfg, Path(trained["dcg"]))
    elif method == "resnet18":
        system = BASELINES["resnet18"](cfg)
        system.load_state_dict(read_checkpoint(trained["resnet18"])["state_dict"])
    else:
        cfg = json.loads(json.dumps(cfg))
        cfg["diffusion"]["eval_samples"] = samples
        system = build_system(cfg)
        system.load_checkpoint_file(trained["diffmic"])
    return split_outputs(system.eval(), cfg, datasets, f"{method}_s{samples}")


def measure(outputs: dict[str, dict], names: list[str]) -> dict:
    """Temperature from the validation split; test metrics before and after it; risk-coverage curves of the test
    split (after it) at CURVE_POINTS coverages; for probability definitions other than `probs`, their validation
    calibration."""
    val, test = outputs["val"], outputs["test"]
    scores = {k: test[k] for k in SAMPLE_SCORES if k in test}
    temperature = fit_temperature(val["label"], val["probs"])
    result = {
        "temperature": temperature,
        "test": uncertainty_metrics(test["label"], test["probs"], scores, 1.0, names),
        "test_scaled": uncertainty_metrics(test["label"], test["probs"], scores, temperature, names),
        "val": uncertainty_metrics(val["label"], val["probs"], {k: val[k] for k in scores}, 1.0, names),
        "val_scaled": uncertainty_metrics(val["label"], val["probs"], {k: val[k] for k in scores}, temperature, names),
        "acc": float(np.mean(test["probs"].argmax(axis=1) == test["label"])),
    }
    if "votes" in val:  # the alternative probability of the diffusion models, on validation
        result["val_votes"] = uncertainty_metrics(val["label"], val["votes"], {}, 1.0, names)
        t_votes = fit_temperature(val["label"], val["votes"])
        result["val_votes_scaled"] = uncertainty_metrics(val["label"], val["votes"], {}, t_votes, names)
    probs = apply_temperature(test["probs"], temperature)
    correct = (probs.argmax(axis=1) == test["label"]).astype(np.float64)
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    curves = {"oracle": risk_coverage(correct, correct)}
    curves.update({k: risk_coverage(correct, c) for k, c in confidences(probs, scores).items() if np.isfinite(c).all()})
    result["curves"] = {k: np.interp(grid, cov, risk).tolist() for k, (cov, risk) in curves.items()}
    result["curves"]["coverage"] = grid.tolist()
    result["reliability"] = {
        part: {k: np.asarray(v).tolist() for k, v in reliability_bins(test["label"], p).items()}
        for part, p in (("raw", test["probs"]), ("scaled", probs))
    }
    assert result["test_scaled"]["selective/aurc_optimal"] == optimal_aurc(correct)
    return result


def summarise(runs: list[dict]) -> dict:
    """Per variant: mean and standard deviation over seeds of every reported number."""
    summary = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rows = [r for r in runs if r["label"] == label]
        numbers = {"acc": [r["acc"] for r in rows], "temperature": [r["temperature"] for r in rows]}
        for part in ("test", "test_scaled", "val", "val_scaled", "val_votes", "val_votes_scaled"):
            # over every run's keys: a resumed report may hold runs written before a number was added (NaN there,
            # so its mean reads as missing rather than as the mean of the newer runs alone)
            for key in dict.fromkeys(k for r in rows for k in r.get(part, {})):
                numbers[f"{part}:{key}"] = [r.get(part, {}).get(key, float("nan")) for r in rows]
        summary[label] = {
            k: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            }
            for k, v in numbers.items()
        }
        summary[label]["seeds"] = [r["seed"] for r in rows]
    return summary


def write_report(out_dir: Path, name: str, report: dict) -> None:
    report["summary"] = summarise(report["runs"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, fig in uncertainty_figures(report).items():
        save(fig, out_dir / f"{name}_{kind}.png")
    s, seeds = report["summary"], report["seeds"]
    lines = [
        f"# Uncertainty benchmark: {name}",
        "",
        f"Test split, mean ± standard deviation over seeds {seeds}. The temperature T is fitted on the validation "
        "split (lowest NLL) and applied to the test split; ECE: 15 equal-width bins, top label. Selective prediction "
        "ranks the test images by each confidence score; E-AURC is the AURC above the oracle's at the same accuracy "
        "(lower: the score ranks the model's own errors better). DiffMIC-v2's probabilities: the mean grid on the "
        "simplex; s1 / s16: 1 / 16 DDIM samples per image, the same checkpoint.",
        "",
        "| method | test ACC | ECE | ECE after T | T | Brier | NLL | NLL after T |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, e in s.items():
        lines.append(
            f"| {label} | {cell(e, 'acc')} | {cell(e, 'test:calib/ece')} | {cell(e, 'test_scaled:calib/ece')} | "
            f"{cell(e, 'temperature')} | {cell(e, 'test:calib/brier')} | {cell(e, 'test:calib/nll')} | "
            f"{cell(e, 'test_scaled:calib/nll')} |"
        )
    lines += [
        "",
        "Selective prediction on the test split (after T), per confidence score:",
        "",
        "| method | score | AURC | E-AURC | acc@80 % | acc@90 % | acc@70 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, e in s.items():
        for score in ("max_prob", "entropy", *SAMPLE_SCORES):
            key = f"test_scaled:selective/aurc/{score}"
            if key not in e or not np.isfinite(e[key]["mean"]):
                continue
            cells = [cell(e, f"test_scaled:selective/{m}/{score}") for m in ("aurc", "eaurc")]
            cells += [cell(e, f"test_scaled:selective/acc@{c:g}/{score}") for c in (0.8, *COVERAGES[:1], 0.7)]
            lines.append(f"| {label} | {score} | " + " | ".join(cells) + " |")
    votes = [(label, e) for label, e in s.items() if "val_votes:calib/ece" in e]
    if votes:
        lines += [
            "",
            "DiffMIC-v2's candidate probabilities, on the validation split (before / after their own T):",
            "",
            "| method | definition | ECE | ECE after T | Brier | NLL | NLL after T |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, e in votes:
            lines.append(
                f"| {label} | mean grid on the simplex | {cell(e, 'val:calib/ece')} | "
                f"{cell(e, 'val_scaled:calib/ece')} | {cell(e, 'val:calib/brier')} | {cell(e, 'val:calib/nll')} | "
                f"{cell(e, 'val_scaled:calib/nll')} |"
            )
            lines.append(
                f"| {label} | share of cell votes | {cell(e, 'val_votes:calib/ece')} | "
                f"{cell(e, 'val_votes_scaled:calib/ece')} | {cell(e, 'val_votes:calib/brier')} | "
                f"{cell(e, 'val_votes:calib/nll')} | {cell(e, 'val_votes_scaled:calib/nll')} |"
            )
    lines += [
        "",
        f"![reliability]({name}_reliability.png) ![risk-coverage]({name}_risk_coverage.png)",
        *provenance_lines(report),
    ]
    write_report_files(out_dir, name, report, lines)
    logger.info("wrote %s, .json and the plots", out_dir / f"{name}.md")


def trained_models(cfg: dict, datasets: dict) -> dict[str, str]:
    """This seed's DCG file, ResNet-18 checkpoint and DiffMIC-v2 checkpoint: reused when an earlier run of this or
    the accuracy benchmark left them in the seed's folders, trained otherwise."""
    seed_dir = Path(cfg["trainer"]["log_dir"]) / cfg["name"]
    reuse_or_train_dcg(cfg, datasets)
    models = {"dcg": cfg["dcg"]["ckpt"]}
    resnet = sorted(seed_dir.glob("resnet18/version_*/checkpoints/best.ckpt"))
    models["resnet18"] = str(resnet[-1]) if resnet else run_resnet18(cfg, datasets)["checkpoint"]
    fitted = seed_dir / "diffmic_metrics.json"
    models["diffmic"] = (
        json.loads(fitted.read_text())["checkpoint"] if fitted.is_file() else run_diffmic(cfg, 0.0)["checkpoint"]
    )
    return models


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__,
        "benchmark config, e.g. configs/bench_breastmnist.yml",
        name_help="uncertainty_<data.flag or config name>",
    )
    args = parse(parser, argv)
    base = checked_config(args, same_epochs)
    if base is None:
        return 2
    name = args.name or f"uncertainty_{base['data']['flag'] or base['name']}"
    report = resume_or_new(args, name, new_report("benchmarks.uncertainty", argv, name, base, seeds=args.seeds))
    if report is None:
        return 2
    out_dir = Path(args.out_dir)
    names = base["data"]["class_names"] or [str(c) for c in range(base["data"]["num_classes"])]
    for seed in args.seeds:
        if all(any(r["seed"] == seed and r["label"] == v[0] for r in report["runs"]) for v in VARIANTS):
            logger.info("=== %s, seed %d: kept from the report ===", name, seed)
            continue
        cfg = seed_config(base, seed)
        datasets = build_datasets(cfg)
        trained = trained_models(cfg, datasets)
        for label, method, samples in VARIANTS:
            if any(r["seed"] == seed and r["label"] == label for r in report["runs"]):
                continue
            logger.info("=== %s, seed %d: %s ===", name, seed, label)
            result = measure(outputs_of(method, samples, cfg, datasets, trained), names)
            report["runs"].append({"label": label, "method": method, "samples": samples, "seed": seed, **result})
            write_report(out_dir, name, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
