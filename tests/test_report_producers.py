"""Report sections as producers (benchmark/render.py: Section, Producer; benchmark/reports.py: PRODUCERS),
the one reading of the records behind the reports and the verdict, and the detectors' own word on
which of them have a memory (benchmark/labels.py: memory_size_param)."""
from __future__ import annotations

import pandas as pd
import pytest

from benchmark import records
from benchmark.labels import _declared_attribute, memory_size_param
from benchmark.render import Figure, Producer, ReportContext, ReportTable, Section
from benchmark.reports import PRODUCERS, write_reports
from benchmark.verdict import memory_health_rows, memory_health_table
from methods import REGISTRY
from record_factory import write_fake_record

HEALTH = {"per_epoch": {"memory_slots_in_use": [7.0, 5.0], "memory_slots_per_query": [2.0, 1.5],
                        "memory_max_weight": [0.5, 0.8], "query_norm": [3.0, 4.0], "memory_row_norm": [1.0, 1.1]}}


# ---- which detectors have a memory ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(REGISTRY))
def test_memory_size_param_is_what_the_detector_class_says(name):
    """Read from the source without importing it (the report path loads no torch): the same answer as
    the imported class's attribute."""
    assert memory_size_param(name) == REGISTRY[name].load().memory_size_param


def test_memory_size_param_of_the_paper_detectors_and_of_unknown_names():
    assert {name: memory_size_param(name) for name in ("memae", "mem_ganomaly", "ganomaly", "iforest")} == {
        "memae": "num_slots", "mem_ganomaly": "memory_size", "ganomaly": None, "iforest": None}
    assert memory_size_param("pyod:knn") is None and memory_size_param("no_such_method") is None


def test_declared_attribute_follows_the_bases_as_python_does(tmp_path, monkeypatch):
    package = tmp_path / "fakedetectors"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("from typing import ClassVar, Optional\n\n\nclass Base:\n"
                                     "    memory_size_param: ClassVar[Optional[str]] = None\n")
    (package / "child.py").write_text(
        "from fakedetectors.base import Base\n\n\n"
        "class WithMemory(Base):\n    memory_size_param = 'slots'\n\n\n"
        "class Inherits(WithMemory):\n    pass\n\n\n"
        "class Resets(WithMemory):\n    memory_size_param = None\n\n\n"
        "class Plain(Base):\n    other = 'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = {name: _declared_attribute("fakedetectors.child", name, "memory_size_param")
             for name in ("WithMemory", "Inherits", "Resets", "Plain", "Missing")}
    assert found == {"WithMemory": "slots", "Inherits": "slots", "Resets": None, "Plain": None, "Missing": None}


# ---- one reading of the records ---------------------------------------------------------------------
def test_write_reports_reads_each_record_once(tmp_path, monkeypatch):
    results = tmp_path / "results"
    for seed in (0, 1):
        write_fake_record(results, "mnist", 0, "mem_ganomaly", 0.9, seed=seed, training_log=HEALTH,
                          hyperparameters={"memory_size": 50})
        write_fake_record(results, "mnist", 0, "ganomaly", 0.8, seed=seed, training_log=HEALTH)
    reads = []
    real = records.read_record
    monkeypatch.setattr(records, "read_record", lambda path: reads.append(path.name) or real(path))
    names = {path.name for path in write_reports(results, tmp_path / "reports", "quick")}
    assert len(reads) == 4 and len(set(reads)) == 2  # two files per seed folder name: each path once
    assert "memory_health_mnist.md" in names
    # GANomaly logged a memory health but has no memory (its memory_size_param is None): not shown.
    health = (tmp_path / "reports" / "quick" / "memory_health_mnist.md").read_text()
    assert "| Mem_GANomaly | 0 | 2 | 2 | 5.0 / 50 |" in health and "| GANomaly |" not in health


