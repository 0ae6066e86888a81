"""Calibrated probabilities and per-image uncertainty, measured: calibration (ECE, Brier, NLL), temperature scaling
fitted on a validation split, and selective prediction (risk-coverage curves, AURC, accuracy at a coverage).

Notation:
    p               probs: per-image class probabilities (N, C), rows summing to 1; multi-label: one probability per
                    finding (N, C), each in [0, 1]
    T               temperature; p_T = softmax(log p / T) (for a softmax classifier: softmax(z / T)), multi-label
                    sigmoid(logit p / T); T = 1 leaves p as it is, T > 1 softens it
    confidence      a per-image score, higher = more certain: max_prob = max_c p_T, entropy = -H(p_T), and for the
                    diffusion models agreement (share of the S samples whose argmax is the prediction) and
                    sample_spread (-std over the S samples of the predicted class's score)
    risk(k)         error rate among the k most confident images; coverage k / N

Definitions (every metric is NaN, with a logged reason, where it is undefined):
    ECE             top-label expected calibration error with 15 equal-width confidence bins over [0, 1] (l1:
                    sum over bins of |accuracy - mean confidence| x share of images); torchmetrics computes it.
                    Multi-label: each finding's ECE of its probability (bins of p, |share positive - mean p|), and
                    their mean. A confidence of exactly 1 has a bin of its own (torchmetrics' binning).
    Brier           mean over images of sum_c (p_c - y_c)^2 (Brier's multi-class score, 0..2); multi-label: the mean
                    squared error of each finding's probability and their mean.
    NLL             mean of -log p_y (scikit-learn's log_loss, which clips p to machine epsilon); multi-label: the
                    mean binary log-loss over findings.
    AURC            mean of risk(k) over k = 1..N (Geifman et al. 2019), ties in confidence broken in expectation:
                    a tied group contributes its own error rate to every position it fills.
    E-AURC          AURC minus the AURC of an oracle that ranks every correct image first: what the ranking loses,
                    whatever the accuracy. Lower is better; 0 is a perfect ranking.
    acc@c           accuracy over the ceil(c N) most confident images (c = 0.9, 0.8, 0.7).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import log_loss
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

logger = logging.getLogger(__name__)
ECE_BINS = 15
COVERAGES = (0.9, 0.8, 0.7)
# the bracket of the fitted temperature: wide enough for any sane model (x20 sharper or softer)
TEMPERATURE_RANGE = (0.05, 20.0)
# confidence scores of the diffusion models' samples; undefined with a single sample
SAMPLE_SCORES = ("agreement", "sample_spread")


def simplex_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """The mean label grid (B, C) mapped to the simplex: negative entries set to 0, each row divided by its sum, and a
    row with nothing positive uniform. The grid estimates the one-hot label, so its mean over cells and samples
    estimates the class posterior; the map only repairs the small excursions below 0 and a sum away from 1."""
    positive = scores.clamp(min=0)
    total = positive.sum(dim=1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[1])
    return torch.where(total > 0, positive / total.clamp(min=torch.finfo(scores.dtype).tiny), uniform)


def sample_statistics(per_sample: torch.Tensor, predicted: torch.Tensor) -> dict[str, torch.Tensor]:
    """From the per-sample class scores (S, B, C) and the final prediction (B,): `agreement`, the share of samples
    whose argmax is the prediction, and `sample_spread`, the standard deviation over the samples of the predicted
    class's score (NaN for both when S = 1: one sample cannot disagree with itself). Single-label."""
    samples, batch = per_sample.shape[:2]
    chosen = per_sample[:, torch.arange(batch, device=per_sample.device), predicted]  # (S, B)
    if samples == 1:
        nan = torch.full((batch,), float("nan"), device=per_sample.device)
        return {"agreement": nan, "sample_spread": nan.clone()}
    agreement = (per_sample.argmax(dim=2) == predicted).float().mean(dim=0)
    return {"agreement": agreement, "sample_spread": chosen.std(dim=0)}


