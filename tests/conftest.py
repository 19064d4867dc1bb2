"""Shared test fixtures: tiny synthetic one-class tasks where the answer is known."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# The fault-injection fixture, for every test file that runs the CLI or the runner in-process.
from fault_methods import in_process, processes  # noqa: F401  (fixtures: pytest finds them by name here)

# Tests run on the CPU with a fixed thread count, so same-seed runs are bit-identical.
# MEMGAN_TEST_THREADS=1 keeps the suite usable on a machine busy with other work (two-thread
# OpenMP regions slow down badly when the cores are oversubscribed).
torch.set_num_threads(int(os.environ.get("MEMGAN_TEST_THREADS", min(2, os.cpu_count() or 1))))

SHARED_DATA = Path(os.environ.get("MEMGAN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_separable_task(n_train: int = 64, n_test_normal: int = 32, n_test_anomalous: int = 32,
                        channels: int = 1, size: int = 28, seed: int = 0):
    """Normal images: a bright centred square on a dark background, with mild noise.
    Anomalies: the negative of that (dark square on a bright background) with the same noise.
    Returns (X_train, X_test, y_test) with y = 1 for anomalies; images float32 in [0, 1], NCHW."""
    rng = np.random.default_rng(seed)
    base = np.zeros((channels, size, size), dtype=np.float32)
    lo, hi = size // 4, size - size // 4
    base[:, lo:hi, lo:hi] = 1.0

    def draw(n: int, template: np.ndarray) -> np.ndarray:
        noise = rng.normal(0.0, 0.05, size=(n, channels, size, size)).astype(np.float32)
        return np.clip(template[None] * 0.8 + 0.1 + noise, 0.0, 1.0).astype(np.float32)

    X_train = draw(n_train, base)
    X_test = np.concatenate([draw(n_test_normal, base), draw(n_test_anomalous, 1.0 - base)])
    y_test = np.concatenate([np.zeros(n_test_normal, dtype=np.int64), np.ones(n_test_anomalous, dtype=np.int64)])
    return X_train, X_test, y_test


@pytest.fixture
def separable_task():
    return make_separable_task


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.fail(f"the real datasets are needed at {SHARED_DATA} (set MEMGAN_DATA)")
    return SHARED_DATA
