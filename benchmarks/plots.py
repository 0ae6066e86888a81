"""Figures of the benchmark results, drawn from their JSON reports (matplotlib, non-GUI: figures.py).

python -m benchmarks.plots            # every figure under benchmarks/results/ that has a report to draw from
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from benchmarks.common import RESULTS_DIR
from diffmic.evaluation.figures import new_figure, save

logger = logging.getLogger("benchmarks.plots")
LABELS = {
    "dcg": "DCG (fixed prior)",
    "diffmic": "DiffMIC-v2",
    "resnet18": "ResNet-18",
    "diffmic_v1": "DiffMIC (v1)",
    "encoder": "pre-trained encoder's classifier",
    "diffmic_pretrained": "DiffMIC-v2, pre-trained encoder",
}
COLOURS = {
    "dcg": "tab:grey",
    "diffmic": "tab:blue",
    "resnet18": "tab:orange",
    "diffmic_v1": "tab:green",
    "encoder": "tab:purple",
    "diffmic_pretrained": "tab:red",
}


def learning_curves_figure(report: dict, path: Path, fixed: tuple[str, ...] = ("dcg",)) -> None:
    """Validation accuracy and macro F1 per epoch (benchmarks/learning_curves.py): each seed as a thin line, the
    mean over seeds as a thick one; the `fixed` methods (the DCG, which does not train further) as dashed lines at
    their mean with their seed spread shaded."""
    epochs = report["epochs"]
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("acc", "f1"), ("validation accuracy", "validation macro F1"), strict=True):
        for method, entry in report["summary"].items():
            colour, label = COLOURS.get(method, None), LABELS.get(method, method)
            mean = entry["curves"][key]["mean"]
            if method in fixed:
                spread = entry["curves"][key]["std"][0]
                ax.axhline(mean[0], color=colour, linestyle="--", label=f"{label}, {len(entry['seeds'])} seeds")
                ax.axhspan(mean[0] - spread, mean[0] + spread, color=colour, alpha=0.15, linewidth=0)
                continue
            for run in (r for r in report["runs"] if r["method"] == method):
                x = [h["epoch"] + 1 for h in run["val_history"]]
                ax.plot(x, [h[key] for h in run["val_history"]], color=colour, alpha=0.35, linewidth=0.8)
            ax.plot(
                range(1, len(mean) + 1),
                mean,
                color=colour,
                linewidth=2.2,
                marker="o",
                markersize=3,
                label=f"{label}, mean of {len(entry['seeds'])} seeds",
            )
        ax.set(title=title, xlabel="epoch", ylabel="accuracy" if key == "acc" else "macro F1", xlim=(0.5, epochs + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{report['dataset']}: thin lines are single seeds", fontsize=10)
    save(fig, path)
    logger.info("wrote %s", path)


def pretrained_curves_figure(report: dict, path: Path) -> None:
    """benchmarks/pretrained.py's plot: the validation curves of DiffMIC-v2 from random init and from the pre-trained
    encoder, against the DCG and the pre-trained encoder's classifier (dashed: their best validation epoch)."""
    shown = ("dcg", "encoder", "diffmic", "diffmic_pretrained")
    summary = {m: report["summary"][m] for m in shown if "curves" in report["summary"].get(m, {})}
    learning_curves_figure({**report, "summary": summary}, path, fixed=("dcg", "encoder"))


UNCERTAINTY_LABELS = {
    "resnet18": "ResNet-18",
    "dcg": "DCG",
    "diffmic_s1": "DiffMIC-v2, 1 sample",
    "diffmic_s16": "DiffMIC-v2, 16 samples",
}


