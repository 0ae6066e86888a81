"""Figures of the benchmark results, drawn from their JSON reports (matplotlib, non-GUI: figures.py).

python -m benchmarks.plots            # every figure under benchmarks/results/ that has a report to draw from
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

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


# result file name pattern -> the function drawing <stem>.png from the report of <stem>.json
FIGURES = {"_long": learning_curves_figure}


def regenerate(results: Path = RESULTS) -> list[Path]:
    """Draw every figure whose report is in `results`; returns the files written."""
    written = []
    for report_path in sorted(results.glob("*.json")):
        for suffix, draw in FIGURES.items():
            if report_path.stem.endswith(suffix):
                draw(json.loads(report_path.read_text()), report_path.with_suffix(".png"))
                written.append(report_path.with_suffix(".png"))
    return written


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    regenerate(Path(argv[0]) if argv else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
