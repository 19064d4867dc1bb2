"""Metrics of the paper's section 4.1 (docs/method.md, 'Metrics').

AUROC from the raw scores; scores min-max scaled to [0, 1] (eqs. 9 / 34); the threshold is the
ROC point maximising Youden's J = TPR - FPR (chosen on the test labels, as the paper must have:
optimistic, but that is what Table 4 reports). At that threshold, with NORMAL as the positive
class: gmean = sqrt(recall on normals * recall on anomalies) (eq. 35), false-alarm rate = share
of normal images flagged anomalous (eq. 36), miss rate = share of anomalies accepted as normal
(eq. 37). An image is flagged anomalous when its scaled score is >= the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


@dataclass(frozen=True)
class Metric:
    """One metric of a job record: what `evaluate` returns under `name`, what the tables call it and
    which way is better.

    Attributes
    ----------
    name : str
        The key in a record's ``metrics`` and in the report rows (`benchmark.records.load_records`).
    label : str
        Its name in the tables' headers.
    higher_is_better : bool or None
        Which values win (bold in the tables, rank 1 in the verdict); None for a number that is no
        score (the threshold).
    required : bool
        Whether an ``ok`` record must hold it as a finite number (`benchmark.records.read_record`).
    at_threshold : bool
        Measured at a decision threshold (the paper's Table 4; eqs. 35-37) rather than over all of them.
    """

    name: str
    label: str
    higher_is_better: Optional[bool]
    required: bool
    at_threshold: bool = False


#: Every metric `evaluate` returns, by name, in the paper's order: the records store these, the reports
#: and the verdict read their labels and directions from here.
METRICS: dict[str, Metric] = {metric.name: metric for metric in (
    Metric("auroc", "AUROC", higher_is_better=True, required=True),
    Metric("gmean", "gmean", higher_is_better=True, required=True, at_threshold=True),  # eq. 35
    Metric("false_alarm_rate", "false-alarm rate", higher_is_better=False, required=True, at_threshold=True),  # 36
    Metric("miss_rate", "miss rate", higher_is_better=False, required=True, at_threshold=True),  # eq. 37
    Metric("threshold", "threshold", higher_is_better=None, required=False),  # None when no ROC point beats J = 0
)}
#: The metrics at the Youden threshold (Table 4), in the paper's order.
THRESHOLD_METRICS: tuple[str, ...] = tuple(name for name, metric in METRICS.items() if metric.at_threshold)
#: Every metric `evaluate` returns, in order.
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)
#: The metrics an ``ok`` record must hold as finite numbers (the threshold may be None).
REQUIRED_METRICS: tuple[str, ...] = tuple(name for name, metric in METRICS.items() if metric.required)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {len(scores)} scores are not finite (NaN or inf); "
                         "the detector's output cannot be evaluated")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomaly)")
    if len(np.unique(labels)) < 2:
        raise ValueError("the test set holds only one class; AUROC and the Youden threshold need normal and "
                         "anomalous images")
    return scores, labels.astype(np.int64)


def min_max_scale(scores: np.ndarray) -> np.ndarray:
    """Min-max scaling of eq. 34, (s - min) / (max - min); all-equal scores map to 0.

    Parameters
    ----------
    scores : ndarray
        Raw scores.

    Returns
    -------
    ndarray
        float64 scores in [0, 1].
    """
    scores = np.asarray(scores, dtype=np.float64)
    low, span = scores.min(), np.ptp(scores)
    return (scores - low) / span if span > 0 else np.zeros_like(scores)


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[Optional[float], float, float]:
    """The ROC point maximising Youden's J = TPR - FPR.

    Ties in J go to the highest threshold (scikit-learn's first such point). When no point beats
    J = 0 (an inverted or useless detector) that is the "flag nothing" point, whose threshold is
    +inf: returned as None.

    Parameters
    ----------
    scores : ndarray
        Scores, higher = more anomalous; an image is flagged when its score is >= the threshold.
    labels : ndarray
        1 = anomaly, 0 = normal.

    Returns
    -------
    tuple
        ``(threshold or None, false-alarm rate, detection rate)``.
    """
    fpr, tpr, thresholds = roc_curve(labels, scores)  # positive = anomaly: fpr = false alarms
    best = int(np.argmax(tpr - fpr))
    threshold = float(thresholds[best]) if np.isfinite(thresholds[best]) else None
    return threshold, float(fpr[best]), float(tpr[best])


def evaluate(scores: np.ndarray, labels: np.ndarray) -> dict[str, Optional[float]]:
    """All reported metrics of one task (module docstring; docs/method.md, 'Metrics').

    Parameters
    ----------
    scores : ndarray
        One finite score per test image, higher = more anomalous.
    labels : ndarray
        1 = anomaly, 0 = normal; both must occur.

    Returns
    -------
    dict
        One value per name in `METRIC_NAMES` (the threshold is None when no ROC point beats J = 0).

    Raises
    ------
    ValueError
        For non-finite scores, mismatched lengths, labels other than 0/1, or a one-class test set.
    """
    scores, labels = _check(scores, labels)
    scaled = min_max_scale(scores)
    threshold, false_alarm_rate, detection_rate = youden_threshold(scaled, labels)
    miss_rate = 1.0 - detection_rate
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "gmean": float(np.sqrt((1.0 - false_alarm_rate) * detection_rate)),
        "false_alarm_rate": false_alarm_rate,
        "miss_rate": miss_rate,
        "threshold": threshold,
    }


VAL_PERCENTILE = 95.0


def validation_threshold_metrics(scores: np.ndarray, labels: np.ndarray, val_scores: np.ndarray,
                                 percentile: float = VAL_PERCENTILE) -> dict[str, Optional[float]]:
    """Threshold metrics with a threshold chosen WITHOUT test labels: the `percentile` of the
    scores of held-out normal training images (a validation split never used in fitting).

    Parameters
    ----------
    scores, labels : numpy.ndarray
        Test scores (higher = more anomalous) and labels (1 = anomaly).
    val_scores : numpy.ndarray
        Scores of the held-out normal images.
    percentile : float
        Percentile of `val_scores` used as the threshold (0-100); an image is flagged anomalous
        when its raw score is >= the threshold, as in `evaluate`.

    Returns
    -------
    dict
        percentile, threshold (raw score), n_val, gmean, false_alarm_rate, miss_rate (normal = the
        positive class, as in `evaluate`).
    """
    scores, labels = _check(scores, labels)
    val_scores = np.asarray(val_scores, dtype=np.float64).ravel()
    if len(val_scores) == 0 or not np.all(np.isfinite(val_scores)):
        raise ValueError("the validation scores are empty or not finite; no validation threshold can be set")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    threshold = float(np.percentile(val_scores, percentile))
    flagged = scores >= threshold
    false_alarm_rate = float(flagged[labels == 0].mean())
    miss_rate = float((~flagged[labels == 1]).mean())
    return {"percentile": float(percentile), "threshold": threshold, "n_val": int(len(val_scores)),
            "gmean": float(np.sqrt((1.0 - false_alarm_rate) * (1.0 - miss_rate))),
            "false_alarm_rate": false_alarm_rate, "miss_rate": miss_rate}
