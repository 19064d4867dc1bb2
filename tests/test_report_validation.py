"""Item 3 of issue 10: a threshold set without test labels, from held-out normal training images
(the same split for every method and seed), recorded beside the paper's Youden metrics. The held-out
run is opt-in (--val-fraction 0.1, records in <profile>+val0.1/); the default report's Table 4 takes
its label-free columns from there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from benchmark.cli import main
from benchmark.data import Dataset
from benchmark.metrics import validation_threshold_metrics
from benchmark.records import SCHEMA_VERSION, JobKey, iter_records, write_record
from benchmark.reports import write_reports
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
    # The default (--val-fraction 0): every normal training image is fitted, as the paper does.
    assert main(cli_args(data, results, reports, classes=(0,))) == 0
    ((_, record0, _),) = list(iter_records(results / "smoke"))
    assert record0["method_label"] == "Slow" and record0["sampling"]["val_fraction"] == 0.0
    assert (
        record0["sizes"]["n_train"] == 30 and "n_val" not in record0["sizes"] and "metrics_val_threshold" not in record0
    )
    t4 = (reports / "smoke" / "table4_mnist_threshold_metrics.md").read_text()
    assert "held-out normals" not in t4.split("\n\n")[2]  # the Youden columns only
    assert "--val-fraction 0.1" in t4 and "smoke+val0.1/" in t4  # how to get the label-free ones

    # --val-fraction 0.1: the opt-in held-out run, in its own results folder.
    assert main(cli_args(data, results, reports, "--val-fraction", "0.1", classes=(0,))) == 0
    ((path, record, _),) = list(iter_records(results / "smoke+val0.1"))
    assert (
        record["sizes"]["n_val"] == 3 and record["sizes"]["n_train"] == 27 and record["sampling"]["val_fraction"] == 0.1
    )
    val = record["metrics_val_threshold"]
    assert set(val) == {"percentile", "threshold", "n_val", "gmean", "false_alarm_rate", "miss_rate"}
    with np.load(path.with_suffix(".npz")) as archive:
        assert archive["val_scores"].shape == (3,)
        expected = validation_threshold_metrics(archive["scores"], archive["labels"], archive["val_scores"])
    assert val == pytest.approx(expected)
    t4 = (reports / "smoke+val0.1" / "table4_mnist_threshold_metrics.md").read_text()
    assert "95th percentile of held-out normals (no test labels)" in t4 and "| Slow |" in t4
    # The default report now takes Table 4's label-free columns from the held-out run beside it.
    assert main(cli_args(data, results, reports, "--report-only")) == 0
    t4 = (reports / "smoke" / "table4_mnist_threshold_metrics.md").read_text()
    assert "no test labels; held-out run, f = 0.1" in t4 and "trained on 90% of the normal" in t4

    # A bad value is a usage error that writes nothing.
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert main(cli_args(data, results, reports, "--val-fraction", "0.7", classes=(0,))) == 2
    assert main(cli_args(data, results, reports, "--val-fraction", "x", classes=(0,))) == 2
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before
    assert json.loads(path.read_text())["metrics_val_threshold"] == val


def _write_record(results: Path, profile: str, normal_class: int, method: str, label: str, gmean: float,
                  val: Optional[dict] = None, protocol: str = "paper") -> None:
    """One ok MNIST record; `val` = its `metrics_val_threshold` (None: made without a held-out share)."""
    record = {"schema_version": SCHEMA_VERSION, "dataset": "mnist", "normal_class": normal_class, "method": method,
              "method_label": label, "seed": 0, "profile": profile, "protocol": protocol, "status": "ok",
              "metrics": {"auroc": 0.8, "gmean": gmean, "false_alarm_rate": 0.1, "miss_rate": 0.2, "threshold": 0.5}}
    if val is not None:
        record["metrics_val_threshold"] = {"percentile": 95.0, "threshold": 0.7, "n_val": 3, **val}
        record["sizes"] = {"n_train": 27, "n_val": 3, "n_test": 2}
    key = JobKey("mnist", normal_class, method, 0, profile, protocol)
    write_record(results, key, record, np.array([0.1, 0.9]), np.array([0, 1]))


def _table4_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith(("| ---",
                                                                                                      "| method"))]
    return {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in rows}


def test_table4_label_free_columns_from_the_held_out_run_beside(tmp_path):
    """A default report (no +val tag) takes Table 4's label-free columns from <profile>+val<f>/,
    saying so; the held-out run's own report and records that carry the columns are unchanged."""
    results, reports = tmp_path / "results", tmp_path / "reports"
    for c in range(10):
        _write_record(results, "quick", c, "ganomaly", "GANomaly", gmean=0.6)
        _write_record(results, "quick", c, "iforest", "iForest", gmean=0.5)
        held_out = {"gmean": 0.4, "false_alarm_rate": 0.05, "miss_rate": 0.3}
        _write_record(results, "quick+val0.1", c, "ganomaly", "GANomaly", gmean=0.55, val=held_out)
        # Another protocol's records are not this report's.
        _write_record(results, "quick+val0.05", c, "ganomaly", "GANomaly", gmean=0.55, val=held_out,
                      protocol="standard")
    write_reports(results, reports, "quick")
    t4 = (reports / "quick" / "table4_mnist_threshold_metrics.md").read_text()
    assert "95th percentile of held-out normals (no test labels; held-out run, f = 0.1): gmean" in t4
    assert "trained on 90% of the normal images" in t4  # the caption
    assert "--val-fraction 0.1, records under quick+val0.1/" in t4 and "trained on 90% (1 - f) of the normal" in t4
    assert f"from 10 MNIST records under `{results / 'quick+val0.1'}`" in t4
    rows = _table4_rows(t4)
    assert list(rows) == ["iForest", "GANomaly"]  # the one detector order (Table 1's)
    assert rows["GANomaly"] == ["**0.6000** (0.9013)", "**0.1000** (0.1018)", "**0.2000** (0.0950)",
                                "**0.4000**", "**0.0500**", "**0.3000**"]  # Youden: ours; right: the held-out run's
    assert rows["iForest"][3:] == ["–", "–", "–"]  # not in the held-out run
    tex = (reports / "quick" / "table4_mnist_threshold_metrics.tex").read_text()
    assert "held-out run, f = 0.1" in tex and "-{}-val-fraction 0.1" in tex and "90\\%" in tex
    page = (reports / "quick" / "index.html").read_text()
    assert "held-out run, f = 0.1" in page and "trained on 90% of the normal images" in page

    # The held-out run's own report shows its own columns, as before; so do records that carry them.
    write_reports(results, reports, "quick+val0.1")
    own = (reports / "quick+val0.1" / "table4_mnist_threshold_metrics.md").read_text()
    assert "95th percentile of held-out normals (no test labels): gmean" in own and "held-out run, f" not in own
    assert _table4_rows(own)["GANomaly"][3:] == ["**0.4000**", "**0.0500**", "**0.3000**"]

    # Without a held-out run beside it: the Youden columns only, and how to get the others.
    write_reports(results, reports, "quick", "standard")
    write_reports(tmp_path / "elsewhere", reports / "x", "quick")  # no results at all: no Table 4, no error
    (results / "quick+val0.1").rename(results / "old+val0.1")
    write_reports(results, reports, "quick")
    t4 = (reports / "quick" / "table4_mnist_threshold_metrics.md").read_text()
    assert "held-out normals (no test labels" not in t4 and len(_table4_rows(t4)["GANomaly"]) == 3
    assert "run the same command again with --val-fraction 0.1" in t4 and "(quick+val0.1/)" in t4
