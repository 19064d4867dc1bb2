"""The contract every registered detector keeps, checked for each entry of the registry (a new
detector gets these tests by registering) and for the README's example detector: one float64
score per image, finite; bit-identical scores for a fixed seed on the CPU (and, where the seed is
plumbed by a shared base class, other scores for another seed); anomalies scoring higher on
obviously separable images; a bad hyperparameter rejected by an error that names it; every
PROFILES entry valid for every profile and dataset, and a declared default (``"*"``) in every
profile, so a newly registered dataset gets settings from every detector.

Each check runs the method's `smoke` settings (networks narrowed where the smoke profile keeps the
paper's widths). Where that budget is too small to learn even the separable task, SEPARABLE gives
the budget the method needs (a new detector without an entry is held to its smoke settings).
"""
from __future__ import annotations

import numbers

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmark.datasets import dataset_names
from benchmark.profiles import PROFILE_NAMES
from conftest import make_separable_task
from methods import DEFAULT, REGISTRY, get_method
from methods.pyod_adapter import PyODDetector
from methods.torch_base import TorchDetector
from test_readme_example import register_readme_example

README_EXAMPLE = "mean_distance (README example)"
METHODS = [*REGISTRY, README_EXAMPLE]
NARROW = {"ganomaly": dict(ngf=8, ndf=8, nz=8), "mem_ganomaly": dict(ngf=8, ndf=8, nz=8, memory_size=10)}
# (constructor arguments over the smoke settings, training images): small networks, a larger
# learning rate and ~100 steps, found in each method's own tests to separate for every seed tried.
SEPARABLE = {
    "f_anogan": (dict(ngf=8, ndf=8, latent_dim=8, batch_size=16, gan_epochs=16, n_critic=1, gan_lr=2e-3,
                      gan_beta1=0.5, encoder_lr=1e-3, encoder_max_steps=30, gan_max_steps=None), 48),
    "memae": (dict(num_slots=10, widths=(4, 8), epochs=3, batch_size=16, lr=1e-3, max_steps=None), 64),
    # With a few dozen steps GANomaly's latent distance is not yet fitted and its direction is
    # arbitrary (AUROC 0 or 1 by seed); from ~100 steps anomalies score higher with a wide margin.
    "ganomaly": (dict(ngf=8, ndf=8, nz=16, batch_size=16, epochs=12, lr=1e-3, max_steps=None), 128),
    "mem_ganomaly": (dict(ngf=8, ndf=8, nz=16, batch_size=16, epochs=12, memory_size=50, max_steps=None), 128),
}


@pytest.fixture(params=METHODS)
def name(request, monkeypatch) -> str:
    """A method's registry name; the README's example is registered for its test only."""
    if request.param == README_EXAMPLE:
        register_readme_example(monkeypatch)
        return "mean_distance"
    return request.param


def build(name: str, **overrides):
    spec = get_method(name)
    params = {**spec.settings("smoke", "mnist"), **NARROW.get(name, {}), **overrides}
    if "device" in spec.load()().get_params():
        params["device"] = "cpu"
    return spec.load()(**params)


@pytest.fixture(scope="module")
def tasks():
    return {shape: make_separable_task(n_train=48, n_test_normal=8, n_test_anomalous=8, channels=shape[0],
                                       size=shape[1]) for shape in ((1, 28), (3, 32))}


@pytest.mark.parametrize("shape", [(1, 28), (3, 32)], ids=["1x28x28", "3x32x32"])
def test_one_finite_float64_score_per_image(name, shape, tasks):
    X_train, X_test, _ = tasks[shape]
    scores = build(name, random_state=0).fit(X_train).decision_function(X_test)
    assert isinstance(scores, np.ndarray) and scores.shape == (len(X_test),) and scores.dtype == np.float64
    assert np.isfinite(scores).all()


def test_same_seed_same_scores_bit_for_bit(name, tasks):
    X_train, X_test, _ = tasks[(1, 28)]
    first = build(name, random_state=3).fit(X_train).decision_function(X_test)
    second = build(name, random_state=3).fit(X_train).decision_function(X_test)
    np.testing.assert_array_equal(first, second)
    # TorchDetector and the pyod adapter seed every random draw from random_state; a detector
    # of its own (the README's) may draw none.
    if issubclass(get_method(name).load(), (TorchDetector, PyODDetector)):
        other = build(name, random_state=4).fit(X_train).decision_function(X_test)
        assert not np.array_equal(first, other)


def test_anomalies_score_higher_on_separable_images(name):
    overrides, n_train = SEPARABLE.get(name, ({}, 64))
    X_train, X_test, y_test = make_separable_task(n_train=n_train, channels=1, size=28)
    scores = build(name, **overrides, random_state=0).fit(X_train).decision_function(X_test)
    assert roc_auc_score(y_test, scores) > 0.9


def _bad_values(params: dict) -> list[tuple[str, object]]:
    """A value of the wrong kind for every hyperparameter: a string for a number, an unknown
    choice for a string."""
    bad = []
    for key, value in params.items():
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            bad.append((key, "not-a-number"))
        elif isinstance(value, str):
            bad.append((key, "no-such-choice"))
    return bad


def test_a_bad_hyperparameter_is_an_error_naming_it(name, tasks):
    cls = get_method(name).load()
    bad = _bad_values(cls().get_params())
    assert bad, f"{name} has no numeric or string hyperparameter to check"
    for key, value in bad:
        with pytest.raises(ValueError, match=key):
            cls(**{key: value}).check_params()
    key, value = bad[0]
    with pytest.raises(ValueError, match=key):  # fit checks too, before any work
        cls(**{key: value}).fit(tasks[(1, 28)][0])


def test_every_profiles_entry_is_valid(name):
    spec = get_method(name)
    cls = spec.load()
    profiles = spec.profiles()
    assert set(profiles) <= set(PROFILE_NAMES), f"{name}: unknown profile in PROFILES"
    for profile, by_dataset in profiles.items():
        assert set(by_dataset) <= {DEFAULT, *dataset_names()}, f"{name}: unknown dataset in PROFILES[{profile!r}]"
    for profile in PROFILE_NAMES:
        # The declared default stands for every dataset registered later (README, "Adding a dataset").
        assert DEFAULT in profiles.get(profile, {}), f"{name}: PROFILES[{profile!r}] declares no {DEFAULT!r} default"
        for dataset in [*dataset_names(), "a_dataset_registered_later"]:
            params = spec.settings(profile, dataset)
            assert "random_state" not in params and "device" not in params  # the runner's to set
            cls(**params).check_params()
