"""Calibration and selective-prediction metrics (uncertainty.py) against values computed by hand on small arrays,
temperature scaling, the probabilities and per-sample statistics the models return, and the figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffmic.evaluation.uncertainty as u
from diffmic.evaluation.figures import reliability_figure, risk_coverage_figure, to_image

# ------------------------------------------------------------------------------------------------ calibration


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.3 of 3 classes... (right)
    probs = np.array([[0.9, 0.1, 0.0], [0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]])
    labels = np.array([0, 1, 1, 2])
    # bins of width 1/15: 0.9 in [0.867, 0.933), 0.6 in [0.6, 0.667), 0.4 in [0.4, 0.467)
    # |acc - conf|: 0.9 bin: |0.5 - 0.9| x 2/4; 0.6 bin: |1 - 0.6| x 1/4; 0.4 bin: |1 - 0.4| x 1/4
    expected = 0.4 * 0.5 + 0.4 * 0.25 + 0.6 * 0.25
    assert u.expected_calibration_error(labels, probs) == pytest.approx(expected, abs=1e-6)
    assert u.reliability_bins(labels, probs)["ece"] == pytest.approx(expected, abs=1e-12)


def test_ece_of_a_perfectly_calibrated_set_is_zero():
    # 10 images at confidence 0.8, 8 of them right; 5 at 0.6, 3 right
    probs = np.array([[0.8, 0.2]] * 10 + [[0.6, 0.4]] * 5)
    labels = np.array([0] * 8 + [1] * 2 + [0] * 3 + [1] * 2)
    assert u.expected_calibration_error(labels, probs) == pytest.approx(0.0, abs=1e-6)
    # the bins the diagram draws: two filled, each on the diagonal
    bins = u.reliability_bins(labels, probs)
    filled = bins["count"] > 0
    np.testing.assert_allclose(bins["confidence"][filled], bins["accuracy"][filled])
    assert bins["count"].sum() == 15


def test_binary_ece_per_finding():
    # finding probabilities 0.25 x 4 with one positive (calibrated) and 0.75 x 4 with one positive (off by 0.5)
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0])
    assert u.binary_expected_calibration_error(y, p) == pytest.approx(0.5 * 0.5, abs=1e-6)


def test_brier_and_nll_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = np.array([0, 1])
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.5**2 + 0.5**2 + 0.0)) / 2
    assert u.brier_score(labels, probs) == pytest.approx(brier)
    assert u.negative_log_likelihood(labels, probs) == pytest.approx(-(math.log(0.7) + math.log(0.5)) / 2)
    # a certain, right answer: 0 for both
    assert u.brier_score(np.array([2]), np.array([[0.0, 0.0, 1.0]])) == 0.0
    assert u.negative_log_likelihood(np.array([2]), np.array([[0.0, 0.0, 1.0]])) == pytest.approx(0.0, abs=1e-12)
    # multi-label: the mean binary log-loss over findings
    y = np.array([[1, 0], [0, 0]])
    p = np.array([[0.8, 0.1], [0.4, 0.3]])
    expected = (-(math.log(0.8) + math.log(0.6)) / 2 - (math.log(0.9) + math.log(0.7)) / 2) / 2
    assert u.negative_log_likelihood(y, p, multilabel=True) == pytest.approx(expected)


def test_entropy():
    h = u.entropy(np.array([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]]))
    np.testing.assert_allclose(h, [math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    assert u.entropy(np.array([[0.5, 1.0]]), multilabel=True)[0] == pytest.approx(math.log(2) / 2)


# ------------------------------------------------------------------------------------------------ selective prediction


def test_aurc_by_hand():
    correct = np.array([1, 0, 1, 1])
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    # risks at k = 1..4: 0, 1/2, 1/3, 1/4
    assert u.aurc(correct, confidence) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # the oracle puts the error last: risks 0, 0, 0, 1/4
    assert u.optimal_aurc(correct) == pytest.approx(1 / 16)
    assert u.selective_accuracy(correct, confidence, 0.5) == pytest.approx(0.5)  # the 2 most confident
    assert u.selective_accuracy(correct, confidence, 0.7) == pytest.approx(2 / 3)  # ceil(2.8) = 3 images


def test_a_perfect_ranking_has_zero_excess_aurc():
    correct = np.array([0, 1, 1, 0, 1])
    confidence = np.array([0.1, 0.9, 0.8, 0.2, 0.7])  # every right answer more confident than every wrong one
    assert u.aurc(correct, confidence) == pytest.approx(u.optimal_aurc(correct))
    assert u.selective_accuracy(correct, confidence, 0.6) == 1.0
    # and a reversed one is the worst: its first images are all wrong
    assert u.aurc(correct, -confidence) > u.aurc(correct, np.zeros(5)) > u.aurc(correct, confidence)


def test_ties_are_broken_in_expectation():
    # one confidence for all: every position has the overall error rate, whatever the order of the images
    correct = np.array([1, 0, 1, 1])
    coverage, risk = u.risk_coverage(correct, np.ones(4))
    np.testing.assert_allclose(risk, [0.25] * 4)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    # the mean over every order of a tied pair: (0.9 right), then {wrong, right} tied at 0.5
    both = [u.aurc(np.array(c), np.array([0.9, 0.5, 0.4])) for c in ([1, 0, 1], [1, 1, 0])]
    assert u.aurc(np.array([1, 0, 1]), np.array([0.9, 0.5, 0.5])) == pytest.approx(np.mean(both))


# ------------------------------------------------------------------------------------------------ temperature


def test_temperature_one_is_the_identity_and_keeps_the_argmax():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_array_equal(u.apply_temperature(p, 1.0), p)
    for t in (0.5, 2.0):
        q = u.apply_temperature(p, t)
        np.testing.assert_allclose(q.sum(axis=1), 1.0)
        np.testing.assert_array_equal(q.argmax(axis=1), p.argmax(axis=1))
    # for a softmax classifier it is softmax(z / T)
    z = torch.tensor([[2.0, 0.5, -1.0]])
    np.testing.assert_allclose(
        u.apply_temperature(torch.softmax(z, 1).numpy(), 3.0), torch.softmax(z / 3.0, 1).numpy(), rtol=1e-6
    )


def test_temperature_fit_lowers_validation_nll_of_an_overconfident_set():
    rng = np.random.default_rng(0)
    n, c = 400, 4
    labels = rng.integers(0, c, n)
    # logits with the true class ahead by 1, then made 4x sharper: overconfident
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 1.0
    probs = torch.softmax(torch.tensor(4.0 * logits), dim=1).numpy()
    t = u.fit_temperature(labels, probs)
    assert 2.0 < t < 8.0  # near the 4 it was sharpened by
    before = u.negative_log_likelihood(labels, probs)
    after = u.negative_log_likelihood(labels, u.apply_temperature(probs, t))
    assert after < before
    assert u.expected_calibration_error(labels, u.apply_temperature(probs, t)) < u.expected_calibration_error(
        labels, probs
    )
    # multi-label: one T over every finding
    y = (rng.random((n, 3)) < 0.3).astype(int)
    logit = np.where(y == 1, 1.0, -1.0) + rng.normal(size=(n, 3))
    p = 1 / (1 + np.exp(-4 * logit))
    tm = u.fit_temperature(y, p, multilabel=True)
    assert tm > 1.5
    assert u.negative_log_likelihood(y, u.apply_temperature(p, tm, True), True) < u.negative_log_likelihood(y, p, True)


def test_the_temperature_scales_the_test_metrics_and_nothing_else_of_validation_reaches_them():
    # uncertainty_metrics takes T and the test split only; that the command line fits T on the validation split
    # and never on test: tests/test_checkpoints.py::test_the_temperature_is_fitted_on_validation_only
    rng = np.random.default_rng(1)
    val_y, test_y = rng.integers(0, 3, 100), rng.integers(0, 3, 50)
    val_p, test_p = rng.dirichlet([0.3] * 3, 100), rng.dirichlet([0.3] * 3, 50)
    t = u.fit_temperature(val_y, val_p)
    scaled = u.uncertainty_metrics(test_y, test_p, temperature=t)
    assert scaled["calib/temperature"] == t != 1.0
    assert scaled == u.uncertainty_metrics(test_y, u.apply_temperature(test_p, t), temperature=1.0) | {
        "calib/temperature": t
    }


def test_multilabel_metrics_with_an_absent_finding_are_defined_by_hand():
    # finding 1 is absent from every image: its AUROC is undefined, its calibration is not (ECE = mean p, all in
    # the "negative" rows; Brier = mean p^2); the means are over both findings
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    probs = np.array([[0.9, 0.1], [0.1, 0.3], [0.9, 0.1], [0.1, 0.3]])
    m = u.uncertainty_metrics(labels, probs, names=["a", "b"])
    assert m["calib/ece/b"] == pytest.approx(0.2, abs=1e-6) and m["calib/brier/b"] == pytest.approx(0.05)
    assert m["calib/ece/a"] == pytest.approx(0.1, abs=1e-6) and m["calib/brier/a"] == pytest.approx(0.01)
    assert m["calib/ece"] == pytest.approx(0.15, abs=1e-6) and m["calib/brier"] == pytest.approx(0.03)
    expected_nll = -np.mean([np.log(0.9), np.log(0.9), np.log(0.9), np.log(0.9)] + [np.log(0.9), np.log(0.7)] * 2)
    assert m["calib/nll"] == pytest.approx(expected_nll)
    assert not any(k.startswith("selective/") for k in m)  # no selective prediction for multi-label


# ------------------------------------------------------------------------------------------------ the models' outputs


def test_simplex_probabilities_sum_to_one():
    scores = torch.tensor([[0.9, 0.1, -0.05], [-0.2, -0.1, -0.3], [0.3, 0.3, 0.3]])
    p = u.simplex_probabilities(scores)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(3))
    assert (p >= 0).all()
    torch.testing.assert_close(p[0], torch.tensor([0.9, 0.1, 0.0]))
    torch.testing.assert_close(p[1], torch.full((3,), 1 / 3))  # nothing positive: uniform


def test_sample_statistics():
    # 3 samples, 2 images, 2 classes; the final prediction is class 0 for both
    per_sample = torch.tensor([[[0.9, 0.1], [0.4, 0.6]], [[0.7, 0.3], [0.8, 0.2]], [[0.8, 0.2], [0.9, 0.1]]])
    stats = u.sample_statistics(per_sample, torch.tensor([0, 0]))
    torch.testing.assert_close(stats["agreement"], torch.tensor([1.0, 2 / 3]))
    # the predicted class's score over the samples: (0.9, 0.7, 0.8) and (0.4, 0.8, 0.9), unbiased std
    expected = torch.stack([torch.tensor([0.9, 0.7, 0.8]).std(), torch.tensor([0.4, 0.8, 0.9]).std()])
    torch.testing.assert_close(stats["sample_spread"], expected)
    # one sample: undefined, not zero
    one = u.sample_statistics(per_sample[:1], torch.tensor([0, 1]))
    assert torch.isnan(one["agreement"]).all() and torch.isnan(one["sample_spread"]).all()


def test_undefined_metrics_are_nan_not_made_up(caplog):
    labels = np.zeros(6, dtype=int)  # every image one class
    probs = np.array([[0.8, 0.2]] * 3 + [[0.3, 0.7]] * 3)
    nan = np.full(6, np.nan)  # eval_samples 1
    with caplog.at_level("INFO"):
        m = u.uncertainty_metrics(labels, probs, {"agreement": nan, "sample_spread": nan})
    assert math.isnan(m["selective/aurc/agreement"]) and math.isnan(m["selective/acc@0.8/sample_spread"])
    assert "diffusion.eval_samples > 1" in caplog.text
    assert math.isfinite(m["calib/ece"]) and math.isfinite(m["selective/aurc/max_prob"])
    assert m["selective/aurc/max_prob"] == pytest.approx(u.optimal_aurc(np.array([1, 1, 1, 0, 0, 0])))


# ------------------------------------------------------------------------------------------------ figures


def test_figures_are_images_of_the_stated_size():
    rng = np.random.default_rng(0)
    labels, probs = rng.integers(0, 3, 50), rng.dirichlet([1.0] * 3, 50)
    fig = reliability_figure(labels, {"before": probs, "after": u.apply_temperature(probs, 2.0)})
    image = to_image(fig)
    assert image.shape == (540, 500, 3) and image.dtype == np.uint8  # 5.0 x 5.4 inches at 100 dpi
    assert [t.get_text().split(" (")[0] for t in fig.axes[0].get_legend().get_texts()] == [
        "perfect calibration",
        "before",
        "after",
    ]
    correct = (probs.argmax(1) == labels).astype(float)
    curve = risk_coverage_figure({"max_prob": u.risk_coverage(correct, probs.max(1))})
    assert to_image(curve).shape == (420, 520, 3)
    assert curve.axes[0].get_xlabel().startswith("coverage") and curve.axes[0].get_ylabel().startswith("risk")
