"""Any pyod model as a `Detector`, on flattened pixels. Registry name: `pyod:<module>`, e.g.
`pyod:knn` -> pyod.models.knn.KNN. pyod's `decision_function` already means higher = more
anomalous, so scores pass through unchanged."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Optional

import numpy as np

from methods.base import Detector, EpochCallback, check_images, check_random_state

# pyod's defaults in every profile, as the "*" default (methods.DEFAULT) of every dataset: a
# `pyod:<model>` has no tuned budget of its own (each model's cost is pyod's business).
PROFILES: dict = {profile: {"*": {}} for profile in ("paper", "quick", "smoke")}


def find_pyod_class(model: str) -> type:
    """Find a pyod detector class by module name.

    Parameters
    ----------
    model : str
        ``<model>`` of ``pyod.models.<model>``, e.g. ``"knn"``.

    Returns
    -------
    type
        The class there whose lower-cased name is ``model``, else the only `BaseDetector`
        subclass defined there.

    Raises
    ------
    KeyError
        With the reason: not an identifier, no such module, or no single detector in it.
    """
    from pyod.models.base import BaseDetector

    if not model.isidentifier():
        raise KeyError(f"not a pyod model name: {model!r}")
    try:
        module = importlib.import_module(f"pyod.models.{model}")
    except ImportError as exc:
        raise KeyError(f"pyod has no model module pyod.models.{model} ({exc})") from exc
    candidates = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                  if issubclass(obj, BaseDetector) and obj is not BaseDetector and obj.__module__ == module.__name__]
    exact = [cls for cls in candidates if cls.__name__.lower() == model.lower()]
    if exact:
        return exact[0]
    if len(candidates) == 1:
        return candidates[0]
    raise KeyError(f"pyod.models.{model} defines {len(candidates)} detectors; cannot choose")


class PyODDetector(Detector):
    """Any pyod model as a `Detector`, on flattened pixels.

    Parameters
    ----------
    model : str, default "iforest"
        The pyod module name (`find_pyod_class`).
    params : dict, optional
        Constructor arguments of the pyod model.
    random_state : int, default 0
        Passed to the model when it takes one.
    """

    def __init__(self, model: str = "iforest", params: Optional[dict] = None, random_state: int = 0) -> None:
        self.model = model
        self.params = params
        self.random_state = random_state

    def _check_params(self) -> None:
        check_random_state(self.random_state)
        try:
            find_pyod_class(self.model)
        except KeyError as exc:
            raise ValueError(str(exc)) from exc

    def _model_kwargs(self) -> dict[str, Any]:
        return dict(self.params or {})

    def _build(self) -> Any:
        cls = find_pyod_class(self.model)
        kwargs = self._model_kwargs()
        if "random_state" in inspect.signature(cls.__init__).parameters:
            kwargs.setdefault("random_state", self.random_state)
        return cls(**kwargs)

    def fit(self, X: np.ndarray, epoch_callback: Optional[EpochCallback] = None) -> "PyODDetector":
        self.check_params()
        X = check_images(X)
        self.input_shape_ = X.shape[1:]
        self.estimator_ = self._build()
        self.estimator_.fit(X.reshape(len(X), -1))
        self.training_log_ = {"pyod_model": type(self.estimator_).__name__}
        if epoch_callback is not None:
            epoch_callback(1, self)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = check_images(X)
        if X.shape[1:] != getattr(self, "input_shape_", None):
            raise ValueError(f"images of shape {X.shape[1:]} do not match the training images; call fit first")
        return np.asarray(self.estimator_.decision_function(X.reshape(len(X), -1)), dtype=np.float64)

    def run_info(self) -> dict:
        return {"device": "cpu", "determinism": "deterministic for a fixed random_state"}