def multilabel_sample_statistics(per_sample: torch.Tensor, probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Multi-label: `agreement`, the share of (sample, finding) pairs on the same side of 0.5 as the final
    probability, and `sample_spread`, the standard deviation over samples averaged over findings (NaN when S = 1)."""
    samples, batch = per_sample.shape[:2]
    if samples == 1:
        nan = torch.full((batch,), float("nan"), device=per_sample.device)
        return {"agreement": nan, "sample_spread": nan.clone()}
    agreement = ((per_sample >= 0.5) == (probs >= 0.5)).float().mean(dim=(0, 2))
    return {"agreement": agreement, "sample_spread": per_sample.std(dim=0).mean(dim=1)}


# ---------------------------------------------------------------------------------------------- temperature


def apply_temperature(probs: np.ndarray, temperature: float, multilabel: bool = False) -> np.ndarray:
    """p_T: softmax(log p / T) per row (multi-label: sigmoid(logit p / T) per finding). A probability of 0 stays 0."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return p
    with np.errstate(divide="ignore"):
        if multilabel:
            logit = np.log(p) - np.log1p(-p)
            return 1.0 / (1.0 + np.exp(-logit / temperature))
        z = np.log(p) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(labels: np.ndarray, probs: np.ndarray, multilabel: bool = False) -> float:
    """The T in TEMPERATURE_RANGE that minimises the NLL of p_T on (labels, probs): the validation split, never the
    test split. A bounded one-dimensional search over log T (deterministic: every process finds the same T)."""

    def objective(log_t: float) -> float:
        return negative_log_likelihood(labels, apply_temperature(probs, math.exp(log_t), multilabel), multilabel)

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    result = minimize_scalar(objective, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    # no worse than leaving the probabilities as they are
    return float(math.exp(result.x)) if result.fun < objective(0.0) else 1.0


# ---------------------------------------------------------------------------------------------- calibration


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE with `bins` equal-width bins (module docstring)."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return float(multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=bins, norm="l1"))


def binary_expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of one finding's probabilities: bins of p over [0, 1], |share positive - mean p| weighted by the bin's
    share of images."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return float(binary_calibration_error(p, y, n_bins=bins, norm="l1"))


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray | float]:
    """The bins of the ECE, for the reliability diagram: per bin its left edge, width, count, mean confidence and
    accuracy (multi-label: mean probability and share positive, over every image and finding), and the ECE they
    give, which equals expected_calibration_error's (torchmetrics' binning: [b_k, b_k+1), and 1.0 alone)."""
    labels, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if labels.ndim == 2:
        confidence, hit = p.reshape(-1), labels.reshape(-1).astype(np.float64)
    else:
        confidence, hit = p.max(axis=1), (p.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges, confidence, side="right") - 1  # the last bin holds exactly 1.0
    count = np.bincount(which, minlength=bins + 1).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins + 1) / count
        accuracy = np.bincount(which, weights=hit, minlength=bins + 1) / count
    filled = count > 0
    ece = float(np.sum(np.abs(accuracy[filled] - mean_conf[filled]) * count[filled]) / len(confidence))
    width = np.r_[np.diff(edges), 0.01]
    return {"left": edges, "width": width, "count": count, "confidence": mean_conf, "accuracy": accuracy, "ece": ece}


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean over images of sum_c (p_c - y_c)^2; labels are class indices (N,)."""
    p = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(p.shape[1])[np.asarray(labels, dtype=np.int64)]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def negative_log_likelihood(labels: np.ndarray, probs: np.ndarray, multilabel: bool = False) -> float:
    """Mean -log p_y (multi-label: mean binary log-loss over findings), p clipped to machine epsilon."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if multilabel:
        return float(np.mean([log_loss(y[:, k], p[:, k], labels=[0, 1]) for k in range(p.shape[1])]))
    # log_loss renormalises rows; they already sum to 1 up to rounding
    return float(log_loss(y.astype(np.int64), p / p.sum(axis=1, keepdims=True), labels=list(range(p.shape[1]))))


def entropy(probs: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Predictive entropy in nats, per image: -sum_c p_c log p_c (multi-label: the mean binary entropy)."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if multilabel:
            terms = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(p < 1, (1 - p) * np.log1p(-p), 0.0))
            return terms.mean(axis=1)
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


# ---------------------------------------------------------------------------------------------- selective prediction


def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) at k = 1..N images kept, most confident first. Images of equal confidence are kept in an
    order that is not defined, so each tied group contributes its own error rate to every position it fills: the
    expected risk over every order of the ties."""
    correct = np.asarray(correct, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    n = len(correct)
    order = np.argsort(-confidence, kind="stable")
    conf, errors = confidence[order], 1.0 - correct[order]
    # expected errors at each position: within a tied group, the group's mean error
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])
    group_mean = np.add.reduceat(errors, starts) / np.diff(np.r_[starts, n])
    expected = np.repeat(group_mean, np.diff(np.r_[starts, n]))
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(expected) / k


def aurc(correct: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean of risk(k) over k = 1..N."""
    return float(risk_coverage(correct, confidence)[1].mean())


