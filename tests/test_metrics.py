"""Metrics against hand-worked examples (docs/method.md, 'Metrics')."""
import numpy as np
import pytest

from benchmark.metrics import (
    METRIC_NAMES,
    METRICS,
    REQUIRED_METRICS,
    THRESHOLD_METRICS,
    evaluate,
    min_max_scale,
    youden_threshold,
)


def test_hand_worked_example():
    # normals score 0.1, 0.4; anomalies 0.35, 0.8. Pairs (anomaly > normal): 0.35>0.1, 0.8>0.1,
    # 0.8>0.4 -> 3 of 4 -> AUROC 0.75. Scaled: [0, 3/7, 5/14, 1]. Youden J: at t=1 -> detect 1/2
    # anomalies, 0 false alarms (J = .5); at t=5/14 -> 2/2, 1/2 false alarms (J = .5); the tie
    # goes to the higher threshold.
    result = evaluate(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert result["auroc"] == pytest.approx(0.75)
    assert result["threshold"] == pytest.approx(1.0)
    assert result["false_alarm_rate"] == 0.0
    assert result["miss_rate"] == pytest.approx(0.5)
    assert result["gmean"] == pytest.approx(np.sqrt(0.5))


def test_three_by_three_example():
    # normals 1, 2, 6; anomalies 3, 5, 7 (scaled by (s-1)/6). Best J: threshold at score 3
    # -> false alarms {6} = 1/3, misses none -> J = 2/3; gmean = sqrt(2/3 * 1).
    scores = np.array([1, 2, 6, 3, 5, 7], dtype=float)
    labels = np.array([0, 0, 0, 1, 1, 1])
    result = evaluate(scores, labels)
    assert result["auroc"] == pytest.approx(7 / 9)
    assert result["threshold"] == pytest.approx((3 - 1) / 6)
    assert result["false_alarm_rate"] == pytest.approx(1 / 3)
    assert result["miss_rate"] == pytest.approx(0.0)
    assert result["gmean"] == pytest.approx(np.sqrt(2 / 3))


def test_ties_count_half():
    # One normal and one anomaly tie at 0.5: that pair counts 1/2 -> AUROC (1 + 1 + 1 + .5) / 4.
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    labels = np.array([0, 0, 1, 1])
    assert evaluate(scores, labels)["auroc"] == pytest.approx(0.875)


def test_perfect_detector():
    result = evaluate(np.array([0.0, 0.1, 0.2, 5.0, 6.0]), np.array([0, 0, 0, 1, 1]))
    assert result["auroc"] == 1.0
    assert result["gmean"] == 1.0
    assert result["false_alarm_rate"] == 0.0 and result["miss_rate"] == 0.0


def test_inverted_detector():
    # Anomalies score lowest: no threshold beats "flag nothing"; every anomaly is missed.
    result = evaluate(np.array([5.0, 6.0, 0.0, 0.1]), np.array([0, 0, 1, 1]))
    assert result["auroc"] == 0.0
    assert result["threshold"] is None
    assert result["miss_rate"] == 1.0 and result["false_alarm_rate"] == 0.0
    assert result["gmean"] == 0.0


def test_min_max_scaling_keeps_auroc_and_handles_constant_scores():
    scores = np.array([3.0, -1.0, 7.0])
    np.testing.assert_allclose(min_max_scale(scores), [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(min_max_scale(np.array([2.0, 2.0])), [0.0, 0.0])
    labels = np.array([0, 1, 1])
    assert evaluate(scores, labels)["auroc"] == evaluate(min_max_scale(scores), labels)["auroc"]


def test_youden_threshold_rates():
    threshold, false_alarms, detected = youden_threshold(np.array([0.0, 0.2, 0.8, 1.0]), np.array([0, 0, 1, 1]))
    assert threshold == pytest.approx(0.8) and false_alarms == 0.0 and detected == 1.0


def test_scores_tied_exactly_at_the_threshold_are_flagged_anomalous():
    # Scaled scores [0, 0, .5, .5, .5, 1]; the normal image 2 ties with anomalies 3 and 4.
    # Youden's J: threshold 1 -> TPR 1/3, FPR 0, J 1/3; threshold .5 -> TPR 1, FPR 1/3, J 2/3 (best).
    # At .5, ">=" flags the tied normal image too: false-alarm rate 1/3, miss rate 0,
    # gmean = sqrt((1 - 1/3) * 1). (With ">" it would be FAR 0, miss 2/3, gmean sqrt(1/3).)
    metrics = evaluate(np.array([0.0, 0.0, 1.0, 1.0, 1.0, 2.0]), np.array([0, 0, 0, 1, 1, 1]))
    assert metrics["threshold"] == 0.5
    assert metrics["false_alarm_rate"] == pytest.approx(1 / 3)
    assert metrics["miss_rate"] == 0.0
    assert metrics["gmean"] == pytest.approx(np.sqrt(2 / 3))


def test_anomalies_tied_at_the_threshold_are_not_missed():
    # Scaled [0, .25, .5, .5, 1] with labels [0, 0, 1, 1, 1]: the best threshold is .5, where two
    # anomalies sit exactly; both count as detected: miss 0, false alarms 0, gmean 1.
    metrics = evaluate(np.array([0.0, 1.0, 2.0, 2.0, 4.0]), np.array([0, 0, 1, 1, 1]))
    assert metrics["threshold"] == 0.5
    assert (metrics["miss_rate"], metrics["false_alarm_rate"], metrics["gmean"]) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_an_error(bad):
    with pytest.raises(ValueError, match="not finite"):
        evaluate(np.array([0.1, bad, 0.3]), np.array([0, 1, 1]))


def test_one_class_test_set_is_an_error():
    with pytest.raises(ValueError, match="only one class"):
        evaluate(np.array([0.1, 0.2]), np.array([1, 1]))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="labels"):
        evaluate(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))


def test_every_metric_is_declared_once_with_its_label_direction_and_need():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert tuple(evaluate(scores, labels)) == METRIC_NAMES == tuple(METRICS)
    assert THRESHOLD_METRICS == ("gmean", "false_alarm_rate", "miss_rate")  # Table 4's columns, in order
    assert REQUIRED_METRICS == ("auroc", *THRESHOLD_METRICS)  # the threshold may be None (no ROC point beats J = 0)
    assert {name: metric.higher_is_better for name, metric in METRICS.items()} == {
        "auroc": True, "gmean": True, "false_alarm_rate": False, "miss_rate": False, "threshold": None}
    assert [METRICS[name].label for name in THRESHOLD_METRICS] == ["gmean", "false-alarm rate", "miss rate"]
