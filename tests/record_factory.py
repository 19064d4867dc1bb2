"""Hand-made job records for the report tests (verdict, sweeps, paper figures)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from benchmark.records import SCHEMA_VERSION, JobKey, write_record


def write_fake_record(results: Path, dataset: str, normal_class: int, method: str, auroc: Optional[float],
                      seed: int = 0, profile: str = "quick", protocol: str = "paper", status: str = "ok",
                      **extra) -> Path:
    """Write one record (and its scores) under results/<profile>/...; `extra` fields are added
    to the record as they are (diagnostics, training_log, hyperparameters, ...)."""
    metrics = ({"auroc": auroc, "gmean": 0.5, "false_alarm_rate": 0.1, "miss_rate": 0.2, "threshold": 0.5}
               if status == "ok" else None)
    record = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "normal_class": normal_class, "method": method,
              "seed": seed, "profile": profile, "base_profile": profile.split("+")[0], "protocol": protocol,
              "status": status, "metrics": metrics, **extra}
    key = JobKey(dataset, normal_class, method, seed, profile, protocol)
    scores = np.array([0.1, 0.9]) if status == "ok" else None
    return write_record(results, key, record, scores, np.array([0, 1]))
