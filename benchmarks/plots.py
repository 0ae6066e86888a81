"""Figures of the benchmark results, drawn from their JSON reports (matplotlib, non-GUI: figures.py).

python -m benchmarks.plots            # every figure under benchmarks/results/ that has a report to draw from
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from config import PROJECT_ROOT
from figures import new_figure, save

logger = logging.getLogger("benchmarks.plots")
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
LABELS = {"dcg": "DCG (fixed prior)", "diffmic": "DiffMIC-v2", "resnet18": "ResNet-18", "diffmic_v1": "DiffMIC (v1)"}
COLOURS = {"dcg": "tab:grey", "diffmic": "tab:blue", "resnet18": "tab:orange", "diffmic_v1": "tab:green"}


def learning_curves_figure(report: dict, path: Path) -> None:
    """Validation accuracy and macro F1 per epoch (benchmarks/learning_curves.py): each seed as a thin line, the
    mean over seeds as a thick one; the fixed DCG as a dashed line at its mean with its seed spread shaded."""
    epochs = report["epochs"]
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("acc", "f1"), ("validation accuracy", "validation macro F1"), strict=True):
        for method, entry in report["summary"].items():
            colour, label = COLOURS.get(method, None), LABELS.get(method, method)
            mean = entry["curves"][key]["mean"]
            if method == "dcg":
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


# result file name pattern -> the function drawing the figures of the report <stem>.json
FIGURES = {"_long": learning_curves_figure}
PREFIXES = {"uncertainty_": draw_uncertainty}


def regenerate(results: Path = RESULTS) -> list[Path]:
    """Draw every figure whose report is in `results`; returns the reports drawn."""
    drawn = []
    for report_path in sorted(results.glob("*.json")):
        draws = [d for suffix, d in FIGURES.items() if report_path.stem.endswith(suffix)]
        draws += [d for prefix, d in PREFIXES.items() if report_path.stem.startswith(prefix)]
        for draw in draws:
            draw(json.loads(report_path.read_text()), report_path.with_suffix(".png"))
            drawn.append(report_path)
    return drawn


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    regenerate(Path(argv[0]) if argv else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