def optimal_aurc(correct: np.ndarray) -> float:
    """The AURC of the oracle ranking (every correct image first) at the same accuracy."""
    correct = np.asarray(correct, dtype=np.float64)
    return aurc(correct, correct)


def selective_accuracy(correct: np.ndarray, confidence: np.ndarray, coverage: float) -> float:
    """Accuracy over the ceil(coverage N) most confident images."""
    cover, risk = risk_coverage(correct, confidence)
    k = max(1, math.ceil(coverage * len(cover) - 1e-9))
    return float(1.0 - risk[k - 1])


# ---------------------------------------------------------------------------------------------- all of it


def confidences(probs: np.ndarray, sample_scores: dict[str, np.ndarray], multilabel: bool = False) -> dict:
    """Every confidence score of a split, higher = more certain: max_prob and entropy from the probabilities, and the
    diffusion models' sample scores (agreement as it is, sample_spread negated)."""
    out = {"max_prob": np.asarray(probs).max(axis=1), "entropy": -entropy(probs, multilabel)}
    if "agreement" in sample_scores:
        out["agreement"] = np.asarray(sample_scores["agreement"], dtype=np.float64)
    if "sample_spread" in sample_scores:
        out["sample_spread"] = -np.asarray(sample_scores["sample_spread"], dtype=np.float64)
    return out


def uncertainty_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    sample_scores: dict[str, np.ndarray] | None = None,
    temperature: float = 1.0,
    names: list[str] | None = None,
    note_undefined: bool = True,
) -> dict[str, float]:
    """Calibration and selective-prediction metrics of one split. `probs` are before temperature; `temperature` is
    applied to them first (and reported as calib/temperature). Multi-hot labels (N, C) give the multi-label metrics
    (per-finding ECE and Brier, their means, the NLL; no selective prediction). `note_undefined`: log which
    confidence scores are undefined (NaN; e.g. the sample scores with one sample per image); False where the caller
    has said it already (EvaluatedSystem: once a run)."""
    labels = np.asarray(labels)
    multilabel = labels.ndim == 2
    p = apply_temperature(probs, temperature, multilabel)
    out = {"calib/temperature": float(temperature)}
    if multilabel:
        names = [str(k) for k in range(p.shape[1])] if names is None else list(names)
        y = labels.astype(np.int64)
        ece = [binary_expected_calibration_error(y[:, k], p[:, k]) for k in range(p.shape[1])]
        brier = [float(((p[:, k] - y[:, k]) ** 2).mean()) for k in range(p.shape[1])]
        out.update({f"calib/ece/{n}": v for n, v in zip(names, ece, strict=True)})
        out.update({f"calib/brier/{n}": v for n, v in zip(names, brier, strict=True)})
        out.update({"calib/ece": float(np.mean(ece)), "calib/brier": float(np.mean(brier))})
        out["calib/nll"] = negative_log_likelihood(y, p, multilabel=True)
        return out
    y = labels.astype(np.int64)
    out["calib/ece"] = expected_calibration_error(y, p)
    out["calib/brier"] = brier_score(y, p)
    out["calib/nll"] = negative_log_likelihood(y, p)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    out["selective/aurc_optimal"] = optimal_aurc(correct)
    scores = confidences(p, sample_scores or {})
    undefined = [score for score, confidence in scores.items() if not np.isfinite(confidence).all()]
    if undefined and note_undefined:
        logger.info("selective prediction by %s is undefined (NaN): it needs diffusion.eval_samples > 1", undefined)
    for score, confidence in scores.items():
        if score in undefined:
            values = {"aurc": float("nan"), "eaurc": float("nan"), **{f"acc@{c:g}": float("nan") for c in COVERAGES}}
        else:
            area = aurc(correct, confidence)
            values = {"aurc": area, "eaurc": area - out["selective/aurc_optimal"]}
            values.update({f"acc@{c:g}": selective_accuracy(correct, confidence, c) for c in COVERAGES})
        out.update({f"selective/{key}/{score}": v for key, v in values.items()})
    return out
