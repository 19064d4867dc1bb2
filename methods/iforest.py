"""Isolation Forest (Liu et al. 2008) through pyod, on flattened pixels, with pyod's defaults
(BASELINES.md) and a fixed random_state. pyod's `contamination` only sets a threshold and
shifts every score by a constant, so it changes no rank and no AUROC."""
from __future__ import annotations

from typing import Any, Union

from methods.base import check_positive_int
from methods.pyod_adapter import PyODDetector

# pyod's defaults in every profile: iForest is cheap enough to run at full size everywhere.
PROFILES: dict = {profile: {"*": {}} for profile in ("paper", "quick", "smoke")}
PROFILES["smoke"] = {"*": {"n_estimators": 20}}


class IsolationForest(PyODDetector):
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

    def _model_kwargs(self) -> dict[str, Any]:
        return {"n_estimators": self.n_estimators, "max_samples": self.max_samples,
                "max_features": self.max_features, "bootstrap": self.bootstrap, "n_jobs": self.n_jobs}
