"""Issue 21 item 2: the AUROC tables and the verdict read their published values through
`benchmark.references` for the run's protocol: the Mem_GANomaly paper's under "paper", every other
source's (Ruff et al.'s Deep SVDD, GEOM, GOAD) under "standard", never the Mem_GANomaly paper's there."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark.labels import published_values, reference_table
from benchmark.records import load_records
from benchmark.render import ReportContext
from benchmark.reports import auroc_tables, table4, write_reports
from benchmark.verdict import OURS_HIGHER, OURS_LOWER, REPRODUCED, seeds_tables, verdict_sections
from record_factory import write_fake_record

ROOT = Path(__file__).resolve().parents[1]
# Values of the Mem_GANomaly paper's Table 3 (CIFAR-10, class 0) and Table 1 (MNIST, class 0) that must not
# appear under the standard protocol, and Ruff et al.'s Deep SVDD CIFAR-10 class 0 / MNIST class 0.
MEMGAN_CIFAR_PLANE = f"{reference_table('table3_cifar10_auroc.csv').loc['Plane', 'Mem_GANomaly']:.4f}"
MEMGAN_MNIST_0 = "0.9910"


def _records(root: Path, protocol: str, dataset: str = "cifar10", seeds=(0, 1)) -> Path:
    """DSVDD and Mem_GANomaly on every class; per class and seed an AUROC of 0.60 + 0.01 * class + 0.002 * seed."""
    results = root / "results"
    for normal_class in range(10):
        for seed in seeds:
            for method in ("dsvdd", "mem_ganomaly"):
                write_fake_record(results, dataset, normal_class, method, 0.60 + 0.01 * normal_class + 0.002 * seed,
                                  seed=seed, protocol=protocol)
    return results


def _cells(table) -> pd.DataFrame:
    return table.frame.map(lambda cell: (cell.text, cell.ref))


def test_standard_tables_show_ruff_geom_goad_and_never_the_mem_ganomaly_paper(tmp_path):
    results = _records(tmp_path, "standard")
    frame, _ = load_records(results, "quick", "standard")
    paired, diff = auroc_tables(frame, "cifar10", "quick", "standard")
    cells = _cells(paired)
    assert list(cells.columns) == ["DSVDD", "Mem_GANomaly", "GEOM", "GOAD"]  # ours first, then published alone
    assert cells.loc["Plane", "DSVDD"] == ("0.6010", "0.6170")  # Ruff et al. 2018, Table 1: 61.7
    assert cells.loc["Truck", "DSVDD"] == ("0.6910", "0.7310")  # 73.1
    assert cells.loc["mean", "DSVDD"][1] == "–"  # Ruff's table gives no mean
    assert cells.loc["mean", "GEOM"] == ("–", "0.8600")  # mean only: beside the mean row
    assert cells.loc["mean", "GOAD"] == ("–", "0.8820")
    assert cells.loc["Plane", "GEOM"] == ("–", "–") and cells.loc["Plane", "GOAD"] == ("–", "–")
    assert all(ref == "–" for ref in cells["Mem_GANomaly"].map(lambda c: c[1]))  # no Mem_GANomaly-paper value
    text = paired.to_markdown() + paired.to_latex() + paired.to_html()
    assert MEMGAN_CIFAR_PLANE not in text and "the paper's Table" not in text
    assert "Ruff" in paired.notes and "Golan" in paired.notes and "Bergman" in paired.notes
    assert "GEOM and GOAD: no records in this run" in paired.notes
    assert "only the mean over the classes" in paired.notes
    assert "ours (published)" in paired.caption
    # ours minus published: Deep SVDD only (Mem_GANomaly has no published value under this protocol)
    assert list(diff.frame.columns) == ["DSVDD"]
    assert diff.frame.loc["Plane", "DSVDD"] == "-0.0160"


def test_standard_mnist_has_ruff_only_and_fashion_mnist_says_no_source(tmp_path):
    results = _records(tmp_path / "m", "standard", "mnist")
    frame, _ = load_records(results, "quick", "standard")
    cells = _cells(auroc_tables(frame, "mnist", "quick", "standard")[0])
    assert list(cells.columns) == ["DSVDD", "Mem_GANomaly"]  # no GEOM / GOAD values for MNIST
    assert cells.loc["0", "DSVDD"][1] == "0.9800" and cells.loc["0", "Mem_GANomaly"][1] == "–"
    results = _records(tmp_path / "f", "standard", "fashion_mnist")
    frame, _ = load_records(results, "quick", "standard")
    paired, diff = auroc_tables(frame, "fashion_mnist", "quick", "standard")
    assert diff is None and "No source in benchmark/reference/sources/ reports Fashion-MNIST" in paired.notes
    assert set(_cells(paired).map(lambda c: c[1]).to_numpy().ravel()) == {"–"}


def test_paper_protocol_tables_show_the_mem_ganomaly_paper_only(tmp_path):
    results = _records(tmp_path, "paper")
    frame, _ = load_records(results, "quick", "paper")
    paired, diff = auroc_tables(frame, "cifar10", "quick", "paper")
    cells = _cells(paired)
    assert list(cells.columns) == ["DSVDD", "Mem_GANomaly"]  # no GEOM / GOAD under the paper protocol
    paper = reference_table("table3_cifar10_auroc.csv")
    assert cells.loc["Plane", "Mem_GANomaly"][1] == MEMGAN_CIFAR_PLANE
    assert cells.loc["Plane", "DSVDD"][1] == f"{paper.loc['Plane', 'DSVDD']:.4f}" != "0.6170"
    assert cells.loc["mean", "DSVDD"][1] == f"{paper.loc['mean', 'DSVDD']:.4f}"
    assert paired.caption == ("AUROC on CIFAR-10 per normal class, ours (paper) (quick profile, paper protocol; "
                              "the paper's Table 3)")
    assert "Ruff" not in paired.notes and "Published values" not in paired.notes
    assert diff.caption == "AUROC on CIFAR-10: ours minus the paper's (quick profile, paper protocol)"


def test_table4_under_standard_shows_no_mem_ganomaly_paper_value(tmp_path):
    results = _records(tmp_path, "standard", "mnist")
    frame, _ = load_records(results, "quick", "standard")
    table = table4(frame, "quick", "standard")
    refs = {cell.ref for cell in table.frame.to_numpy().ravel()}
    assert refs == {None}  # no source reports threshold metrics under the standard protocol
    assert "No source reports these metrics under the standard protocol" in table.notes
    paper_table = table4(load_records(_records(tmp_path / "p", "paper", "mnist"), "quick", "paper")[0], "quick")
    assert paper_table.frame.loc["Mem_GANomaly"].iloc[0].ref == "0.9188"  # the paper's Table 4 gmean


def test_verdict_against_ruff_per_class_and_mean_only_source(tmp_path):
    results = _records(tmp_path, "standard")
    # A detector labelled GOAD (as a record would be): its source gives only the CIFAR-10 mean, 0.882.
    for normal_class in range(10):
        for seed, auroc in ((0, 0.87), (1, 0.89)):
            write_fake_record(results, "cifar10", normal_class, "goad", auroc, seed=seed, protocol="standard",
                              method_label="GOAD")
    frame, _ = load_records(results, "quick", "standard")
    cells, verdicts, footer = seeds_tables(frame, "cifar10", "standard")
    # DSVDD: seeds 0.601 and 0.603 on Plane (mean 0.602, sd 0.0014): Ruff's 0.617 is above the band.
    assert verdicts.loc["Plane", "DSVDD"] == OURS_LOWER
    assert cells.loc["Plane", "DSVDD"].endswith("(0.6170)")
    assert verdicts.loc["mean", "DSVDD"] == "–"  # no published mean
    # GOAD: per seed the class mean is 0.87 / 0.89, mean 0.88, sd 0.01414: 0.882 lies in the band.
    assert verdicts.loc["mean", "GOAD"] == REPRODUCED
    assert (verdicts.loc[[c for c in verdicts.index if c != "mean"], "GOAD"] == "–").all()
    assert verdicts["Mem_GANomaly"].eq("–").all()  # never the Mem_GANomaly paper's value here
    assert "GOAD: its source gives only the mean over the classes, so the verdict is on the mean row only." in footer
    assert "the published value lies within" in footer
    # ours minus published: GOAD's complete mean 0.88 minus its source's mean 0.882, on the mean row only.
    diff = auroc_tables(frame, "cifar10", "quick", "standard")[1]
    assert diff.frame.loc["mean", "GOAD"] == "-0.0020" and (diff.frame["GOAD"].iloc[:-1] == "–").all()
    assert "for GOAD, whose source gives only the mean over the classes, it is our complete mean" in diff.notes
    context = ReportContext(results, "quick", "standard", frame)
    section = verdict_sections(context)[0]
    assert section.title.startswith("AUROC over seeds and the verdict against the published values")


def test_verdict_under_the_paper_protocol_uses_the_paper(tmp_path):
    results = _records(tmp_path, "paper")
    frame, _ = load_records(results, "quick", "paper")
    cells, verdicts, footer = seeds_tables(frame, "cifar10")
    paper = published_values("paper", "cifar10")
    assert cells.loc["Plane", "Mem_GANomaly"].endswith(f"({paper.loc['Plane', 'Mem_GANomaly']:.4f})")
    assert verdicts.loc["Plane", "Mem_GANomaly"] in (OURS_LOWER, OURS_HIGHER)
    assert "the paper's value lies within" in footer and "only the mean" not in footer


@pytest.mark.parametrize("protocol", ["standard", "paper"])
def test_written_reports_of_a_protocol(tmp_path, protocol):
    results = _records(tmp_path, protocol)
    write_reports(results, tmp_path / "reports", "quick", protocol)
    suffix = "" if protocol == "paper" else f"_{protocol}"
    folder = tmp_path / "reports" / "quick"
    text = "".join((folder / f"{stem}{suffix}.md").read_text() for stem in ("table3_cifar10_auroc", "seeds_cifar10"))
    page = (folder / f"index{suffix}.html").read_text()
    if protocol == "standard":
        assert MEMGAN_CIFAR_PLANE not in text and "(0.6170)" in text and "(0.8820)" in text
        assert "(0.8820)" in page and "Bergman" in page
    else:
        assert MEMGAN_CIFAR_PLANE in text and "(0.6170)" not in text and "GOAD" not in page
