"""The contract every registered detector keeps, checked for each entry of the registry (a new
detector gets these tests by registering) and for the README's example detector: one float64
score per image, finite, whatever the other images of its batch; images of another shape than
the training images rejected; a JSON-serialisable `training_log_`; bit-identical scores for a
fixed seed on the CPU (and, where the seed is plumbed by a shared base class, other scores for
another seed); anomalies scoring higher on obviously separable images; a bad hyperparameter
rejected by an error that names it, by `check_params` and by `fit`; a non-finite loss and a huge
learning rate ending training with `DivergedError`; the epoch callback called after each epoch
with a model that scores, without changing what is trained; every PROFILES entry valid for every
profile and dataset, and a declared default (``"*"``) in every profile, so a newly registered
dataset gets settings from every detector.

Only the public API is used (constructor, `check_params`, `fit(X, epoch_callback=...)`,
`decision_function`, `training_log_`, `DivergedError`, the registry's settings), so the tests hold
whatever the training engine's internals. Each check runs the method's `smoke` settings (networks
narrowed where the smoke profile keeps the paper's widths). What cannot be derived from the
public API is declared per detector in the tables below (a new detector without an entry gets the
derived checks): SEPARABLE, the budget a method needs to learn the separable task;
OUT_OF_RANGE, values of the right kind that its hyperparameters' ranges exclude; DIVERGENCE_BUDGET,
enough steps for a huge learning rate to blow up; EPOCH_CALLBACK, a two-epoch budget and the
epochs the callback sees.
"""
from __future__ import annotations

