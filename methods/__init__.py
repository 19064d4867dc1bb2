"""The detector registry: a method's CLI name -> its label in the tables, its class, and its
per-profile, per-dataset settings (the module's `PROFILES` dict).

Adding a detector = one new file in `methods/` (a `Detector` subclass and a `PROFILES` dict)
plus one `register(...)` line below. Any pyod model is also available as `pyod:<module>`,
e.g. `pyod:knn`, `pyod:lof`, `pyod:ecod`, through `methods.pyod_adapter`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from methods.base import Detector

PROFILE_NAMES = ("paper", "quick", "smoke")
DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10")


@dataclass(frozen=True)
class MethodSpec:
    name: str    # CLI name, e.g. "mem_ganomaly"
    label: str   # the paper's label, e.g. "Mem_GANomaly"
    target: str  # "module:Class"
    fixed_params: dict = field(default_factory=dict)  # for generated entries (pyod:<model>)

    def load(self) -> type[Detector]:
        module_name, class_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), class_name)

    def profiles(self) -> dict[str, dict[str, dict[str, Any]]]:
        module = importlib.import_module(self.target.split(":")[0])
        return getattr(module, "PROFILES", {})

    def settings(self, profile: str, dataset: str) -> dict[str, Any]:
        """Constructor arguments for (profile, dataset); `random_state`/`device` come from the runner."""
        by_dataset = self.profiles().get(profile, {})
        return {**self.fixed_params, **by_dataset.get(dataset, by_dataset.get("*", {}))}


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, label: str, target: str) -> None:
    REGISTRY[name] = MethodSpec(name, label, target)


# In the paper's column order (Tables 1-3).
register("iforest", "iForest", "methods.iforest:IsolationForest")
register("dagmm", "DAGMM", "methods.dagmm:DAGMM")
register("f_anogan", "f-AnoGAN", "methods.f_anogan:FAnoGAN")
register("memae", "MemAE", "methods.memae:MemAE")
register("ganomaly", "GANomaly", "methods.ganomaly:GANomaly")
register("dsvdd", "DSVDD", "methods.dsvdd:DeepSVDD")
register("mem_ganomaly", "Mem_GANomaly", "methods.mem_ganomaly:MemGANomaly")


def get_method(name: str) -> MethodSpec:
    """Look a method up by CLI name; `pyod:<module>` wraps any pyod model. KeyError if unknown."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("pyod:"):
        from methods.pyod_adapter import find_pyod_class

        model = name.split(":", 1)[1]
        find_pyod_class(model)  # raises KeyError with the reason if pyod has no such model
        return MethodSpec(name, f"pyod:{model}", "methods.pyod_adapter:PyODDetector", {"model": model})
    raise KeyError(name)