def test_memory_health_rows_come_from_the_frame():
    frame = pd.DataFrame({
        "dataset": ["mnist"] * 4, "normal_class": [0, 0, 1, 1], "label": ["MemAE", "GANomaly", "MemAE", "MemAE"],
        "seed": [0, 0, 0, 1], "status": ["ok", "ok", "ok", "failed"],
        "memory_size_param": ["num_slots", None, "num_slots", "num_slots"],
        "memory_size": pd.Series([100, None, None, 100], dtype=object),
        "per_epoch": [HEALTH["per_epoch"], HEALTH["per_epoch"], HEALTH["per_epoch"], HEALTH["per_epoch"]]})
    rows = memory_health_rows(frame)
    # Not GANomaly (no memory), not the failed record; a record without its size keeps None.
    assert rows[["label", "normal_class", "epochs"]].values.tolist() == [["MemAE", 0, 2], ["MemAE", 1, 2]]
    assert rows["slots"].iloc[0] == 100 and pd.isna(rows["slots"].iloc[1])
    assert rows["query_norm"].tolist() == [4.0, 4.0]
    table = memory_health_table(rows, "mnist")
    assert table["slots in use"].tolist() == ["5.0 / 100", "5.0"]  # the size where the record says it


# ---- producers ---------------------------------------------------------------------------------------
def test_one_new_producer_is_one_more_section_its_files_and_their_removal(tmp_path):
    results, out = tmp_path / "results", tmp_path / "reports"
    write_fake_record(results, "mnist", 0, "ganomaly", 0.8)
    write_fake_record(results, "mnist", 0, "ganomaly", 0.8, protocol="standard")

    def extra(context: ReportContext) -> list[Section]:
        rows = context.frame.groupby("label")["auroc"].mean()
        table = ReportTable(caption="Extra", label=f"extra_mnist{context.suffix}",
                            frame=rows.map("{:.2f}".format).to_frame("auroc"))
        return [Section("extra_mnist", f"Extra ({context.where})", [table], context.footer,
                        [Figure("extra_plot_mnist", "A figure", b"\x89PNG fake")], latex=True)]

    producer = Producer("extra", extra, ("extra_mnist", "extra_plot_mnist"))
    names = {path.name for path in write_reports(results, out, "quick", producers=PRODUCERS + (producer,))}
    assert {"extra_mnist.md", "extra_mnist.tex", "extra_plot_mnist.png"} <= names
    folder = out / "quick"
    assert "| GANomaly | 0.80 |" in (folder / "extra_mnist.md").read_text()
    page = (folder / "index.html").read_text()
    assert page.index("AUROC over seeds") < page.index("Extra (quick profile, paper protocol)")  # after the verdict
    assert "extra_plot_mnist.png" in page

    write_reports(results, out, "quick", "standard", producers=PRODUCERS + (producer,))
    assert (folder / "extra_mnist_standard.md").is_file()
    (folder / "unrelated.md").write_text("kept")
    # Without anything to show, the producer's files of this protocol go; the other protocol's stay.
    empty = Producer("extra", lambda context: [], producer.stems)
    names = {path.name for path in write_reports(results, out, "quick", producers=PRODUCERS + (empty,))}
    assert not {"extra_mnist.md", "extra_mnist.tex", "extra_plot_mnist.png"} & names
    assert not (folder / "extra_mnist.md").exists() and not (folder / "extra_plot_mnist.png").exists()
    assert (folder / "extra_mnist_standard.md").is_file() and (folder / "unrelated.md").read_text() == "kept"
    assert (folder / "table1_mnist_auroc.md").is_file()


def test_every_producer_declares_the_stems_of_its_files(tmp_path):
    results = tmp_path / "results"
    for method, auroc in (("ganomaly", 0.8), ("mem_ganomaly", 0.9)):
        for dataset in ("mnist", "cifar10"):
            write_fake_record(results, dataset, 0, method, auroc, training_log=HEALTH,
                              diagnostics={"best_epoch_on_test_OPTIMISTIC": {"epoch": 1, "auroc": 0.95}})
    written = {path.name for path in write_reports(results, tmp_path / "reports", "quick")}
    stems = {stem for producer in PRODUCERS for stem in producer.stems}
    section_files = written - {"records.csv", "index.html"}
    assert {name.rsplit(".", 1)[0] for name in section_files} <= stems
    assert {"seeds_cifar10.md", "memory_health_cifar10.md", "best_epoch_cifar10.md", "table3_cifar10_auroc.tex",
            "table4_mnist_threshold_metrics.md"} <= section_files
