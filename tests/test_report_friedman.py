"""Issue 21 item 3: the Friedman test over every (dataset, class) task and its critical-difference
diagram, a report section (`benchmark.reports.FRIEDMAN`) in every report folder with more than two
detectors and at least five tasks, and on index.html."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from benchmark.records import load_records
from benchmark.render import ReportContext
from benchmark.reports import FRIEDMAN, PRODUCERS, friedman_sections, write_reports
from record_factory import write_fake_record
from test_report_latex import compile_tex, needs_pdflatex

# Per task the same order: Mem_GANomaly best, DSVDD second, iForest last.
SCORES = {"mem_ganomaly": 0.9, "dsvdd": 0.8, "iforest": 0.7}
FILES = ("friedman.md", "friedman.tex", "critical_difference.png")


def _results(root: Path, classes, methods=tuple(SCORES), skip=()) -> Path:
    results = root / "results"
    for normal_class in classes:
        for method in methods:
            if (method, normal_class) in skip:
                continue
            write_fake_record(results, "mnist", normal_class, method, SCORES[method] + 0.001 * normal_class)
    return results


def _section(results: Path):
    frame, _ = load_records(results, "quick", "paper")
    return friedman_sections(ReportContext(results, "quick", "paper", frame, "footer"))


def test_the_producer_comes_last_and_names_its_files():
    assert PRODUCERS[-1] is FRIEDMAN and FRIEDMAN.stems == ("friedman", "critical_difference")


def test_section_numbers_by_hand(tmp_path):
    (section,) = _section(_results(tmp_path, range(5)))
    ranks, tests = (table.frame for table in section.tables)
    assert list(ranks.index) == ["Mem_GANomaly", "DSVDD", "iForest"]
    assert list(ranks["average rank"]) == ["1.00", "2.00", "3.00"]
    values = tests["value"]
    # chi2_F = 12 N / (k (k+1)) sum R_j^2 - 3 N (k+1) = 12*5/12 * 14 - 60 = 10; p = exp(-10/2) (2 df)
    assert values["tasks N"] == "5" and values["detectors k"] == "3"
    assert values["Friedman chi2_F (2 df)"] == "10.000"
    assert values["p (chi-square)"] == f"{math.exp(-5):.3g}"
    # Iman-Davenport: N (k-1) - chi2 = 0: every task ranks alike, F infinite
    assert values["Iman-Davenport F_F (2, 8 df)"] == "inf"
    # CD = q sqrt(k (k+1) / (6 N)) = 2.343 * sqrt(12 / 30) (Demsar's Table 5a: q_0.05 = 2.343 for k = 3)
    assert values["critical difference CD"] == f"{2.343 * math.sqrt(12 / 30):.3f}"
    # Mem_GANomaly and DSVDD (1 apart) and DSVDD and iForest are within CD = 1.48; the ends (2 apart) are not
    assert list(ranks["group"]) == ["a", "a, b", "b"]
    (figure,) = section.figures
    assert figure.stem == "critical_difference" and figure.png.startswith(b"\x89PNG")
    assert figure.reading.startswith("Friedman p = 0.00674 over 5 tasks (3 detectors): the detectors differ")
    assert "iForest ranks last (3.00), significantly below Mem_GANomaly" in figure.reading
    assert section.latex and section.latex_figures


def test_incomplete_tasks_are_left_out_and_named(tmp_path):
    (section,) = _section(_results(tmp_path, range(6), skip={("dsvdd", 2)}))
    assert section.tables[1].frame.loc["tasks N", "value"] == "5"
    assert "(5 of 6)" in section.footer and "Left out, some detector has no ok result there: mnist/2." in section.footer


@pytest.mark.parametrize("classes, methods", [(range(4), tuple(SCORES)), (range(10), ("dsvdd", "iforest"))])
def test_no_section_with_two_detectors_or_fewer_than_five_tasks(tmp_path, classes, methods):
    assert _section(_results(tmp_path, classes, methods)) == []


def test_written_files_index_page_and_stale_removal(tmp_path):
    reports = tmp_path / "reports"
    write_reports(_results(tmp_path / "five", range(5)), reports, "quick")
    folder = reports / "quick"
    for name in FILES:
        assert (folder / name).is_file(), name
    page = (folder / "index.html").read_text()
    assert "Friedman test and critical-difference diagram over every task" in page
    assert '<a href="critical_difference.png">critical_difference.png</a>' in page
    assert page.count("data:image/png;base64,") == 3  # Table 1's dot plot, the ROC curves, the CD diagram
    assert '<p class="reading"><strong>Reading:</strong> Friedman p = 0.00674 over 5 tasks' in page
    markdown = (folder / "friedman.md").read_text()
    assert "](critical_difference.png)" in markdown and "\nFriedman p = 0.00674 over 5 tasks" in markdown
    tex = (folder / "friedman.tex").read_text()
    assert "\\includegraphics[width=\\linewidth]{critical_difference.png}" in tex
    assert "\\usepackage{graphicx}" in tex.splitlines()[0]
    # The same folder from four tasks: the section's files go as stale.
    write_reports(_results(tmp_path / "four", range(4)), reports, "quick")
    assert not any((folder / name).exists() for name in FILES)
    assert "critical_difference" not in (folder / "index.html").read_text()


def test_standard_protocol_files_carry_the_suffix(tmp_path):
    results = tmp_path / "results"
    for normal_class in range(5):
        for method, score in SCORES.items():
            write_fake_record(results, "mnist", normal_class, method, score, protocol="standard")
    write_reports(results, tmp_path / "reports", "quick", "standard")
    folder = tmp_path / "reports" / "quick"
    assert (folder / "critical_difference_standard.png").is_file()
    assert "{critical_difference_standard.png}" in (folder / "friedman_standard.tex").read_text()


@needs_pdflatex
def test_friedman_tex_compiles_with_its_figure(tmp_path):
    write_reports(_results(tmp_path, range(5)), tmp_path / "reports", "quick")
    folder = tmp_path / "reports" / "quick"
    work = tmp_path / "latex"
    work.mkdir()
    shutil.copy(folder / "critical_difference.png", work)
    log = compile_tex(folder / "friedman.tex", work)
    assert "Overfull \\hbox" not in log
