"""The detector registry: a method's CLI name -> its label in the tables, its class, and its
per-profile, per-dataset settings (the module's `PROFILES` dict).

Adding a detector = one new file in `methods/` (a `Detector` subclass and a `PROFILES` dict)
plus one `register(...)` line below. Any pyod model is also available as `pyod:<module>`,
e.g. `pyod:knn`, `pyod:lof`, `pyod:ecod`, through `methods.pyod_adapter`.

`PROFILES` maps profile -> dataset -> constructor arguments, and every profile declares a default,
the `DEFAULT` (``"*"``) entry, with a comment saying why: the settings of each dataset without an
entry of its own. So a new dataset needs no edit to any detector, and no dataset silently gets the
constructor's (paper) defaults: a profile with neither the dataset nor ``"*"`` is an error.
tests/test_detector_contract.py checks that every registered detector declares the default.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from methods.base import Detector
from methods.pyod_adapter import find_pyod_class

#: The key of a profile's declared default in `PROFILES`: the settings of every dataset that has no
#: entry of its own under that profile.
DEFAULT = "*"


@dataclass(frozen=True)
class MethodSpec:
    """One registered detector.

    Parameters
    ----------
    name : str
        The command-line name, e.g. ``"mem_ganomaly"``.
    label : str
        The paper's label, e.g. ``"Mem_GANomaly"`` (the tables' column).
    target : str
        ``"module:Class"`` of its `Detector` subclass, imported on first use.
    fixed_params : dict
        Constructor arguments every setting gets (for generated entries such as ``pyod:<model>``).
    """

    name: str
    label: str
    target: str
    fixed_params: dict = field(default_factory=dict)

    def load(self) -> type[Detector]:
        """Import and return the detector class."""
        module_name, class_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), class_name)

    def profiles(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The module's ``PROFILES``: profile -> dataset (or `DEFAULT`, ``"*"``) -> constructor arguments."""
        module = importlib.import_module(self.target.split(":")[0])
        return getattr(module, "PROFILES", {})

    def settings(self, profile: str, dataset: str) -> dict[str, Any]:
        """Constructor arguments for one profile and dataset (``random_state``/``device`` come
        from the runner).

        Parameters
        ----------
        profile : str
            A profile name (``paper``, ``quick``, ``smoke``: benchmark/profiles.py).
        dataset : str
            A dataset name; the profile's entry for it, else the profile's declared default
            (`DEFAULT`, ``"*"``). The two are alternatives, never merged.

        Returns
        -------
        dict

        Raises
        ------
        ValueError
            When the method's ``PROFILES`` has no such profile, or the profile has neither an
            entry for the dataset nor a ``"*"`` default: a missing entry is never read as "no
            settings", which would silently mean the full paper budget.
        """
        profiles = self.profiles()
        module = self.target.split(":")[0]
        if profile not in profiles:
            raise ValueError(f"method {self.name!r} has no settings for profile {profile!r} (its PROFILES in "
                             f"{module} lists {', '.join(profiles) or 'none'})")
        by_dataset = profiles[profile]
        if dataset not in by_dataset and DEFAULT not in by_dataset:
            raise ValueError(f"method {self.name!r} has no settings for dataset {dataset!r} under profile {profile!r} "
                             f"(its PROFILES[{profile!r}] lists {', '.join(by_dataset) or 'none'} and no "
                             f"{DEFAULT!r} default); add a {DEFAULT!r} default for the profile (or an entry for "
                             f"{dataset!r}) to PROFILES in {module}")
        return {**self.fixed_params, **by_dataset.get(dataset, by_dataset.get(DEFAULT, {}))}


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, label: str, target: str) -> None:
    """Add a detector to the registry (the tables' columns follow registration order).

    Parameters
    ----------
    name : str
        The command-line name.
    label : str
        The label in the tables.
    target : str
        ``"module:Class"`` of the detector.
    """
    REGISTRY[name] = MethodSpec(name, label, target)


# In the paper's column order (Tables 1-3).
register("iforest", "iForest", "methods.iforest:IsolationForest")
register("dagmm", "DAGMM", "methods.dagmm:DAGMM")
register("f_anogan", "f-AnoGAN", "methods.f_anogan:FAnoGAN")
register("memae", "MemAE", "methods.memae:MemAE")
register("ganomaly", "GANomaly", "methods.ganomaly:GANomaly")
register("dsvdd", "DSVDD", "methods.dsvdd:DeepSVDD")
register("mem_ganomaly", "Mem_GANomaly", "methods.mem_ganomaly:MemGANomaly")
register("geom", "GEOM", "methods.geom:GEOM")
register("goad", "GOAD", "methods.goad:GOAD")


def get_method(name: str) -> MethodSpec:
    """Look a method up by command-line name; ``pyod:<module>`` wraps any pyod model.

    Parameters
    ----------
    name : str
        A registered name or ``pyod:<module>``.

    Returns
    -------
    MethodSpec

    Raises
    ------
    KeyError
        For an unknown name (for ``pyod:<module>``, with pyod's reason).
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("pyod:"):
        model = name.split(":", 1)[1]
        find_pyod_class(model)  # raises KeyError with the reason if pyod has no such model
        return MethodSpec(name, f"pyod:{model}", "methods.pyod_adapter:PyODDetector", {"model": model})
    raise KeyError(name)
