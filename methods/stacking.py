"""Transitional: the runner's old entry point (benchmark/stacking.py imports `fit_stacked` from here).
Training lives in methods/engine/; this file goes once the runner calls `methods.engine.fit_jobs`
with its `TrainOptions` (issue 19)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from methods.base import DivergedError, EpochCallback
from methods.engine import fit_jobs


def fit_stacked(detectors: Sequence[Any], Xs: Sequence[np.ndarray],
                callbacks: Optional[Sequence[Optional[EpochCallback]]] = None) -> list[Optional[DivergedError]]:
    """`methods.engine.fit_jobs` with the default `TrainOptions` (see the module docstring)."""
    return fit_jobs(detectors, Xs, callbacks)