def uncertainty_figures(report: dict) -> dict:
    """benchmarks/uncertainty.py's plots: `reliability`, one panel per method with the test split's reliability
    before and after the temperature (the bins of every seed pooled); `risk_coverage`, one panel per method with the
    mean risk-coverage curve over seeds of each confidence score and of the oracle ranking."""
    labels = list(dict.fromkeys(r["label"] for r in report["runs"]))
    reliability = new_figure(3.3 * len(labels), 3.6)
    risk = new_figure(3.3 * len(labels), 3.6)
    rel_axes = np.atleast_1d(reliability.subplots(1, len(labels), sharey=True))
    risk_axes = np.atleast_1d(risk.subplots(1, len(labels), sharey=True))
    for label, rel_ax, risk_ax in zip(labels, rel_axes, risk_axes, strict=True):
        runs = [r for r in report["runs"] if r["label"] == label]
        title = f"{UNCERTAINTY_LABELS.get(label, label)} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        rel_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        for part, name in (("raw", "before T"), ("scaled", "after T")):
            count = np.sum([r["reliability"][part]["count"] for r in runs], axis=0)
            hits = np.nansum(
                [
                    np.nan_to_num(np.array(r["reliability"][part]["accuracy"], dtype=float))
                    * r["reliability"][part]["count"]
                    for r in runs
                ],
                axis=0,
            )
            conf = np.nansum(
                [
                    np.nan_to_num(np.array(r["reliability"][part]["confidence"], dtype=float))
                    * r["reliability"][part]["count"]
                    for r in runs
                ],
                axis=0,
            )
            filled = count > 0
            ece = np.mean([r["test" if part == "raw" else "test_scaled"]["calib/ece"] for r in runs])
            rel_ax.plot(
                conf[filled] / count[filled],
                hits[filled] / count[filled],
                marker="o",
                markersize=3,
                label=f"{name} (ECE {ece:.3f})",
            )
        rel_ax.set(title=title, xlabel="confidence", xlim=(0, 1.02), ylim=(0, 1.02))
        rel_ax.legend(fontsize=7, loc="upper left")
        rel_ax.grid(alpha=0.3)
        coverage = runs[0]["curves"]["coverage"]
        for score in (k for k in runs[0]["curves"] if k != "coverage"):
            mean = np.mean([r["curves"][score] for r in runs if score in r["curves"]], axis=0)
            style = {"color": "black", "linestyle": ":"} if score == "oracle" else {}
            risk_ax.plot(coverage, mean, label=score, **style)
        risk_ax.set(title=title, xlabel="coverage", xlim=(0, 1))
        risk_ax.set_ylim(bottom=0)
        risk_ax.legend(fontsize=7)
        risk_ax.grid(alpha=0.3)
    rel_axes[0].set_ylabel("accuracy in the bin")
    risk_axes[0].set_ylabel("risk (error rate of the kept images)")
    reliability.suptitle(f"{report['dataset']}: reliability on the test split", fontsize=10)
    risk.suptitle(f"{report['dataset']}: risk-coverage on the test split (after T), mean over seeds", fontsize=10)
    return {"reliability": reliability, "risk_coverage": risk}


def draw_uncertainty(report: dict, path: Path) -> None:
    for kind, fig in uncertainty_figures(report).items():
        save(fig, path.with_name(f"{path.stem}_{kind}.png"))


# the accuracy benchmark's reports shown in accuracy.png, by data set, newest first: a method is taken from the first
# report that has it (RetinaMNIST's v1 report reran the DCG and DiffMIC-v2 with the current code; its ResNet-18 comes
# from the earlier round, which the DCG's eval-mode fix did not concern)
ACCURACY_REPORTS = {
    "BreastMNIST": ("breastmnist", "breastmnist_v1"),
    "RetinaMNIST": ("retinamnist_v1", "retinamnist"),
    "HAM10000": ("ham10000",),
}
ACCURACY_METHODS = ("resnet18", "dcg", "diffmic", "diffmic_v1")


