"""The figure of one explained image (explain.py), for a PNG (predict --explain) or TensorBoard (val/explain/<i>).

One row per explained class (the predicted one, and the true one when known and different; multi-label: every
present or predicted finding): the image with that class's saliency and the numbered ROI boxes, the final K x K grid
and the prior map P of that class as heat maps, and its score after each sampling step. Beside the rows: every
class's score. The overlay is drawn with PIL, at least OVERLAY_SIDE pixels wide, the rest with matplotlib (Agg)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from diffmic.evaluation.figures import new_figure
from diffmic.explain.explanation import Explanation

OVERLAY_SIDE = 256  # the overlay is scaled up by a whole factor to at least this many pixels
SALIENCY_ALPHA = 0.45  # the saliency's share of an overlay pixel
BOX_COLOUR = (255, 255, 255)  # ROI boxes and their numbers; the jet colour map holds no white
PREDICTED, OTHER, TRUE = "tab:orange", "tab:gray", "tab:green"


def display_scale(height: int, width: int) -> int:
    """The whole factor an overlay is scaled up by."""
    return max(1, -(-OVERLAY_SIDE // max(height, width)))


def overlay(image: np.ndarray, saliency: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The image (H, W, 3) uint8 under its saliency (H, W) (min-max scaled, jet colours) with the ROI boxes (K, 4)
    (top, left, bottom, right; bottom / right exclusive) numbered 1..K in the DCG's order, scaled up by
    display_scale: (sH, sW, 3) uint8. A box edge is `line` pixels wide, inside the box."""
    height, width = image.shape[:2]
    scale = display_scale(height, width)
    size = (width * scale, height * scale)
    span = float(saliency.max() - saliency.min())
    norm = (saliency - saliency.min()) / span if span > 0 else np.zeros_like(saliency)
    heat = (colormaps["jet"](norm)[..., :3] * 255).astype(np.uint8)
    base = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)
    shown = Image.blend(base, Image.fromarray(heat).resize(size, Image.Resampling.BILINEAR), SALIENCY_ALPHA)
    draw = ImageDraw.Draw(shown)
    line = box_line_width(scale)
    font = ImageFont.load_default(size=max(12, 4 * scale))
    for k, (top, left, bottom, right) in enumerate(np.asarray(boxes).tolist()):
        # clipped to the image: a window may reach past its edge (the DCG fills those pixels)
        x0, y0 = max(left, 0) * scale, max(top, 0) * scale
        x1, y1 = min(right, width) * scale - 1, min(bottom, height) * scale - 1
        draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOUR, width=line)
        draw.text((x0 + line + 3, y0 + line), str(k + 1), fill=BOX_COLOUR, font=font, stroke_width=2, stroke_fill=0)
    return np.asarray(shown)


def box_line_width(scale: int) -> int:
    """Pixels of a box edge on an overlay scaled by `scale`."""
    return max(3, scale)


def _heat_map(fig: Figure, ax, values: np.ndarray, title: str, gid: str, limit: float | None = None) -> None:
    """A K x K heat map with its values written in the cells (K <= 6) and a colour bar."""
    if limit is None:  # symmetric about 0, so that the sign reads from the colour
        limit = float(np.abs(values).max()) or 1.0
    shown = ax.imshow(values, cmap="coolwarm", vmin=-limit, vmax=limit)
    shown.set_gid(gid)
    k = values.shape[0]
    if k <= 6:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)


