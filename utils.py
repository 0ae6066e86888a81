"""Metrics (multi-class, multi-label, confusion-matrix images), labels and optimisers."""

from __future__ import annotations

import logging
import warnings

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn import metrics as skm

logger = logging.getLogger(__name__)

_WHITE = np.array([255.0, 255.0, 255.0])
_BLUE = np.array([8.0, 48.0, 107.0])  # dark end of the white -> blue colour map (RGB)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    _require(y.ndim == 1, f"{what} must be 1-D, got shape {y.shape}")
    _require(y.size > 0, f"{what} is empty (N must be > 0)")
    _require(np.issubdtype(y.dtype, np.number) and np.all(np.mod(y, 1) == 0),
             f"{what} must hold integer class indices")
    y = y.astype(np.int64)
    _require(y.min() >= 0 and y.max() < num_classes,
             f"{what} values must lie in 0..{num_classes - 1}, got range {y.min()}..{y.max()}")
    return y


def _auc_per_column(y_bin: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per column; NaN where a column lacks positives or negatives."""
    out = np.full(y_bin.shape[1], np.nan)
    for k in range(y_bin.shape[1]):
        pos = int(y_bin[:, k].sum())
        if 0 < pos < y_bin.shape[0]:
            out[k] = skm.roc_auc_score(y_bin[:, k], scores[:, k])
    return out


def _mean_defined(per_class: np.ndarray, names: list[str], kind: str) -> float:
    skipped = [n for n, v in zip(names, per_class) if np.isnan(v)]
    if skipped:
        logger.warning("%s AUC undefined (no positive or no negative sample) for classes %s; "
                       "averaging over the other %d", kind, skipped, len(names) - len(skipped))
    if len(skipped) == len(names):
        return float("nan")
    return float(np.nanmean(per_class))


def classification_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Single-label multi-class metrics from integer labels (N,) and raw scores (N, C).

    Returns acc, balanced_acc, macro precision/recall/f1, macro one-vs-rest auc on the
    raw scores and quadratic-weighted Cohen kappa.
    """
    scores = np.asarray(scores, dtype=np.float64)
    _require(scores.ndim == 2 and scores.shape[1] >= 2,
             f"scores must have shape (N, C) with C >= 2, got {scores.shape}")
    _require(np.all(np.isfinite(scores)), "scores contain NaN or inf")
    n, c = scores.shape
    y = _check_labels(y_true, c, "y_true")
    _require(y.shape[0] == n, f"y_true has {y.shape[0]} samples but scores has {n}")
    pred = scores.argmax(axis=1)
    labels = list(range(c))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(
        y, pred, labels=labels, average="macro", zero_division=0)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        kappa = skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic")
        # recall per present class == sklearn's balanced accuracy (absent classes excluded)
        bal = skm.balanced_accuracy_score(y, pred)
    kappa = float(kappa) if np.isfinite(kappa) else 0.0
    onehot = np.eye(c, dtype=np.int64)[y]
    auc = _mean_defined(_auc_per_column(onehot, scores), [str(k) for k in labels], "classification")
    return {
        "acc": float(np.mean(pred == y)),
        "balanced_acc": float(bal),
        "precision": float(prec),
        "recall": float(rec),
        "f1": float(f1),
        "auc": auc,
        "kappa": kappa,
    }


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray, names: list[str] | None = None,
                       threshold: float = 0.5) -> dict[str, float]:
    """Multi-label metrics from binary targets (N, C) and scores (N, C): probabilities, or the
    diffusion model's mean label grid, whose targets are 0 and 1 as well.

    Returns the mean AUROC over findings with both classes present (`auc`), one
    `auc/<name>` per finding (NaN if undefined), macro `f1` and element-wise `acc` at
    `threshold` (prediction = score >= threshold).
    """
    y = np.asarray(y_true)
    p = np.asarray(scores, dtype=np.float64)
    _require(y.ndim == 2 and y.shape == p.shape,
             f"y_true and scores must both have shape (N, C); got {y.shape} and {p.shape}")
    _require(y.shape[0] > 0, "empty input (N must be > 0)")
    _require(bool(np.all((y == 0) | (y == 1))), "y_true must contain only 0 and 1")
    _require(bool(np.all(np.isfinite(p))), "scores contain NaN or inf")
    c = y.shape[1]
    names = [str(k) for k in range(c)] if names is None else list(names)
    _require(len(names) == c, f"got {len(names)} names for {c} findings")
    y = y.astype(np.int64)
    per = _auc_per_column(y, p)
    pred = (p >= threshold).astype(np.int64)
    out = {"auc": _mean_defined(per, names, "multilabel")}
    out.update({f"auc/{n}": float(v) for n, v in zip(names, per)})
    out["f1"] = float(skm.f1_score(y, pred, average="macro", zero_division=0))
    out["acc"] = float(np.mean(pred == y))
    return out


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows = true class, columns = predicted class."""
    _require(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
    t = _check_labels(y_true, num_classes, "y_true")
    p = _check_labels(y_pred, num_classes, "y_pred")
    _require(t.shape == p.shape, f"y_true {t.shape} and y_pred {p.shape} differ in length")
    return skm.confusion_matrix(t, p, labels=list(range(num_classes))).astype(np.int64)


def _text_patch(text: str, scale: float) -> np.ndarray:
    """Black text on a white RGB patch, tightly sized."""
    (w, h), base = cv2.getTextSize(text, _FONT, scale, 1)
    patch = np.full((h + base + 4, w + 4, 3), 255, np.uint8)
    cv2.putText(patch, text, (2, h + 2), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return patch


def _paste(img: np.ndarray, patch: np.ndarray, y: int, x: int) -> None:
    h = min(patch.shape[0], img.shape[0] - y)
    w = min(patch.shape[1], img.shape[1] - x)
    img[y:y + h, x:x + w] = patch[:h, :w]


def confusion_matrix_image(cm: np.ndarray, class_names: list[str] | None = None,
                           cell: int = 48) -> np.ndarray:
    """Render `cm` as an RGB uint8 heat map (row-normalised, white -> blue) with counts.

    The C*cell x C*cell grid sits flush in the bottom-right corner of the image; the
    left margin holds the axis title "true" and row labels, the top margin "pred" and
    (vertical) column labels.
    """
    cm = np.asarray(cm)
    _require(cm.ndim == 2 and cm.shape[0] == cm.shape[1] and cm.shape[0] >= 1,
             f"cm must be square (C, C), got {cm.shape}")
    c = cm.shape[0]
    names = [str(k) for k in range(c)] if class_names is None else [str(n)[:20] for n in class_names]
    _require(len(names) == c, f"got {len(names)} class names for {c} classes")
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
            cv2.putText(img, text, (x0 + (cell - tw) // 2, y0 + (cell + th) // 2), _FONT, s, fg, 1,
                        cv2.LINE_AA)
    return img


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels (B,) -> float one-hot vectors y0 (B, C); multi-hot rows (B, C) pass through."""
    if labels.dim() == 2:
        assert labels.shape[1] == num_classes, f"multi-hot labels of width {labels.shape[1]}, expected {num_classes}"
        return labels.float()
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0) -> torch.optim.Adam:
    """torch's Adam; its fused kernel where every parameter lives on the CPU or a CUDA device (the same
    update, about 7x faster per step than the default loop on the CPU: a tenth of a ResNet-18 step)."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, min_lr_ratio: float
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing per epoch from the optimiser's lr down to min_lr_ratio * lr over `epochs`
    (min_lr_ratio 1.0: a constant lr)."""
    lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=lr * min_lr_ratio)