def accuracy_figure(results: Path = RESULTS_DIR) -> Figure | None:
    """Test accuracy and macro F1 of every method on every data set of the accuracy benchmark (mean and standard
    deviation over its seeds, as error bars), from the reports in `results`; None when none is there."""
    table: dict[str, dict[str, dict]] = {}
    for dataset, stems in ACCURACY_REPORTS.items():
        for stem in stems:
            path = results / f"{stem}.json"
            if path.is_file():
                summary = json.loads(path.read_text())["summary"]
                for method in ACCURACY_METHODS:  # the first report of a method wins
                    if method in summary:
                        table.setdefault(dataset, {}).setdefault(method, summary[method])
    if not table:
        return None
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    width = 0.8 / len(ACCURACY_METHODS)
    for ax, key, title in zip(axes, ("acc", "f1"), ("test accuracy", "test macro F1"), strict=True):
        for m, method in enumerate(ACCURACY_METHODS):
            x = [d for d, entry in enumerate(table.values()) if method in entry]
            entries = [entry[method] for entry in table.values() if method in entry]
            ax.bar(
                [d + (m - 1.5) * width for d in x],
                [e[key]["mean"] for e in entries],
                width,
                yerr=[e[key]["std"] for e in entries],
                capsize=3,
                color=COLOURS[method],
                label=LABELS[method].replace(" (fixed prior)", " alone"),
            )
        ax.set_xticks(range(len(table)), list(table))
        ax.set(title=title, ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean over 3 seeds (bars: standard deviation)")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.suptitle("Accuracy benchmark (benchmarks/accuracy.py, random init, 2 CPU cores)", fontsize=10)
    return fig


def speed_figure(report: dict) -> Figure:
    """Images per second of a training step and of a sampled batch (encoders once, and re-encoded at every DDIM
    step as the authors' code), float32 against bf16-mixed, for every measurement of a speed report
    (benchmarks/speed.py), on a log scale."""
    entries = list(report["configs"].items())
    kinds = (
        ("train_model", "training step"),
        ("sample_once", "sampling, encoders once"),
        ("sample_reencode", "sampling, re-encoding (authors)"),
    )
    fig = new_figure(max(6.0, 1.6 * len(entries) + 2), 4.6)
    ax = fig.add_subplot()
    width = 0.8 / (2 * len(kinds))
    for k, (kind, name) in enumerate(kinds):
        for q, precision in enumerate(("32-true", "bf16-mixed")):
            values = [e["model"].get(precision, {}).get(kind, {}).get("images_per_s", np.nan) for _, e in entries]
            offset = (2 * k + q - len(kinds) + 0.5) * width
            ax.bar(
                [i + offset for i in range(len(entries))],
                values,
                width,
                color=f"C{k}",
                alpha=1.0 if q == 0 else 0.55,
                hatch="" if q == 0 else "//",
                label=f"{name}, {'float32' if q == 0 else 'bf16-mixed'}",
            )
    ax.set_xticks(range(len(entries)), [_speed_label(label) for label, _ in entries], fontsize=7)
    ax.set_yscale("log")
    ax.set(ylabel="images per second (log)", title="Speed by setting: model-only steps, medians of the repeats")
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=7)
    return fig


def _speed_label(label: str) -> str:
    """'isic, batch 64, AMD EPYC, 2 threads' -> three short lines: config, batch, machine."""
    config, batch, *where = label.split(", ")
    machine = " ".join(where).replace("(R)", "").replace(" Processor", "")
    return f"{config}\n{batch}\n{machine}"


def draw_speed(report: dict, path: Path) -> None:
    save(speed_figure(report), path)


# result file name pattern -> the function drawing the figures of the report <stem>.json
FIGURES = {"_long": learning_curves_figure, "_pretrained": pretrained_curves_figure}
PREFIXES = {"uncertainty_": draw_uncertainty, "speed_": draw_speed}


def regenerate(results: Path = RESULTS_DIR, out: Path | None = None) -> list[Path]:
    """Draw every figure whose report is in `results` (into `out`, default beside the reports), and accuracy.png
    from the accuracy benchmark's reports; returns the reports drawn from."""
    out = results if out is None else out
    drawn = []
    accuracy = accuracy_figure(results)
    if accuracy is not None:
        save(accuracy, out / "accuracy.png")
        drawn += [results / f"{s}.json" for stems in ACCURACY_REPORTS.values() for s in stems]
    for report_path in sorted(results.glob("*.json")):
        draws = [d for suffix, d in FIGURES.items() if report_path.stem.endswith(suffix)]
        draws += [d for prefix, d in PREFIXES.items() if report_path.stem.startswith(prefix)]
        for draw in draws:
            draw(json.loads(report_path.read_text()), out / f"{report_path.stem}.png")
            drawn.append(report_path)
    return sorted(p for p in set(drawn) if p.is_file())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    regenerate(Path(argv[0]) if argv else RESULTS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
