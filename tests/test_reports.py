"""Tables from records alone: paper numbers beside ours, dashes for missing cells, markers for
failed / diverged cells, bold best among complete values, columns and tables only for what was run,
Table 4 means (one row per method)."""

import numpy as np
import pandas as pd
import pytest

from benchmark.records import SCHEMA_VERSION, JobKey, write_record
from benchmark.reports import load_records, reference_table, write_reports
from test_readme_example import register_readme_example


def _record(dataset, normal_class, method, status="ok", auroc=0.5, seed=0, gmean=0.5, far=0.1, miss=0.2):
    metrics = (
        {"auroc": auroc, "gmean": gmean, "false_alarm_rate": far, "miss_rate": miss, "threshold": 0.5}
        if status == "ok"
        else None
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "normal_class": normal_class,
        "method": method,
        "seed": seed,
        "profile": "quick",
        "protocol": "paper",
        "status": status,
        "metrics": metrics,
    }


def _write(results, record):
    key = JobKey(record["dataset"], record["normal_class"], record["method"], record["seed"], "quick", "paper")
    scores = np.array([0.1, 0.9]) if record["status"] == "ok" else None
    write_record(results, key, record, scores, np.array([0, 1]))


@pytest.fixture(params=[False, True], ids=["registry", "registry+readme-example"])
def reports(tmp_path, request, monkeypatch):
    """Every report test runs twice: with the registry as shipped and with the README's example
    detector registered (registering a detector must change no table of the others)."""
    if request.param:
        register_readme_example(monkeypatch)
    results, out = tmp_path / "results", tmp_path / "reports"
    for c in range(10):
        _write(results, _record("mnist", c, "iforest", auroc=0.8 + c / 100, gmean=0.7, far=0.2, miss=0.3))
        _write(results, _record("mnist", c, "ganomaly", auroc=0.95, seed=0))
        _write(results, _record("mnist", c, "ganomaly", auroc=0.75, seed=1))
    _write(results, _record("mnist", 0, "dagmm", status="diverged"))
    _write(results, _record("mnist", 1, "dagmm", status="failed"))
    _write(results, _record("mnist", 2, "dagmm", auroc=0.99))
    (results / "quick" / "paper" / "mnist" / "dsvdd").mkdir(parents=True)
    (results / "quick" / "paper" / "mnist" / "dsvdd" / "class0_seed0.json").write_text('{"dataset": "mnist", "trunc')
    files = write_reports(results, out, "quick")
    return out / "quick", files


def test_tables_only_for_datasets_with_records(reports):
    folder, files = reports
    names = sorted(p.name for p in files)
    assert names == [
        "index.html",
        "records.csv",
        "roc_mnist.png",
        "seeds_mnist.md",  # the reproduction verdict (benchmark/verdict.py)
        "table1_mnist_auroc.md",
        "table1_mnist_auroc.png",
        "table1_mnist_auroc.tex",
        "table4_mnist_threshold_metrics.md",
        "table4_mnist_threshold_metrics.tex",
    ]
    assert "\\begin{tabular}" in (folder / "table1_mnist_auroc.tex").read_text()


def test_stale_tables_of_datasets_without_records_are_removed(tmp_path):
    results, out = tmp_path / "results", tmp_path / "reports"
    _write(results, _record("fashion_mnist", 0, "iforest"))
    write_reports(results, out, "quick")
    assert (out / "quick" / "table2_fashion_mnist_auroc.md").is_file()
    (results / "quick" / "paper" / "fashion_mnist" / "iforest" / "class0_seed0.json").unlink()
    _write(results, _record("mnist", 0, "iforest"))
    write_reports(results, out, "quick")
    left = sorted(p.name for p in (out / "quick").iterdir())
    assert not [name for name in left if "fashion" in name] and "table1_mnist_auroc.md" in left


