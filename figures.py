"""The confusion matrix as an RGB heat map for TensorBoard, drawn with OpenCV (no matplotlib)."""

from __future__ import annotations

import cv2
import numpy as np

_WHITE = np.array([255.0, 255.0, 255.0])
_BLUE = np.array([8.0, 48.0, 107.0])  # dark end of the white -> blue colour map (RGB)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text_patch(text: str, scale: float) -> np.ndarray:
    """Black text on a white RGB patch, tightly sized."""
    (w, h), base = cv2.getTextSize(text, _FONT, scale, 1)
    patch = np.full((h + base + 4, w + 4, 3), 255, np.uint8)
    cv2.putText(patch, text, (2, h + 2), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return patch


def _paste(img: np.ndarray, patch: np.ndarray, y: int, x: int) -> None:
    h = min(patch.shape[0], img.shape[0] - y)
    w = min(patch.shape[1], img.shape[1] - x)
    img[y : y + h, x : x + w] = patch[:h, :w]


def confusion_matrix_image(cm: np.ndarray, class_names: list[str] | None = None, cell: int = 48) -> np.ndarray:
    """Render `cm` as an RGB uint8 heat map (row-normalised, white -> blue) with counts.

    The C*cell x C*cell grid sits flush in the bottom-right corner of the image; the
    left margin holds the axis title "true" and row labels, the top margin "pred" and
    (vertical) column labels.
    """
    cm = np.asarray(cm)
    if not (cm.ndim == 2 and cm.shape[0] == cm.shape[1] and cm.shape[0] >= 1):
        raise ValueError(f"cm must be square (C, C), got {cm.shape}")
    c = cm.shape[0]
    names = [str(k) for k in range(c)] if class_names is None else [str(n)[:20] for n in class_names]
    if len(names) != c:
        raise ValueError(f"got {len(names)} class names for {c} classes")
    rows = cm.sum(axis=1, keepdims=True).astype(np.float64)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    scale = 0.45 * cell / 48.0
    row_patches = [_text_patch(n, scale) for n in names]
    col_patches = [np.rot90(_text_patch(n, scale)) for n in names]
    true_title = np.rot90(_text_patch("true", scale))
    pred_title = _text_patch("pred", scale)
    left = true_title.shape[1] + max(p.shape[1] for p in row_patches) + 4
    top = pred_title.shape[0] + max(p.shape[0] for p in col_patches) + 4
    g = c * cell
    img = np.full((top + g, left + g, 3), 255, np.uint8)
    _paste(img, pred_title, 0, left + max(0, (g - pred_title.shape[1]) // 2))
    _paste(img, true_title, top + max(0, (g - true_title.shape[0]) // 2), 0)
    for k in range(c):
        rp, cp = row_patches[k], col_patches[k]
        _paste(img, rp, top + k * cell + max(0, (cell - rp.shape[0]) // 2), left - rp.shape[1] - 2)
        _paste(img, cp, top - cp.shape[0] - 2, left + k * cell + max(0, (cell - cp.shape[1]) // 2))
    for i in range(c):
        for j in range(c):
            v = float(norm[i, j])
            colour = tuple(int(round(x)) for x in _WHITE + v * (_BLUE - _WHITE))
            y0, x0 = top + i * cell, left + j * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell - 1, y0 + cell - 1), colour, -1)
            cv2.rectangle(img, (x0, y0), (x0 + cell - 1, y0 + cell - 1), (200, 200, 200), 1)
            text = str(int(cm[i, j]))
            s = scale
            while s > 0.2 and cv2.getTextSize(text, _FONT, s, 1)[0][0] > cell - 6:
                s *= 0.85
            (tw, th), _ = cv2.getTextSize(text, _FONT, s, 1)
            fg = (255, 255, 255) if v > 0.5 else (0, 0, 0)
            cv2.putText(img, text, (x0 + (cell - tw) // 2, y0 + (cell + th) // 2), _FONT, s, fg, 1, cv2.LINE_AA)
    return img
