"""Isolation Forest (Liu et al. 2008) through pyod, on flattened pixels, with pyod's defaults
(docs/baselines.md, "iForest") and a fixed random_state. pyod's `contamination` only sets a threshold and
shifts every score by a constant, so it changes no rank and no AUROC."""
from __future__ import annotations

from numbers import Integral, Real
from typing import Any, Union

from methods.base import check_positive_int
from methods.pyod_adapter import PyODDetector

# pyod's defaults under paper and quick, as the "*" default (methods.DEFAULT) of every dataset:
# iForest is cheap enough to run at full size everywhere. smoke: fewer trees, for the end-to-end tests.
PROFILES: dict = {"paper": {"*": {}}, "quick": {"*": {}}, "smoke": {"*": {"n_estimators": 20}}}


class IsolationForest(PyODDetector):
    """pyod's IForest on flattened pixels.

    Parameters
    ----------
    n_estimators : int, default 100
        Number of trees.
    max_samples : "auto", int or float, default "auto"
        Images drawn per tree: "auto" = min(256, N), an int count, or a fraction in (0, 1].
    max_features : int or float, default 1.0
        Pixels drawn per tree: an int count or a fraction in (0, 1].
    bootstrap : bool, default False
        Draw images with replacement.
    n_jobs : int, default 1
        Parallel jobs of the forest (-1 = all cores; the runner already parallelises jobs).
    random_state : int, default 0
        Seed, in [0, 2**32).
    """

    def __init__(self, n_estimators: int = 100, max_samples: Union[str, int, float] = "auto",
                 max_features: float = 1.0, bootstrap: bool = False, n_jobs: int = 1,
                 random_state: int = 0) -> None:
        super().__init__(model="iforest", params=None, random_state=random_state)
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_features = max_features
        self.bootstrap = bootstrap
        self.n_jobs = n_jobs

    def _check_params(self) -> None:
        super()._check_params()
        check_positive_int("n_estimators", self.n_estimators)
        for name in ("max_samples", "max_features"):
            value = getattr(self, name)
            if name == "max_samples" and value == "auto":
                continue
            ok = (isinstance(value, Integral) and value > 0) or (isinstance(value, Real) and 0 < value <= 1)
            if isinstance(value, bool) or not ok:
                auto = '"auto", ' if name == "max_samples" else ""
                raise ValueError(f"{name} must be {auto}a positive integer or a fraction in (0, 1], got {value!r}")
        if not isinstance(self.bootstrap, bool):
            raise ValueError(f"bootstrap must be True or False, got {self.bootstrap!r}")
        if isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, Integral) or self.n_jobs == 0:
            raise ValueError(f"n_jobs must be a non-zero integer (-1 = all cores), got {self.n_jobs!r}")

    def _model_kwargs(self) -> dict[str, Any]:
        return {"n_estimators": self.n_estimators, "max_samples": self.max_samples,
                "max_features": self.max_features, "bootstrap": self.bootstrap, "n_jobs": self.n_jobs}
