"""The registry (strict settings look-up), the pyod adapter and the iForest detector. The
contract every registered detector keeps is in test_detector_contract.py."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from methods import REGISTRY, MethodSpec, get_method
from methods.iforest import IsolationForest
from methods.pyod_adapter import PyODDetector

PAPER_COLUMNS = {"iforest": "iForest", "dagmm": "DAGMM", "f_anogan": "f-AnoGAN", "memae": "MemAE",
                 "ganomaly": "GANomaly", "dsvdd": "DSVDD", "mem_ganomaly": "Mem_GANomaly"}


def test_registry_starts_with_the_paper_methods_in_column_order():
    # Detectors registered later (plugins, the README example) come after the paper's seven.
    assert {name: REGISTRY[name].label for name in list(REGISTRY)[:7]} == PAPER_COLUMNS
    assert list(REGISTRY)[:7] == list(PAPER_COLUMNS)


def test_settings_never_fall_back_silently(monkeypatch):
    import types

    module = types.ModuleType("fake_profiles")
    module.PROFILES = {"paper": {"mnist": {"epochs": 60}}, "smoke": {"*": {"epochs": 1}}}
    monkeypatch.setitem(__import__("sys").modules, "fake_profiles", module)
    spec = MethodSpec("fake", "Fake", "fake_profiles:Nothing")
    assert spec.settings("paper", "mnist") == {"epochs": 60} and spec.settings("smoke", "svhn") == {"epochs": 1}
    with pytest.raises(ValueError, match=r"'fake'.*dataset 'svhn'.*profile 'paper'"):
        spec.settings("paper", "svhn")  # not the full default budget
    with pytest.raises(ValueError, match=r"'fake'.*profile 'quick'"):
        spec.settings("quick", "mnist")


def test_iforest_uses_pyod_defaults():
    X = np.random.default_rng(0).random((20, 1, 4, 4), dtype=np.float32)
    detector = IsolationForest(random_state=0).fit(X)
    assert detector.estimator_.n_estimators == 100 and detector.estimator_.max_samples == "auto"
    assert detector.estimator_.max_features == 1.0 and detector.estimator_.bootstrap is False


def test_any_pyod_model_by_name(separable_task):
    X_train, X_test, y_test = separable_task(n_train=60, channels=3, size=32)
    spec = get_method("pyod:knn")
    detector = spec.load()(**spec.settings("paper", "cifar10")).fit(X_train)
    assert type(detector.estimator_).__name__ == "KNN"
    assert roc_auc_score(y_test, detector.decision_function(X_test)) > 0.9


def test_unknown_methods():
    with pytest.raises(KeyError):
        get_method("nonexistent")
    with pytest.raises(KeyError, match="pyod"):
        get_method("pyod:not_a_model")


def test_bad_hyperparameters_and_inputs():
    for bad in ({"n_estimators": 0}, {"max_samples": 0}, {"max_samples": 1.5}, {"max_features": 0.0},
                {"bootstrap": 1}, {"n_jobs": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            IsolationForest(**bad).check_params()
    with pytest.raises(ValueError, match="random_state"):
        PyODDetector(random_state=-1).check_params()
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        IsolationForest().fit(np.zeros((5, 784), np.float32))
    detector = IsolationForest().fit(np.random.default_rng(0).random((20, 1, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="do not match"):
        detector.decision_function(np.zeros((3, 3, 4, 4), np.float32))
