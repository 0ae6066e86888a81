"""Evaluation metrics of SPEC section 7: single-label (accuracy, balanced accuracy, macro precision /
recall / F1, macro one-vs-rest AUC, quadratic kappa), multi-label (mean and per-finding AUROC, F1 and
accuracy at 0.5) and the confusion matrix."""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn import metrics as skm

logger = logging.getLogger(__name__)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    _require(y.ndim == 1, f"{what} must be 1-D, got shape {y.shape}")
    _require(y.size > 0, f"{what} is empty (N must be > 0)")
    _require(np.issubdtype(y.dtype, np.number) and np.all(np.mod(y, 1) == 0), f"{what} must hold integer class indices")
    y = y.astype(np.int64)
    _require(
        y.min() >= 0 and y.max() < num_classes,
        f"{what} values must lie in 0..{num_classes - 1}, got range {y.min()}..{y.max()}",
    )
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
    skipped = [n for n, v in zip(names, per_class, strict=True) if np.isnan(v)]
    if skipped:
        logger.warning(
            "%s AUC undefined (no positive or no negative sample) for classes %s; averaging over the other %d",
            kind,
            skipped,
            len(names) - len(skipped),
        )
    if len(skipped) == len(names):
        return float("nan")
    return float(np.nanmean(per_class))


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, names: list[str] | None = None) -> dict[str, float]:
    """Single-label multi-class metrics from integer labels (N,) and raw scores (N, C).

    Returns acc, balanced_acc, macro precision/recall/f1, macro one-vs-rest auc on the
    raw scores, quadratic-weighted Cohen kappa and one `recall/<name>` per class (the
    fraction of its images predicted as it; NaN for a class absent from y_true). Names
    default to the class indices.
    """
    scores = np.asarray(scores, dtype=np.float64)
    _require(
        scores.ndim == 2 and scores.shape[1] >= 2, f"scores must have shape (N, C) with C >= 2, got {scores.shape}"
    )
    _require(np.all(np.isfinite(scores)), "scores contain NaN or inf")
    n, c = scores.shape
    names = [str(k) for k in range(c)] if names is None else [str(k) for k in names]
    _require(len(names) == c, f"got {len(names)} class names for {c} classes")
    y = _check_labels(y_true, c, "y_true")
    _require(y.shape[0] == n, f"y_true has {y.shape[0]} samples but scores has {n}")
    pred = scores.argmax(axis=1)
    labels = list(range(c))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
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
        **{f"recall/{name}": _class_recall(y, pred, k) for k, name in enumerate(names)},
    }


def _class_recall(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    positives = y == k
    return float(np.mean(pred[positives] == k)) if positives.any() else float("nan")


def multilabel_metrics(
    y_true: np.ndarray, scores: np.ndarray, names: list[str] | None = None, threshold: float = 0.5
) -> dict[str, float]:
    """Multi-label metrics from binary targets (N, C) and scores (N, C): probabilities, or the
    diffusion model's mean label grid, whose targets are 0 and 1 as well.

    Returns the mean AUROC over findings with both classes present (`auc`), one
    `auc/<name>` per finding (NaN if undefined), macro `f1` and element-wise `acc` at
    `threshold` (prediction = score >= threshold).
    """
    y = np.asarray(y_true)
    p = np.asarray(scores, dtype=np.float64)
    _require(
        y.ndim == 2 and y.shape == p.shape,
        f"y_true and scores must both have shape (N, C); got {y.shape} and {p.shape}",
    )
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
    out.update({f"auc/{n}": float(v) for n, v in zip(names, per, strict=True)})
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