def test_table1_cells(reports):
    folder, _ = reports
    text = (folder / "table1_mnist_auroc.md").read_text()
    row0 = next(line for line in text.splitlines() if line.startswith("| 0 "))
    cells = [c.strip() for c in row0.strip("|").split("|")]
    header = next(line for line in text.splitlines() if line.startswith("| normal class"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    # Only the methods with records, in the paper's order: DSVDD's one record is unreadable, MemAE has none.
    assert columns[1:] == ["iForest", "DAGMM", "GANomaly"]
    cell = dict(zip(columns, cells))
    assert cell["iForest"] == "0.8000 (0.8816)"  # ours (paper)
    assert cell["GANomaly"] == "**0.8500** (0.9890)"  # mean of seeds .95 and .75, best in row
    assert cell["DAGMM"] == "diverged (0.7827)"
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 "))
    assert "failed (0.9331)" in row1
    row2 = dict(
        zip(
            columns,
            [
                c.strip()
                for c in next(line for line in text.splitlines() if line.startswith("| 2 ")).strip("|").split("|")
            ],
        )
    )
    assert row2["DAGMM"] == "**0.9900** (0.6908)" and row2["GANomaly"] == "0.8500 (0.8980)"
    mean = dict(
        zip(
            columns,
            [
                c.strip()
                for c in next(line for line in text.splitlines() if line.startswith("| mean")).strip("|").split("|")
            ],
        )
    )
    assert mean["iForest"] == "0.8450 (0.7678)"  # mean of 0.80..0.89
    assert mean["GANomaly"] == "**0.8500** (0.9591)"  # best complete mean
    assert mean["DAGMM"] == "0.9900 [1/10 classes] (0.7335)"  # higher, but partial: never bold
    assert "Unreadable records" in text and "class0_seed0.json" in text


def test_difference_table_and_table4(reports):
    folder, _ = reports
    text = (folder / "table1_mnist_auroc.md").read_text()
    diff_part = text.split("ours minus the paper's")[1]
    row0 = next(line for line in diff_part.splitlines() if line.startswith("| 0 "))
    assert "-0.0816" in row0  # 0.8000 - 0.8816
    row9 = next(line for line in diff_part.splitlines() if line.startswith("| 9 "))
    assert "+0.1193" in row9  # 0.8900 - 0.7707, sign kept
    assert "| 0 | -0.0816 | – | -0.1390 |" in diff_part  # DAGMM diverged on class 0: no difference
    t4 = (folder / "table4_mnist_threshold_metrics.md").read_text()
    rows = [line for line in t4.splitlines() if line.startswith("| ") and not line.startswith(("| ---", "| method"))]
    assert [r.split("|")[1].strip() for r in rows] == ["iForest", "DAGMM", "GANomaly"]  # Table 1's order
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in rows}
    assert cells["GANomaly"] == ["0.5000 (0.9013)", "**0.1000** (0.1018)", "**0.2000** (0.0950)"]
    assert cells["iForest"] == ["**0.7000** (–)", "0.2000 (–)", "0.3000 (–)"]  # not in the paper's Table 4
    assert cells["DAGMM"][0] == "0.5000 [1/10 classes] (0.6858)"


def test_records_csv_is_long_format(reports):
    folder, _ = reports
    frame = pd.read_csv(folder / "records.csv")
    assert len(frame) == 33 and set(frame["status"]) == {"ok", "failed", "diverged"}


def test_reference_tables_are_packaged():
    table = reference_table("table1_mnist_auroc.csv")
    assert table.loc["mean", "Mem_GANomaly"] == pytest.approx(0.9687)
    assert table.drop(index="mean").mean()["GANomaly"] == pytest.approx(0.9591, abs=1e-4)


def test_load_records_reports_problems(tmp_path):
    (tmp_path / "quick" / "x").mkdir(parents=True)
    (tmp_path / "quick" / "x" / "a.json").write_text('{"schema_version": 0, "dataset": "mnist"}')
    frame, problems = load_records(tmp_path, "quick")
    assert frame.empty and len(problems) == 1 and "a.json" in problems[0]
