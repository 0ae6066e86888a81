"""Figures for people to look at, drawn with matplotlib's non-GUI backend (files and TensorBoard images, no
display): the confusion matrix, the reliability diagram and the risk-coverage curve. Every figure function returns a
matplotlib Figure; `to_image` turns one into an RGB array for TensorBoard and `save` writes a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files and arrays only
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402  (the backend is chosen first)
from matplotlib.figure import Figure  # noqa: E402

from diffmic.durable import atomic_open  # noqa: E402
from diffmic.evaluation.uncertainty import reliability_bins  # noqa: E402

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A figure of width x height inches at DPI dots per inch, not registered with pyplot (nothing to close, no
    global state shared between threads or processes)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: draw() and buffer_rgba() render with Agg
    return fig


def to_image(fig: Figure) -> np.ndarray:
    """The rendered figure as an RGB uint8 array (H, W, 3), what TensorBoard's add_image takes as HWC."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG (its folder created if needed), atomically."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, dpi=DPI, format="png")
    return path


def confusion_matrix_figure(cm: np.ndarray, class_names: list[str] | None = None, title: str = "") -> Figure:
    """The confusion matrix as a heat map of each row's fractions (rows: true class, columns: predicted), each cell
    labelled with its count, the axes with the class names (cut to 20 characters) and a colour bar."""
    cm = np.asarray(cm)
    if not (cm.ndim == 2 and cm.shape[0] == cm.shape[1] and cm.shape[0] >= 1):
        raise ValueError(f"cm must be square (C, C), got {cm.shape}")
    c = cm.shape[0]
    names = [str(k) for k in range(c)] if class_names is None else [str(n)[:20] for n in class_names]
    if len(names) != c:
        raise ValueError(f"got {len(names)} class names for {c} classes")
    rows = cm.sum(axis=1, keepdims=True).astype(np.float64)
    fraction = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = 2.2 + 0.55 * c
    fig = new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    shown = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(c):
        for j in range(c):
            colour = "white" if fraction[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(c), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(c), names, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix (colour: share of row)")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig


def confusion_matrix_image(cm: np.ndarray, class_names: list[str] | None = None, title: str = "") -> np.ndarray:
    """confusion_matrix_figure rendered as an RGB uint8 array (H, W, 3)."""
    return to_image(confusion_matrix_figure(cm, class_names, title))


def reliability_figure(labels: np.ndarray, probs: dict[str, np.ndarray], title: str = "reliability diagram") -> Figure:
    """Accuracy against confidence in the ECE's bins (uncertainty.reliability_bins), one line per probability set
    (e.g. before and after temperature scaling) with its ECE, the diagonal of perfect calibration and, below, how
    many images each bin holds. Multi-label (labels (N, C)): every (image, finding) pair, the share of positives
    against the finding's probability."""
    fig = new_figure(5.0, 5.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for label, p in probs.items():
        bins = reliability_bins(labels, p)
        filled = bins["count"] > 0
        top.plot(
            bins["confidence"][filled],
            bins["accuracy"][filled],
            marker="o",
            markersize=4,
            label=f"{label} (ECE {bins['ece']:.3f})",
        )
        bottom.bar(bins["left"], bins["count"], width=bins["width"], align="edge", alpha=0.45, label=label)
    multilabel = np.asarray(labels).ndim == 2
    top.set(
        ylabel="share positive" if multilabel else "accuracy in the bin", xlim=(0, 1.02), ylim=(0, 1.02), title=title
    )
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.set(xlabel="probability of the finding" if multilabel else "confidence (top probability)", ylabel="images")
    bottom.grid(alpha=0.3)
    return fig


def risk_coverage_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "risk-coverage") -> Figure:
    """Error rate of the kept images against the share kept, most confident first, one line per confidence score
    (name -> (coverage, risk), uncertainty.risk_coverage), the oracle ranking included when given."""
    fig = new_figure(5.2, 4.2)
    ax = fig.add_subplot()
    for name, (coverage, risk) in curves.items():
        style = {"color": "black", "linestyle": ":"} if name.startswith("oracle") else {}
        ax.plot(coverage, risk, label=name, **style)
    ax.set(xlabel="coverage (share of images kept)", ylabel="risk (error rate of the kept images)", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
