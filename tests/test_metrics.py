"""Tests for the metrics in metrics.py and the confusion-matrix figure in figures.py; expected values
are worked out by hand in the comments."""

import logging
import math

import numpy as np
import pytest

from diffmic.evaluation.figures import confusion_matrix_figure, confusion_matrix_image
from diffmic.evaluation.metrics import classification_metrics, confusion_matrix, multilabel_metrics


def metric_warnings(caplog) -> list[str]:
    """Messages of the WARNING records that came from the metrics module's own logger."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "diffmic.evaluation.metrics" and r.levelno == logging.WARNING
    ]


# N=8, C=3.  sample: true, pred (argmax), raw scores (s0, s1, s2)
#   0: 0 0 ( 5,  1, -2)    4: 1 1 ( 0,  3, -3)
#   1: 0 0 ( 3,  2,  0)    5: 2 0 ( 4, -2,  1)
#   2: 0 1 ( 1,  4, -1)    6: 2 1 (-2,  5,  3)
#   3: 1 1 (-1,  6,  2)    7: 2 2 (-3, -1,  7)
Y3 = np.array([0, 0, 0, 1, 1, 2, 2, 2])
S3 = np.array(
    [[5, 1, -2], [3, 2, 0], [1, 4, -1], [-1, 6, 2], [0, 3, -3], [4, -2, 1], [-2, 5, 3], [-3, -1, 7]], dtype=float
)


def test_hand_example_three_classes(caplog):
    with caplog.at_level(logging.WARNING, logger="diffmic.evaluation.metrics"):
        m = classification_metrics(Y3, S3)
    assert metric_warnings(caplog) == []  # every class has positives and negatives: no AUC is undefined
    per_class = {"recall/0", "recall/1", "recall/2"}
    assert set(m) == {"acc", "balanced_acc", "precision", "recall", "f1", "auc", "kappa"} | per_class
    # confusion (rows true): [[2,1,0],[0,2,0],[1,1,1]]; 5 correct of 8
    assert m["acc"] == pytest.approx(5 / 8)
    # recall per class 2/3, 2/2, 1/3 -> mean 2/3
    assert [m[k] for k in sorted(per_class)] == pytest.approx([2 / 3, 1.0, 1 / 3])
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["balanced_acc"] == pytest.approx(2 / 3)
    # precision per predicted column: 2/3, 2/4, 1/1 -> (2/3 + 1/2 + 1)/3 = 13/18
    assert m["precision"] == pytest.approx(13 / 18)
    # F1: c0 2/3; c1 2*(1/2*1)/(3/2) = 2/3; c2 2*(1/3)/(4/3) = 1/2 -> 11/18
    assert m["f1"] == pytest.approx(11 / 18)
    # AUC (concordant pos>neg pairs / all pairs):
    #   c0 pos {5,3,1} neg {-1,0,4,-2,-3}: 5+4+4 = 13/15
    #   c1 pos {6,3} neg {1,2,4,-2,5,-1}: 6+4 = 10/12
    #   c2 pos {1,3,7} neg {-2,0,-1,2,-3}: 4+5+5 = 14/15
    #   macro = (13/15 + 5/6 + 14/15)/3 = 79/90
    assert m["auc"] == pytest.approx(79 / 90)
    # quadratic kappa, w=(i-j)^2: sum(w*O) = 1*1 + 4*1 + 1*1 = 6
    # E = outer(rows [3,2,3], cols [3,4,1]) / 8; sum(w*E) = (12+12+6+2+36+12)/8 = 10
    # kappa = 1 - 6/10
    assert m["kappa"] == pytest.approx(0.4)


def test_per_class_recall_named_and_nan_for_an_absent_class():
    # y = [0,0,1,1], predictions [0,1,1,1]: class 0 1/2, class 1 2/2, class 2 never occurs
    y = np.array([0, 0, 1, 1])
    s = np.array([[2, 0, -1], [0, 1, -1], [0, 1, 0], [-1, 3, 0]], dtype=float)
    m = classification_metrics(y, s, ["MEL", "NV", "BCC"])
    assert m["recall/MEL"] == pytest.approx(0.5) and m["recall/NV"] == pytest.approx(1.0)
    assert np.isnan(m["recall/BCC"])  # undefined, not 0: no image of it to recall
    assert "recall/0" not in m
    with pytest.raises(ValueError, match="got 2 class names for 3 classes"):
        classification_metrics(y, s, ["MEL", "NV"])


def test_perfect_prediction_all_ones():
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    s = np.eye(4)[y] * 3.0 - 1.0
    m = classification_metrics(y, s)
    for k, v in m.items():
        assert v == pytest.approx(1.0), k


def test_absent_class_auc_mean_of_others_and_warns(caplog):
    # y = [0,0,1,1], class 2 never occurs -> its AUC is undefined.
    # c0: pos {2,0} neg {1,-1}: 2>1, 2>-1, 0>-1, 0<1 -> 3/4
    # c1: pos {0,3} neg {0,1}: tie 0=0 counts 1/2, 0<1, 3>0, 3>1 -> 2.5/4
    y = np.array([0, 0, 1, 1])
    s = np.array([[2, 0, -1], [0, 1, -1], [1, 0, 0], [-1, 3, 0]], dtype=float)
    with caplog.at_level(logging.WARNING, logger="diffmic.evaluation.metrics"):
        m = classification_metrics(y, s)
    assert m["auc"] == pytest.approx((0.75 + 0.625) / 2)
    (message,) = metric_warnings(caplog)  # exactly one, from the "metrics" logger
    # the skipped class as the message renders it, and the number of classes averaged over
    assert "for classes ['2'];" in message and message.endswith("averaging over the other 2")


def test_binary_case():
    # y = [0,0,1,1,1]; preds [0,1,1,0,1]; confusion [[1,1],[1,2]]
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([[2, 1], [0, 1], [1, 3], [3, 0], [-1, 2]], dtype=float)
    m = classification_metrics(y, s)
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["balanced_acc"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # c0 (column 0): pos {2,0} neg {1,3,-1}: 2 + 1 = 3/6
    # c1 (column 1): pos {3,0,2} neg {1,1}: 2 + 0 + 2 = 4/6 -> macro 7/12
    assert m["auc"] == pytest.approx(7 / 12)
    # C=2 quadratic = unweighted: po = 3/5, pe = (2*2 + 3*3)/25 = 13/25 -> (2/25)/(12/25)
    assert m["kappa"] == pytest.approx(1 / 6)


def test_single_class_degenerate_no_exception(caplog):
    with caplog.at_level(logging.WARNING, logger="diffmic.evaluation.metrics"):
        m = classification_metrics(np.array([0, 0]), np.array([[1.0, 0.0], [2.0, 1.0]]))
    assert m["acc"] == 1.0
    assert m["balanced_acc"] == 1.0  # recall over the classes present (class 0 only)
    # macro over both labels, absent class 1 scoring 0 (zero_division=0): (1 + 0) / 2
    assert m["precision"] == m["recall"] == m["f1"] == pytest.approx(0.5)
    assert m["kappa"] == 0.0  # undefined (NaN) kappa is reported as 0
    assert math.isnan(m["auc"])
    # class 0 has no negatives and class 1 no positives: both skipped, none left to average
    (message,) = metric_warnings(caplog)
    assert "for classes ['0', '1'];" in message and message.endswith("averaging over the other 0")


def test_multilabel_hand_example(caplog):
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.2, 0.1], [0.4, 0.6, 0.3], [0.3, 0.7, 0.6], [0.2, 0.1, 0.2]])
    with caplog.at_level(logging.WARNING, logger="diffmic.evaluation.metrics"):
        m = multilabel_metrics(y, p, names=["a", "b", "c"])
    # a: pos {.9,.3} neg {.4,.2}: 2 + 1 = 3/4;  b: pos {.6,.7} neg {.2,.1}: 4/4
    assert m["auc/a"] == pytest.approx(0.75)
    assert m["auc/b"] == pytest.approx(1.0)
    assert math.isnan(m["auc/c"])  # all negative
    assert m["auc"] == pytest.approx(0.875)
    (message,) = metric_warnings(caplog)
    assert message.startswith("multilabel AUC")
    assert "for classes ['c'];" in message and message.endswith("averaging over the other 2")
    # pred @0.5: [[1,0,0],[0,1,0],[0,1,1],[0,0,0]]
    # F1 a: TP1 FN1 -> 2/3; b: TP2 -> 1; c: FP1 -> 0; macro 5/9.  2 wrong of 12 elements.
    assert m["f1"] == pytest.approx(5 / 9)
    assert m["acc"] == pytest.approx(10 / 12)


def test_multilabel_default_names():
    m = multilabel_metrics(np.array([[1, 0], [0, 1]]), np.array([[0.8, 0.3], [0.1, 0.9]]))
    assert set(m) == {"auc", "auc/0", "auc/1", "f1", "acc"}
    assert m["auc"] == m["auc/0"] == m["auc/1"] == pytest.approx(1.0)
    assert m["f1"] == m["acc"] == pytest.approx(1.0)  # pred @0.5 [[1, 0], [0, 1]] is exact


def test_multilabel_threshold_is_inclusive():
    # prediction = score >= threshold: 0.5 counts as positive at the default threshold, not at 0.6
    y, p = np.array([[1, 0], [0, 1]]), np.array([[0.5, 0.2], [0.1, 0.5]])
    assert multilabel_metrics(y, p)["acc"] == pytest.approx(1.0)
    assert multilabel_metrics(y, p, threshold=0.6)["acc"] == pytest.approx(0.5)


def test_confusion_matrix_counts():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 4)
    expected = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)


@pytest.mark.parametrize("c", [2, 7, 15])
def test_confusion_matrix_image_shape(c):
    cm = np.diag(np.arange(1, c + 1) * 10)
    img = confusion_matrix_image(cm)
    fig = confusion_matrix_figure(cm)
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert img.dtype == np.uint8 and img.shape == (height, width, 3)
    assert img.min() < 64 and img.max() == 255  # dark cells and text on a white ground


def test_confusion_matrix_figure_shows_row_fractions_counts_and_names():
    cm = np.array([[1, 3], [2, 2]])
    fig = confusion_matrix_figure(cm, class_names=["benign", "malignant"])
    ax = fig.axes[0]
    # the colour is each row's fraction, on a fixed 0..1 scale; the text of each cell is its count
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.25, 0.75], [0.5, 0.5]])
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2", "2", "3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["benign", "malignant"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["benign", "malignant"]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    # names are cut to 20 characters; an empty row is drawn as zeros, not NaN
    long = confusion_matrix_figure(np.array([[0, 0], [1, 1]]), class_names=["b" * 20 + "TAIL", "m"])
    assert long.axes[0].get_yticklabels()[0].get_text() == "b" * 20
    np.testing.assert_array_equal(long.axes[0].images[0].get_array(), [[0.0, 0.0], [0.5, 0.5]])


@pytest.mark.parametrize(
    "cm, names, match",
    [
        (np.zeros((2, 3), int), None, r"square \(C, C\), got \(2, 3\)"),
        (np.zeros(3, int), None, r"square \(C, C\), got \(3,\)"),
        (np.zeros((2, 2), int), ["a", "b", "c"], "got 3 class names for 2 classes"),
    ],
)
def test_confusion_matrix_image_bad_inputs(cm, names, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix_image(cm, class_names=names)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: classification_metrics(np.array([0, 3]), np.zeros((2, 3))),
            r"y_true values must lie in 0\.\.2, got range 0\.\.3",
        ),
        (
            lambda: classification_metrics(np.array([0, 1, 2]), np.zeros((2, 3))),
            "y_true has 3 samples but scores has 2",
        ),
        (lambda: classification_metrics(np.array([0, 0]), np.zeros((2, 1))), r"C >= 2, got \(2, 1\)"),
        (lambda: classification_metrics(np.array([], dtype=int), np.zeros((0, 3))), "y_true is empty"),
        (
            lambda: classification_metrics(np.array([0.5, 1]), np.zeros((2, 3))),
            "y_true must hold integer class indices",
        ),
        (lambda: classification_metrics(np.array([0, 1]), np.array([[0, 1, np.nan], [0, 1, 2]])), "NaN or inf"),
        (lambda: multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 2))), r"got \(2, 3\) and \(2, 2\)"),
        (lambda: multilabel_metrics(np.array([[2, 0]]), np.zeros((1, 2))), "y_true must contain only 0 and 1"),
        (lambda: multilabel_metrics(np.zeros((1, 2)), np.zeros((1, 2)), names=["a"]), "got 1 names for 2 findings"),
        (
            lambda: confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2),
            r"y_true values must lie in 0\.\.1, got range 0\.\.2",
        ),
        (
            lambda: confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2),
            r"y_pred values must lie in 0\.\.1, got range 0\.\.2",
        ),
        (lambda: confusion_matrix(np.array([0, 1]), np.array([0, 1, 1]), 2), r"y_true \(2,\) and y_pred \(3,\) differ"),
    ],
    ids=[
        "label_range",
        "length",
        "one_column",
        "empty",
        "non_integer",
        "nan_score",
        "ml_shape",
        "ml_not_binary",
        "ml_names",
        "cm_true_range",
        "cm_pred_range",
        "cm_length",
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