def build_optimizer(params, optim: dict, max_epochs: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with the config's lr / betas / eps / weight decay, and cosine annealing per epoch
    from lr down to min_lr_ratio * lr over max_epochs (SPEC section 7)."""
    optimizer = adam(params, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"],
                     weight_decay=optim["weight_decay"])
    return optimizer, cosine_schedule(optimizer, max_epochs, optim["min_lr_ratio"])


def selection_metric(cfg: dict) -> str:
    """The validation metric that picks the best checkpoint: macro F1, or mean AUROC for multi-label."""
    return "val/auc" if cfg["data"]["task"] == "multilabel" else "val/f1"


class BestCheckpoint(ModelCheckpoint):
    """`best.ckpt`: the highest value of the monitored validation metric; on a tie the later epoch
    replaces the earlier. Macro F1 on a small validation split ties often (78 images: a handful of
    values), and a tie says nothing about which model is better, while the later one has trained
    longer at an annealed learning rate. (Lightning's own rule keeps the first.)"""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        assert self.save_top_k == 1 and self.mode == "max", "BestCheckpoint keeps one checkpoint, highest first"

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None or not self.best_k_models:
            return super().check_monitor_top_k(trainer, current)
        better_or_tie = bool(current >= self.best_k_models[self.kth_best_model_path])
        return trainer.strategy.reduce_boolean_decision(better_or_tie)


def build_trainer(cfg: dict, run_name: str, max_epochs: int, val_every: int, version: int | None = None
                  ) -> tuple[pl.Trainer, ModelCheckpoint]:
    """A Trainer logging to <log_dir>/<run_name>/version_N with TensorBoard, a progress bar, the
    learning rate, `best.ckpt` (highest `selection_metric`, the later epoch on a tie) and `last.ckpt`
    (every epoch, for resuming)."""
    t = cfg["trainer"]
    best = BestCheckpoint(monitor=selection_metric(cfg), mode="max", filename="best", save_top_k=1,
                           auto_insert_metric_name=False)
    last = ModelCheckpoint(filename="last", save_top_k=1, save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        max_epochs=max_epochs, check_val_every_n_epoch=val_every, accelerator=t["accelerator"],
        devices=t["devices"], precision=t["precision"], log_every_n_steps=t["log_every_n_steps"],
        logger=TensorBoardLogger(t["log_dir"], name=run_name, version=version, default_hp_metric=False),
        callbacks=[best, last, LearningRateMonitor(logging_interval="epoch")],
        limit_train_batches=t["limit_train_batches"], limit_val_batches=t["limit_val_batches"],
        num_sanity_val_steps=0, enable_model_summary=False)
    return trainer, best


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped log lines on stderr for the command-line entry points."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