def explanation_figure(expl: Explanation, b: int, class_names: list[str], image_id: str) -> Figure:
    """The figure of image b of an explanation; `class_names` (C,), `image_id` for the title."""
    shown = expl.classes_to_show(b)
    has_grid = expl.grid is not None
    columns = 5 if has_grid else 4
    widths = [1.3, 1.15, 1.15, 1.4, 1.3] if has_grid else [1.3, 1.4, 1.4, 1.3]
    width, height = 2.7 * sum(widths) / 1.3, 0.75 + 2.9 * len(shown)
    fig = new_figure(width, height)
    fig.set_layout_engine("none")  # fixed margins: constrained layout would cost two thirds of the drawing time
    spec = fig.add_gridspec(
        len(shown),
        columns,
        width_ratios=widths,
        left=0.2 / width,
        right=1 - 0.15 / width,
        top=1 - 0.85 / height,
        bottom=0.5 / height,
        wspace=0.55,
        hspace=0.9 / 2.0,
    )
    scores = expl.scores[b].numpy()
    predicted = int(scores.argmax())
    attention = ", ".join(f"{k + 1}: {a:.2f}" for k, a in enumerate(expl.attention[b].tolist()))
    for row, (c, role) in enumerate(shown):
        name = class_names[c]
        ax = fig.add_subplot(spec[row, 0])
        ax.imshow(
            overlay(expl.image[b].numpy(), expl.saliency(b, c).numpy(), expl.boxes[b].numpy()), interpolation="nearest"
        )
        ax.images[0].set_gid(f"overlay:{c}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{role}: {name} ({scores[c]:.2f})\nsaliency of {name}, ROIs 1-{len(expl.boxes[b])}", fontsize=9)
        ax.set_xlabel(f"ROI attention {attention}", fontsize=8)
        if has_grid:
            _heat_map(
                fig,
                fig.add_subplot(spec[row, 1]),
                expl.grid[b, c].numpy(),
                f"final grid of {name}\n(its mean: the score)",
                f"grid:{c}",
                limit=1.0,
            )
            _heat_map(
                fig,
                fig.add_subplot(spec[row, 2]),
                expl.prior[b, c].numpy(),
                f"prior map P of {name}\ndiagonal y_global, corners y_local",
                f"prior:{c}",
            )
        elif row == 0:
            note = fig.add_subplot(spec[:, 1])
            note.axis("off")
            note.text(
                0.5,
                0.5,
                f"{expl.title} denoises the\nlabel vector itself:\nno K x K grid and no\nprior map P to show",
                ha="center",
                va="center",
                fontsize=10,
                transform=note.transAxes,
            )
        ax = fig.add_subplot(spec[row, 3 if has_grid else 2])
        marker = "o" if len(expl.timesteps) <= 50 else None  # a few steps as points, a long chain as a line
        ax.plot(expl.timesteps, expl.trajectory[b, :, c].numpy(), marker=marker, ms=3, label=expl.step_score)
        if expl.estimate is not None:
            ax.plot(expl.timesteps, expl.estimate[b, :, c].numpy(), ls="--", marker="x", ms=3, label="x0 estimate")
        ax.invert_xaxis()  # sampling runs from large t to 0
        ax.set_xlabel("sampling step t", fontsize=8)
        ax.set_ylabel(f"score of {name}" if has_grid else f"{expl.step_score} of {name}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        ax.set_title(f"{name} over the {len(expl.timesteps)} {expl.sampler} steps", fontsize=9)
    ax = fig.add_subplot(spec[:, -1])
    _scores_panel(ax, expl, b, class_names, predicted)
    truth = _truth_text(expl, b, class_names)
    fig.suptitle(f"{image_id} ({expl.title}): predicted {class_names[predicted]}{truth}", fontsize=10)
    return fig


def _truth_text(expl: Explanation, b: int, class_names: list[str]) -> str:
    if expl.label is None:
        return ""
    if expl.multilabel:
        present = [class_names[c] for c in _present(expl.label[b])]
        return f", present: {', '.join(present) or 'none'}"
    return f", true {class_names[int(expl.label[b])]}"


def _present(row) -> list[int]:
    """The findings set in a multi-hot row."""
    return [i for i, v in enumerate(row.tolist()) if v >= 0.5]


def _scores_panel(ax, expl: Explanation, b: int, class_names: list[str], predicted: int) -> None:
    """Every class's score as a bar (the predicted class, or multi-label every predicted finding, in orange), the
    true class (present findings) in a green label, and the DCG's own prior probability as a dot."""
    scores = expl.scores[b].numpy()
    fusion = (expl.y_global[b] + expl.y_local[b]) / 2
    prior = (fusion.sigmoid() if expl.multilabel else fusion.softmax(dim=0)).numpy()
    c = len(scores)
    chosen = scores >= 0.5 if expl.multilabel else np.arange(c) == predicted
    ax.barh(range(c), scores, color=[PREDICTED if k else OTHER for k in chosen])
    ax.plot(prior, range(c), "k.", label="DCG prior")
    true = set()
    if expl.label is not None:
        true = set(_present(expl.label[b])) if expl.multilabel else {int(expl.label[b])}
    ax.set_yticks(range(c), [str(n)[:20] for n in class_names], fontsize=7)
    for k, tick in enumerate(ax.get_yticklabels()):
        if k in true:
            tick.set_color(TRUE)
            tick.set_fontweight("bold")
    if expl.multilabel:
        ax.axvline(0.5, color="k", lw=0.8, ls=":")
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("class scores" + (" (true in green)" if true else ""), fontsize=9)
