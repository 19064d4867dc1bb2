"""Tables from records alone: paper numbers beside ours, dashes for missing cells, markers for
failed / diverged cells, bold best, Table 4 means."""
import numpy as np
import pandas as pd
import pytest

from benchmark.records import SCHEMA_VERSION, JobKey, write_record
from benchmark.reports import TABLE4_CSV, load_records, reference_table, write_reports
from test_readme_example import register_readme_example


def registered_labels() -> list[str]:
    from methods import REGISTRY

    return [spec.label for spec in REGISTRY.values()]


def _record(dataset, normal_class, method, status="ok", auroc=0.5, seed=0, gmean=0.5, far=0.1, miss=0.2):
    metrics = ({"auroc": auroc, "gmean": gmean, "false_alarm_rate": far, "miss_rate": miss, "threshold": 0.5}
               if status == "ok" else None)
    return {"schema_version": SCHEMA_VERSION, "dataset": dataset, "normal_class": normal_class, "method": method,
            "seed": seed, "profile": "quick", "protocol": "paper", "status": status, "metrics": metrics}


def _write(results, record):
    key = JobKey(record["dataset"], record["normal_class"], record["method"], record["seed"], "quick", "paper")
    scores = np.array([0.1, 0.9]) if record["status"] == "ok" else None
    write_record(results, key, record, scores, np.array([0, 1]))


@pytest.fixture(params=[False, True], ids=["registry", "registry+readme-example"])
def reports(tmp_path, request, monkeypatch):
    """The report tests run twice: with the registry as shipped, and with the README's example
    detector registered (adding a detector must break none of them)."""
    results, out = tmp_path / "results", tmp_path / "reports"
    if request.param:
        register_readme_example(monkeypatch)
        for c in range(10):
            _write(results, _record("mnist", c, "mean_distance", auroc=0.6, gmean=0.4))
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


def test_all_tables_in_markdown_and_latex(reports):
    folder, files = reports
    names = sorted(p.name for p in files)
    for stem in ("table1_mnist_auroc", "table2_fashion_mnist_auroc", "table3_cifar10_auroc",
                 "table4_mnist_threshold_metrics"):
        assert f"{stem}.md" in names and f"{stem}.tex" in names
    assert "records.csv" in names
    assert "\\begin{tabular}" in (folder / "table1_mnist_auroc.tex").read_text()


def test_table1_cells(reports):
    folder, _ = reports
    text = (folder / "table1_mnist_auroc.md").read_text()
    row0 = next(line for line in text.splitlines() if line.startswith("| 0 "))
    cells = [c.strip() for c in row0.strip("|").split("|")]
    header = next(line for line in text.splitlines() if line.startswith("| normal class"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[1:] == registered_labels()  # the paper's seven in its column order, then any added
    cell = dict(zip(columns, cells))
    assert cell["iForest"] == "0.8000 (0.8816)"                 # ours (paper)
    assert cell["GANomaly"] == "**0.8500** (0.9890)"            # mean of seeds .95 and .75, best in row
    assert cell["DAGMM"] == "diverged (0.7827)"
    assert cell["DSVDD"] == "– (0.9862)"                        # unreadable record = missing, never zero
    assert cell["MemAE"] == "– (0.9690)"
    if "MeanDistance" in cell:
        assert cell["MeanDistance"] == "0.6000 (–)"                # an added method: no paper number
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 "))
    assert "failed (0.9331)" in row1
    mean_row = next(line for line in text.splitlines() if line.startswith("| mean"))
    assert "0.8450 (0.7678)" in mean_row                        # mean of 0.80..0.89
    assert "[1/10 classes]" in mean_row                         # DAGMM has one ok class
    assert "Unreadable records" in text and "class0_seed0.json" in text


def test_difference_table_and_table4(reports):
    folder, _ = reports
    text = (folder / "table1_mnist_auroc.md").read_text()
    diff_part = text.split("Difference")[1]
    row0 = next(line for line in diff_part.splitlines() if line.startswith("| 0 "))
    assert "-0.0816" in row0                                    # 0.8000 - 0.8816
    row9 = next(line for line in diff_part.splitlines() if line.startswith("| 9 "))
    assert "+0.1193" in row9                                    # 0.8900 - 0.7707, sign kept
    t4 = (folder / "table4_mnist_threshold_metrics.md").read_text()
    header = next(line for line in t4.splitlines() if line.startswith("| metric"))
    table4_order = list(reference_table(TABLE4_CSV).columns)  # the paper's Table 4 order, then the rest
    assert table4_order == ["f-AnoGAN", "DAGMM", "MemAE", "GANomaly", "DSVDD", "Mem_GANomaly"]
    assert [c.strip() for c in header.strip("|").split("|")][1:] == table4_order + [
        label for label in registered_labels() if label not in table4_order]
    gmean_row = next(line for line in t4.splitlines() if line.startswith("| gmean"))
    assert "0.5000 (0.9013)" in gmean_row                       # GANomaly mean gmean (paper .9013)
    assert "0.7000 (–)" in gmean_row                            # iForest: not in the paper's Table 4


def test_records_csv_is_long_format(reports):
    folder, _ = reports
    frame = pd.read_csv(folder / "records.csv")
    assert len(frame) == 33 + 10 * ("MeanDistance" in registered_labels())
    assert set(frame["status"]) == {"ok", "failed", "diverged"}


def test_reference_tables_are_packaged():
    table = reference_table("table1_mnist_auroc.csv")
    assert table.loc["mean", "Mem_GANomaly"] == pytest.approx(0.9687)
    assert table.drop(index="mean").mean()["GANomaly"] == pytest.approx(0.9591, abs=1e-4)


def test_load_records_reports_problems(tmp_path):
    (tmp_path / "quick" / "x").mkdir(parents=True)
    (tmp_path / "quick" / "x" / "a.json").write_text('{"schema_version": 0, "dataset": "mnist"}')
    frame, problems = load_records(tmp_path, "quick")
    assert frame.empty and len(problems) == 1 and "a.json" in problems[0]
