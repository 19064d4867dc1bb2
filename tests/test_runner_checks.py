"""The runner and the command line do what they claim, end to end: labels reach the metrics the
right way round (a detector with known scores gets AUROC 1, not 0), and the options no other test
runs (--track-auroc, a valid --set override, --protocol standard reports) on the real MNIST."""
from __future__ import annotations

import numpy as np
import pytest

import benchmark.jobs as jobs
from benchmark.cli import main
from benchmark.data import Dataset
from benchmark.records import JobKey, iter_records, read_record, read_scores
from benchmark.runner import Job, RunSettings, run_job
from methods.base import Detector, check_images


class Brightness(Detector):
    """Score = mean pixel value: known in advance for any image."""

    def __init__(self, random_state: int = 0) -> None:
        self.random_state = random_state

    def fit(self, X, epoch_callback=None):
        check_images(X)
        self.training_log_ = {}
        return self

    def decision_function(self, X):
        X = check_images(X)
        return X.reshape(len(X), -1).mean(axis=1).astype(np.float64)


def _dark_and_bright(n: int = 30) -> Dataset:
    """Class 0 dark images, classes 1-9 bright ones: with class 0 normal, every anomaly is brighter."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    images = np.where(labels[:, None, None, None] == 0, 20, 200) + rng.integers(0, 10, (n, 1, 4, 4))
    images = images.astype(np.uint8)
    return Dataset("mnist", images, labels, images.copy(), labels.copy(), tuple(map(str, range(10))), "fake")


def test_runner_keeps_normal_and_anomalous_labels_the_right_way_round(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "load_dataset", lambda *args, **kwargs: _dark_and_bright())
    jobs._task.cache_clear()
    key = JobKey("mnist", 0, "brightness", 0, "paper", "paper")
    settings = RunSettings(results_dir=tmp_path, data_root=None, download=False, threads_per_job=1,
                           track_auroc=False, overrides={}, provenance={})
    try:
        outcome = run_job(Job(key, "paper", {"random_state": 0}, f"{__name__}:Brightness"), settings)
    finally:
        jobs._task.cache_clear()
    assert outcome.status == "ok", outcome.message
    record = read_record(key.json_path(tmp_path))
    # Swapped labels would give AUROC 0 and every rate inverted.
    assert record["metrics"] == {"auroc": 1.0, "gmean": 1.0, "false_alarm_rate": 0.0, "miss_rate": 0.0,
                                 "threshold": pytest.approx(record["metrics"]["threshold"])}
    scores, labels = read_scores(key.scores_path(tmp_path))
    # paper protocol: test = the 3 normal test images + every anomaly of both splits (27 + 27)
    assert (labels == 0).sum() == 3 and (labels == 1).sum() == 54
    assert scores[labels == 1].min() > scores[labels == 0].max()


@pytest.fixture
def run(shared_data, tmp_path):
    def run_cli(*extra: str) -> int:
        return main(["--dataset", "mnist", "--methods", "iforest", "--classes", "0", "--profile", "smoke",
                     "--data-root", str(shared_data), "--no-download", "--no-progress",
                     "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports"), *extra])
    return run_cli


def _records(folder) -> list[dict]:
    return [record for _, record, _ in iter_records(folder)]


@pytest.mark.usefixtures("in_process")
def test_track_auroc_records_per_epoch_diagnostics_and_a_report(run, tmp_path):
    assert run("--track-auroc") == 0
    (record,) = _records(tmp_path / "results" / "smoke")
    per_epoch = record["diagnostics"]["auroc_per_epoch"]
    assert [entry["epoch"] for entry in per_epoch] == [1]  # iForest calls back once, after fitting
    assert per_epoch[0]["auroc"] == pytest.approx(record["metrics"]["auroc"])  # the final model, scored once more
    assert record["diagnostics"]["best_epoch_on_test_OPTIMISTIC"] == per_epoch[0]
    text = (tmp_path / "reports" / "smoke" / "best_epoch_mnist.md").read_text()
    assert "iForest: final" in text and f"{record['metrics']['auroc']:.4f}" in text


@pytest.mark.usefixtures("in_process")
def test_valid_set_override_goes_to_its_own_results_folder(run, tmp_path):
    assert run("--set", "n_estimators=7") == 0
    assert not (tmp_path / "results" / "smoke").exists()  # never mixed with the profile's own records
    (record,) = _records(tmp_path / "results" / "smoke+n_estimators=7")
    assert record["hyperparameters"]["n_estimators"] == 7 and record["profile"] == "smoke+n_estimators=7"
    assert record["hyperparameter_overrides"] == {"iforest": {"n_estimators": 7}}
    assert (tmp_path / "reports" / "smoke+n_estimators=7" / "table1_mnist_auroc.md").is_file()


@pytest.mark.usefixtures("in_process")
def test_standard_protocol_records_and_reports(run, tmp_path):
    assert run("--protocol", "standard") == 0
    (record,) = _records(tmp_path / "results" / "smoke")
    assert record["protocol"] == "standard" and record["status"] == "ok"
    # standard: the test split only (980 zeros, 9,020 others), capped by smoke at 100 + 200
    assert (record["sizes"]["n_test_normal"], record["sizes"]["n_test_anomalous"]) == (100, 200)
    table = (tmp_path / "reports" / "smoke" / "table1_mnist_auroc_standard.md").read_text()
    assert "standard protocol" in table and f"{record['metrics']['auroc']:.4f}" in table
    assert not (tmp_path / "reports" / "smoke" / "table1_mnist_auroc.md").exists()  # the paper protocol's name
