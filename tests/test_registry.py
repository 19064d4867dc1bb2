"""The registry, the pyod adapter and the iForest detector."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from methods import PROFILE_NAMES, REGISTRY, get_method
from methods.iforest import IsolationForest
from methods.pyod_adapter import PyODDetector


def test_registry_has_the_paper_methods_in_column_order():
    assert list(REGISTRY) == ["iforest", "dagmm", "f_anogan", "memae", "ganomaly", "dsvdd", "mem_ganomaly"]
    assert [spec.label for spec in REGISTRY.values()] == ["iForest", "DAGMM", "f-AnoGAN", "MemAE", "GANomaly", "DSVDD", "Mem_GANomaly"]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_has_settings_for_every_profile_and_dataset(name):
    spec = get_method(name)
    cls = spec.load()
    for profile in PROFILE_NAMES:
        for dataset in ("mnist", "fashion_mnist", "cifar10"):
            params = spec.settings(profile, dataset)
            cls(**params).check_params()  # accepted and valid
            assert "random_state" not in params and "device" not in params


def test_iforest_uses_pyod_defaults_and_scores_anomalies_higher(separable_task):
    X_train, X_test, y_test = separable_task(n_train=100, channels=1, size=28)
    detector = IsolationForest(random_state=0).fit(X_train)
    assert detector.estimator_.n_estimators == 100 and detector.estimator_.max_samples == "auto"
    scores = detector.decision_function(X_test)
    assert scores.shape == (len(X_test),) and scores.dtype == np.float64
    assert roc_auc_score(y_test, scores) > 0.9
    np.testing.assert_array_equal(scores, IsolationForest(random_state=0).fit(X_train).decision_function(X_test))


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
    with pytest.raises(ValueError, match="n_estimators"):
        IsolationForest(n_estimators=0).check_params()
    with pytest.raises(ValueError, match="random_state"):
        PyODDetector(random_state=-1).check_params()
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        IsolationForest().fit(np.zeros((5, 784), np.float32))
    detector = IsolationForest().fit(np.random.default_rng(0).random((20, 1, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="do not match"):
        detector.decision_function(np.zeros((3, 3, 4, 4), np.float32))
