"""Synthetic job records for the report tests: real score arrays (so ROC curves and the held-out
threshold mean something), every paper method, an extra pyod method, seeds, failures, gaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.metrics import evaluate, validation_threshold_metrics
from benchmark.records import SCHEMA_VERSION, JobKey, write_record

LABELS = {
    "iforest": "iForest",
    "dagmm": "DAGMM",
    "f_anogan": "f-AnoGAN",
    "memae": "MemAE",
    "ganomaly": "GANomaly",
    "dsvdd": "DSVDD",
    "mem_ganomaly": "Mem_GANomaly",
    "pyod:knn": "pyod:knn",
}


def synthetic_record(
    results: Path,
    dataset: str,
    normal_class: int,
    method: str,
    seed: int = 0,
    separation: float = 1.0,
    status: str = "ok",
    profile: str = "quick",
    protocol: str = "paper",
    with_label: bool = True,
    with_val: bool = True,
    n: int = 200,
) -> dict:
    """Write one record whose scores are N(0, 1) for normals and N(separation, 1) for anomalies
    (AUROC about Phi(separation / sqrt 2)); returns the record."""
    rng = np.random.default_rng([normal_class, seed, len(method), int(separation * 100)])
    labels = np.r_[np.zeros(n // 2, np.int8), np.ones(n // 2, np.int8)]
    scores = rng.normal(0.0, 1.0, n) + separation * labels
    val_scores = rng.normal(0.0, 1.0, 40)
    record = {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "normal_class": normal_class,
        "method": method,
        "seed": seed,
        "profile": profile,
        "protocol": protocol,
        "status": status,
        "metrics": None,
        "sizes": {"n_train": 360, "n_val": 40, "n_test": n},
    }
    if with_label:
        record["method_label"] = LABELS.get(method, method)
    extra = None
    if status == "ok":
        record["metrics"] = evaluate(scores, labels)
        if with_val:
            record["metrics_val_threshold"] = validation_threshold_metrics(scores, labels, val_scores)
            extra = {"val_scores": val_scores}
    else:
        record["error"] = {"type": "RuntimeError", "message": f"injected {status}", "traceback": ""}
    key = JobKey(dataset, normal_class, method, seed, profile, protocol)
    write_record(results, key, record, scores if status == "ok" else None, labels, extra_arrays=extra)
    return record


def demo_results(results: Path, profile: str = "quick") -> None:
    """All seven paper methods + pyod:knn on MNIST (two seeds for GANomaly, one failed and one
    diverged DAGMM class), three methods on CIFAR-10 classes 0-4 only."""
    for c in range(10):
        for i, method in enumerate(LABELS):
            if method == "dagmm" and c in (3, 4):
                synthetic_record(
                    results, "mnist", c, method, status="failed" if c == 3 else "diverged", profile=profile
                )
                continue
            synthetic_record(results, "mnist", c, method, separation=0.5 + 0.25 * i + 0.05 * c, profile=profile)
        synthetic_record(results, "mnist", c, "ganomaly", seed=1, separation=1.5, profile=profile)
    for c in range(5):
        for i, method in enumerate(("iforest", "ganomaly", "mem_ganomaly")):
            synthetic_record(results, "cifar10", c, method, separation=0.2 + 0.3 * i, profile=profile)