import json
import math
import numbers

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmark.datasets import dataset_names
from benchmark.profiles import PROFILE_NAMES
from conftest import make_separable_task
from methods import DEFAULT, REGISTRY, get_method
from methods.base import DivergedError
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
# Values of the right kind that a hyperparameter's range excludes (zero counts and rates, upper
# bounds, malformed tuples, hyperparameters whose default is None). Values derived from the kind of
# each hyperparameter (`_derived_bad_values`: a string, NaN, infinity, a fraction for an integer, a
# negative number, ...) are checked for every detector without being listed here.
OUT_OF_RANGE: dict[str, list[tuple[str, object]]] = {
    "ganomaly": [("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("beta1", 1.0), ("nz", 0), ("ngf", 0),
                 ("max_steps", 0), ("score_batch_size", 0)],
    "mem_ganomaly": [("memory_size", 0), ("shrink_threshold", -0.1), ("shrink_threshold", 1.0), ("eps", 0.0),
                     ("eta_w", -1.0), ("eta_con", math.inf), ("lr", 0.0), ("epochs", 0), ("beta1", 1.5)],
    "memae": [("num_slots", 0), ("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("shrink_threshold", -0.01),
              ("shrink_threshold", 1.0), ("widths", ()), ("widths", (8, 0)), ("max_steps", 0),
              ("score_batch_size", 0)],
    "dsvdd": [("nu", 0.0), ("nu", 1.5), ("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("lr_milestones", (0,)),
              ("center_eps", 0.0), ("minmax", (1.0, 0.0)), ("minmax", (1.0,)), ("lr_decay_at_epoch_start", None),
              ("max_steps", 0), ("ae_max_steps", 0)],
    "f_anogan": [("gan_epochs", 0), ("encoder_max_steps", 0), ("n_critic", 0), ("gan_lr", 0.0), ("gan_beta1", 1.0),
                 ("image_size", 28), ("gan_max_steps", 0)],
    "dagmm": [("epochs", 0), ("latent_dim", 0), ("estimation_hidden", 0), ("hidden_dims", (16, 0)),
              ("dropout", 1.0), ("lr", 0.0), ("eps", 0.0), ("grad_clip_norm", -5.0)],
}
# Hyperparameters for which a negative number is a valid setting.
NEGATIVE_ALLOWED = {"iforest": {"n_jobs"}}  # -1 = all cores
# Constructor arguments over the smoke settings that give a huge learning rate a few steps to blow
# up in (the smoke budget of these detectors is a single step per stage on 48 images).
DIVERGENCE_BUDGET = {"memae": dict(batch_size=16, epochs=3, max_steps=None),
                     "dsvdd": dict(batch_size=16, epochs=3, max_steps=None)}
# (constructor arguments over the smoke settings: two epochs where the method trains in epochs,
# the epochs the callback sees on 48 training images). Without an entry: the smoke settings, and
# the callback's epochs need only be consecutive.
EPOCH_CALLBACK = {
    "ganomaly": (dict(epochs=2, max_steps=None), [1, 2]),
    "mem_ganomaly": (dict(epochs=2, max_steps=None), [1, 2]),
    "memae": (dict(epochs=2, max_steps=None), [1, 2]),
    # SVDD epochs only: no centre (so no score) exists during the autoencoder's pretraining.
    "dsvdd": (dict(epochs=2, max_steps=None), [1, 2]),
    "dagmm": (dict(epochs=2), [1, 2]),
    # The encoder stage only (the GAN alone cannot score), its epochs numbered after the GAN's one
    # epoch: 4 encoder steps at 3 batches per epoch are epochs 2 and 3.
    "f_anogan": ({}, [2, 3]),
    "iforest": ({}, [1]),  # one fit, reported as one epoch
}
SHAPES = [(1, 28), (3, 32)]
SHAPE_IDS = ["1x28x28", "3x32x32"]


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
                                       size=shape[1]) for shape in SHAPES}


@pytest.fixture(scope="module")
def smoke_fits(tasks):
    """name -> shape -> the detector fitted (seed 0, smoke settings) on that shape's task, fitted on
    first use and shared by the tests that only score."""
    fits: dict[str, dict[tuple[int, int], object]] = {}

    def fitted(name: str, shape: tuple[int, int]):
        by_shape = fits.setdefault(name, {})
        if shape not in by_shape:
            by_shape[shape] = build(name, random_state=0).fit(tasks[shape][0])
        return by_shape[shape]

    return fitted


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_one_finite_float64_score_per_image(name, shape, tasks, smoke_fits):
    X_test = tasks[shape][1]
    scores = smoke_fits(name, shape).decision_function(X_test)
    assert isinstance(scores, np.ndarray) and scores.shape == (len(X_test),) and scores.dtype == np.float64
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_a_score_does_not_depend_on_the_other_images_of_its_batch(name, shape, tasks, smoke_fits):
    X_test = tasks[shape][1]
    detector = smoke_fits(name, shape)
    together = detector.decision_function(X_test)
    # Eval mode (BatchNorm on running statistics, no dropout); float32 kernels chosen by batch size
    # may differ in the last bits.
    np.testing.assert_allclose(detector.decision_function(X_test[:3]), together[:3], rtol=1e-5)
    np.testing.assert_allclose(detector.decision_function(X_test[5:6]), together[5:6], rtol=1e-5)


def test_images_of_another_shape_are_a_value_error(name, tasks, smoke_fits):
    detector = smoke_fits(name, (1, 28))
    X_test = tasks[(1, 28)][1]
    with pytest.raises(ValueError):
        detector.decision_function(np.pad(X_test, ((0, 0), (0, 0), (1, 1), (1, 1))))  # 1 x 30 x 30


def test_training_log_is_a_json_serialisable_dict(name, smoke_fits):
    log = smoke_fits(name, (1, 28)).training_log_
    assert isinstance(log, dict)
    assert json.loads(json.dumps(log)) is not None


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


def _hyperparameter_examples(name: str) -> dict[str, object]:
    """Each hyperparameter's default, or where that is None its first value in PROFILES (None
    when it has neither): what its kind is read from."""
    spec = get_method(name)
    examples = spec.load()().get_params()
    for by_dataset in spec.profiles().values():
        for settings in by_dataset.values():
            for key, value in settings.items():
                if examples.get(key) is None:
                    examples[key] = value
    return examples


def _derived_bad_values(name: str) -> list[tuple[str, object]]:
    """Values every hyperparameter of a kind rejects: a string for a number, a bool or a tuple; an
    unknown choice for a string; NaN and infinity for a real number; a fraction for an integer; a
    number for a tuple; a negative number (unless NEGATIVE_ALLOWED)."""
    bad: list[tuple[str, object]] = []
    for key, value in _hyperparameter_examples(name).items():
        negative_ok = key in NEGATIVE_ALLOWED.get(name, set())
        if isinstance(value, bool):
            bad.append((key, "yes"))
        elif isinstance(value, numbers.Integral):
            bad += [(key, "not-a-number"), (key, 1.5)] + ([] if negative_ok else [(key, -1)])
        elif isinstance(value, numbers.Real):
            bad += [(key, "not-a-number"), (key, math.nan), (key, math.inf)] + ([] if negative_ok else [(key, -1.0)])
        elif isinstance(value, str):
            bad.append((key, "no-such-choice"))
        elif isinstance(value, tuple):
            bad += [(key, "not-a-tuple"), (key, 1)]
    return bad


def test_a_bad_hyperparameter_is_an_error_naming_it(name, tasks):
    cls = get_method(name).load()
    derived = _derived_bad_values(name)
    assert derived, f"{name} has no hyperparameter whose bad values can be derived"
    X_train = tasks[(1, 28)][0]
    for key, value in [*derived, *OUT_OF_RANGE.get(name, [])]:
        with pytest.raises(ValueError, match=key):
            cls(**{key: value}).check_params()
        with pytest.raises(ValueError, match=key):  # fit checks too, before any work
            cls(**{key: value}).fit(X_train)


def _learning_rates(name: str) -> list[str]:
    """The learning-rate hyperparameters (``lr``, ``<stage>_lr``): none for a detector that does
    not train by gradient steps."""
    return [key for key in get_method(name).load()().get_params() if key == "lr" or key.endswith("_lr")]


def test_a_non_finite_loss_is_a_diverged_error_at_its_epoch_and_step(name, tasks):
    if not _learning_rates(name):
        pytest.skip(f"{name} does not train by gradient steps")
    X_train = tasks[(1, 28)][0]
    with pytest.raises(DivergedError) as info:  # NaN images: the very first loss is NaN
        build(name, random_state=0).fit(np.full_like(X_train, np.nan))
    assert (info.value.epoch, info.value.step) == (1, 1)  # both counted from 1


def test_a_huge_learning_rate_is_a_diverged_error(name, tasks):
    """Each learning rate alone (so every stage of a detector that trains in stages)."""
    if not _learning_rates(name):
        pytest.skip(f"{name} does not train by gradient steps")
    X_train = tasks[(1, 28)][0]
    for key in _learning_rates(name):
        with pytest.raises(DivergedError):
            build(name, **DIVERGENCE_BUDGET.get(name, {}), **{key: 1e30}, random_state=0).fit(X_train)


def test_epoch_callback_runs_after_each_epoch_on_a_model_that_scores(name, tasks):
    overrides, expected_epochs = EPOCH_CALLBACK.get(name, ({}, None))
    X_train, X_test, _ = tasks[(1, 28)]
    seen = []

    def callback(epoch, detector):  # as the runner's per-epoch diagnostic: score the current model
        seen.append((epoch, detector, detector.decision_function(X_test)))

    detector = build(name, **overrides, random_state=0)
    final = detector.fit(X_train, epoch_callback=callback).decision_function(X_test)
    epochs = [epoch for epoch, _, _ in seen]
    if expected_epochs is not None:
        assert epochs == expected_epochs
    if epochs:
        assert epochs == list(range(epochs[0], epochs[0] + len(epochs)))
    assert all(passed is detector for _, passed, _ in seen)
    assert all(np.isfinite(scores).all() for _, _, scores in seen)
    if seen:  # the last epoch's model is the fitted one
        np.testing.assert_allclose(seen[-1][2], final, rtol=1e-7)
    # The callback's scoring never changes what is trained.
    plain = build(name, **overrides, random_state=0).fit(X_train).decision_function(X_test)
    np.testing.assert_array_equal(plain, final)


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
