"""Item 3 of issue 10: a threshold set without test labels, from held-out normal training images
(the same split for every method and seed), recorded beside the paper's Youden metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark.cli import main
from benchmark.data import Dataset
from benchmark.metrics import validation_threshold_metrics
from benchmark.records import iter_records
from benchmark.splits import Subsample, make_task
from fault_methods import cli_args, in_process, write_fake_mnist  # noqa: F401  (in_process is a fixture)


def _dataset(n_per_class: int = 50) -> Dataset:
    labels = np.repeat(np.arange(10), n_per_class)
    images = (np.arange(len(labels))[:, None, None, None] % 256 * np.ones((1, 1, 2, 2))).astype(np.uint8)
    return Dataset("mnist", images, labels, images[:100], labels[:100], tuple(map(str, range(10))), "test")


def test_validation_split_is_held_out_and_fixed():
    data = _dataset()
    plain = make_task(data, 3, "paper", Subsample(max_train=40))
    task = make_task(data, 3, "paper", Subsample(max_train=40), val_fraction=0.1)
    again = make_task(data, 3, "paper", Subsample(max_train=40), val_fraction=0.1)
    assert task.sizes["n_train"] == 36 and task.sizes["n_val"] == 4 and "n_val" not in plain.sizes
    assert np.array_equal(task.x_val, again.x_val) and np.array_equal(task.x_train, again.x_train)
    train, val = {x.tobytes() for x in task.x_train}, {x.tobytes() for x in task.x_val}
    assert not train & val and train | val == {x.tobytes() for x in plain.x_train}  # a split of the same images
    assert np.array_equal(task.x_test, plain.x_test) and np.array_equal(task.y_test, plain.y_test)
    assert not np.array_equal(make_task(data, 4, "paper", val_fraction=0.1).x_val[:1], task.x_val[:1])
    with pytest.raises(ValueError, match="val_fraction"):
        make_task(data, 3, val_fraction=1.0)


def test_validation_threshold_metrics_hand_worked():
    val = np.arange(1.0, 21.0)  # 1..20: 95th percentile = 19.05 (linear interpolation)
    scores = np.array([5.0, 19.0, 20.0, 25.0, 19.05, 3.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    m = validation_threshold_metrics(scores, labels, val)
    assert m["threshold"] == pytest.approx(19.05) and m["percentile"] == 95.0 and m["n_val"] == 20
    assert m["false_alarm_rate"] == pytest.approx(1 / 3)  # the normal scoring 20 is flagged
    assert m["miss_rate"] == pytest.approx(1 / 3)  # the anomaly scoring 3 is accepted (>= flags 19.05)
    assert m["gmean"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="validation scores"):
        validation_threshold_metrics(scores, labels, np.array([1.0, np.nan]))


def test_run_records_validation_scores_and_metrics(tmp_path, in_process):  # noqa: F811
    data = write_fake_mnist(tmp_path / "data").parents[1]
    results, reports = tmp_path / "results", tmp_path / "reports"
    assert main(cli_args(data, results, reports, classes=(0,))) == 0
    ((path, record, _),) = list(iter_records(results))
    assert record["method_label"] == "Slow"
    assert (
        record["sizes"]["n_val"] == 3 and record["sizes"]["n_train"] == 27 and record["sampling"]["val_fraction"] == 0.1
    )
    val = record["metrics_val_threshold"]
    assert set(val) == {"percentile", "threshold", "n_val", "gmean", "false_alarm_rate", "miss_rate"}
    with np.load(path.with_suffix(".npz")) as archive:
        assert archive["val_scores"].shape == (3,)
        expected = validation_threshold_metrics(archive["scores"], archive["labels"], archive["val_scores"])
    assert val == pytest.approx(expected)
    t4 = (reports / "smoke" / "table4_mnist_threshold_metrics.md").read_text()
    assert "95th percentile of held-out normals" in t4 and "| Slow |" in t4

    # --val-fraction 0: no split, its own results folder; a bad value is a usage error that writes nothing.
    assert main(cli_args(data, results, reports, "--val-fraction", "0", classes=(0,))) == 0
    ((_, record0, _),) = list(iter_records(results / "smoke+val0"))
    assert (
        record0["sizes"]["n_train"] == 30 and "n_val" not in record0["sizes"] and "metrics_val_threshold" not in record0
    )
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert main(cli_args(data, results, reports, "--val-fraction", "0.7", classes=(0,))) == 2
    assert main(cli_args(data, results, reports, "--val-fraction", "x", classes=(0,))) == 2
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before
    assert json.loads(path.read_text())["metrics_val_threshold"] == val
