"""benchmark.references: the published one-class results, one CSV per source paper."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark import references as refs
from benchmark.datasets import PAPER_TABLES
from benchmark.labels import reference_table

ROOT = Path(__file__).resolve().parents[1]
HEADER = "source,method,dataset,class,protocol,metric,value,citation\n"
GOOD_ROW = "demo,DSVDD,mnist,0,standard,auroc,98.0,\"Someone, Some paper, Table 1\"\n"


@pytest.fixture(scope="module")
def sources() -> pd.DataFrame:
    return refs.load_sources()


def _typed_table(name: str) -> pd.DataFrame:
    """One of benchmark/reference/table*.csv as typed from the paper, read directly (the package reads the
    source CSVs only, through benchmark.references)."""
    return pd.read_csv(ROOT / "benchmark" / "reference" / name, index_col=0)


@pytest.mark.parametrize("dataset", sorted(PAPER_TABLES))
def test_mem_ganomaly_rows_equal_the_existing_tables_exactly(dataset, sources):
    table = _typed_table(PAPER_TABLES[dataset][1])  # rows: the classes in label order, then "mean"
    ours = refs.reference_values("paper", dataset, sources=sources)
    assert list(ours.columns) == list(table.columns)
    assert list(ours.index) == list(range(len(table) - 1)) + ["mean"]
    assert (ours.to_numpy() == table.to_numpy()).all()  # exact, not approximate


@pytest.mark.parametrize("name", sorted({csv for _, csv in PAPER_TABLES.values()}
                                         | {"table4_mnist_threshold_metrics.csv"}))
def test_the_old_reader_gives_the_typed_tables_through_the_sources(name):
    assert reference_table(name).equals(_typed_table(name))  # same index, columns, order and values


def test_table4_rows_equal_the_existing_table_exactly(sources):
    table = _typed_table("table4_mnist_threshold_metrics.csv")
    for metric in table.index:
        ours = refs.reference_values("paper", "mnist", metric=metric, sources=sources)
        assert list(ours.index) == ["mean"]
        assert (ours.loc["mean"].to_numpy() == table.loc[metric, ours.columns].to_numpy()).all()
        assert list(ours.columns) == list(table.columns)


def test_values_are_stored_in_percent_as_published(sources):
    percent = refs.reference_values("standard", "cifar10", unit="percent", sources=sources)
    assert percent.loc[0, "DSVDD"] == 61.7
    assert percent.loc["mean", "GOAD"] == 88.2
    assert refs.reference_values("standard", "cifar10", sources=sources).loc[0, "DSVDD"] == 0.617


def test_standard_protocol_never_returns_the_mem_ganomaly_paper(sources):
    assert set(sources.loc[sources["protocol"] == "standard", "source"]) >= {"ruff2018_deep_svdd"}
    assert "zhou2022_mem_ganomaly" not in set(sources.loc[sources["protocol"] == "standard", "source"])
    for dataset in PAPER_TABLES:
        table = refs.reference_values("standard", dataset, sources=sources)
        assert "Mem_GANomaly" not in table.columns
        assert not any("Zhou" in c for c in refs.citations("standard", dataset, sources=sources).values())


def test_paper_protocol_never_returns_geom_or_goad(sources):
    for dataset in PAPER_TABLES:
        table = refs.reference_values("paper", dataset, sources=sources)
        assert not {"GEOM", "GOAD"} & set(table.columns)
        cited = " ".join(refs.citations("paper", dataset, metric=None, sources=sources).values())
        assert "Golan" not in cited and "Bergman" not in cited and "Ruff" not in cited


def test_every_source_is_valid_and_cites_itself(sources):
    assert set(sources["source"]) == {"zhou2022_mem_ganomaly", "ruff2018_deep_svdd", "golan2018_geom",
                                      "bergman2020_goad"}
    assert sources["value"].between(0, 100).all()
    assert sources["citation"].str.len().min() > 40
    assert refs.citations("standard", "cifar10", sources=sources).keys() == {"DSVDD", "GEOM", "GOAD"}


def test_no_source_means_an_empty_table(sources):
    assert refs.reference_values("standard", "fashion_mnist", sources=sources).empty
    assert refs.citations("standard", "fashion_mnist", sources=sources) == {}


def test_a_method_from_two_sources_gets_one_column_each(tmp_path):
    (tmp_path / "one.csv").write_text(HEADER + GOOD_ROW.replace("demo", "one"))
    (tmp_path / "two.csv").write_text(HEADER + GOOD_ROW.replace("demo", "two").replace("98.0", "97.0"))
    frame = refs.load_sources(tmp_path)
    table = refs.reference_values("standard", "mnist", unit="percent", sources=frame)
    assert table.loc[0].to_dict() == {"DSVDD (one)": 98.0, "DSVDD (two)": 97.0}


def _write(tmp_path: Path, body: str, comments: str = "# a comment\n") -> Path:
    path = tmp_path / "demo.csv"
    path.write_text(comments + body)
    return path


@pytest.mark.parametrize("body, message", [
    (HEADER.replace(",citation", "") + GOOD_ROW, r"demo.csv: line 2: missing column\(s\) citation"),
    (HEADER.replace("citation", "citation,note") + GOOD_ROW.rstrip() + ",x\n",
     r"demo.csv: line 2: unexpected column\(s\) note"),
    (HEADER + GOOD_ROW.replace("demo,", "other,"), r"demo.csv: line 3: source 'other' is not the file's name"),
    (HEADER + GOOD_ROW.replace("standard", "reverse"), r"demo.csv: line 3: unknown protocol 'reverse'"),
    (HEADER + GOOD_ROW.replace("auroc", "aupr"), r"demo.csv: line 3: unknown metric 'aupr'"),
    (HEADER + GOOD_ROW.replace(",mnist,", ",svhn,"), r"demo.csv: line 3: unknown dataset 'svhn'"),
    (HEADER + GOOD_ROW.replace(",0,", ",x,"), r"demo.csv: line 3: class must be an integer or empty"),
    (HEADER + GOOD_ROW.replace(",0,", ",10,"), r"demo.csv: line 3: class 10 out of range 0-9 for mnist"),
    (HEADER + GOOD_ROW.replace("98.0", "0.98x"), r"demo.csv: line 3: value must be a number"),
    (HEADER + GOOD_ROW.replace("98.0", "101"), r"demo.csv: line 3: value must be a percentage in \[0, 100\]"),
    (HEADER + GOOD_ROW.replace("98.0", "nan"), r"demo.csv: line 3: value must be a percentage"),
    (HEADER + GOOD_ROW.replace(",DSVDD,", ",,"), r"demo.csv: line 3: empty method"),
    (HEADER + GOOD_ROW.split(',"')[0] + ",\n", r"demo.csv: line 3: empty citation"),
    (HEADER + GOOD_ROW + GOOD_ROW.replace("98.0", "97.0"), r"demo.csv: line 4: duplicate of line 3"),
])
def test_a_bad_file_names_the_file_line_and_problem(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        refs.load_source(_write(tmp_path, body))
    with pytest.raises(ValueError, match=message):
        refs.load_sources(tmp_path)


def test_a_good_file_loads_with_typed_columns(tmp_path):
    frame = refs.load_source(_write(tmp_path, HEADER + GOOD_ROW + GOOD_ROW.replace(",0,", ",,")))
    assert list(frame.columns) == list(refs.COLUMNS)
    assert frame["class"].tolist()[0] == 0 and pd.isna(frame["class"].tolist()[1])
    assert frame["value"].tolist() == [98.0, 98.0]


def test_bad_arguments_are_refused(sources):
    with pytest.raises(ValueError, match="unknown protocol 'reverse'"):
        refs.reference_values("reverse", "mnist", sources=sources)
    with pytest.raises(ValueError, match="unknown unit 'permille'"):
        refs.reference_values("paper", "mnist", unit="permille", sources=sources)


def test_imports_without_torch():
    code = "import sys, benchmark.references as r; r.load_sources(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT),
                                                                              "PATH": "/usr/bin:/bin"})
