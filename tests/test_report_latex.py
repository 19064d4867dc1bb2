"""Item 1 of issue 10: every generated .tex compiles with real pdflatex when \\input into a plain
article that loads booktabs (plus only what the file's first lines say it needs), and fits the
text width: no 'Overfull \\hbox' in the log."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from benchmark.render import Cell, ReportTable, latex_escape
from benchmark.reports import write_reports
from report_demo import demo_results

PDFLATEX = shutil.which("pdflatex")
needs_pdflatex = pytest.mark.skipif(
    PDFLATEX is None,
    reason="pdflatex not installed (Debian: texlive-latex-base, texlive-latex-recommended; .ci/run installs them)",
)


def compile_tex(tex: Path, workdir: Path) -> str:
    """pdflatex a minimal article that \\input's `tex`; returns the log. Fails the test on an error."""
    needs = re.findall(r"\\usepackage\{(\w+)\}", "\n".join(tex.read_text().splitlines()[:3]))
    assert "booktabs" in needs, f"{tex.name} does not say it needs booktabs"
    packages = "".join(f"\\usepackage{{{name}}}\n" for name in dict.fromkeys(needs))
    doc = workdir / f"doc_{tex.stem}.tex"
    shutil.copy(tex, workdir / tex.name)
    doc.write_text(
        f"\\documentclass{{article}}\n{packages}\\begin{{document}}\n\\input{{{tex.name}}}\n\\end{{document}}\n"
    )
    run = subprocess.run(
        [PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (workdir / f"doc_{tex.stem}.log").read_text(errors="replace")
    assert run.returncode == 0, f"{tex.name} does not compile:\n" + "\n".join(
        line for line in log.splitlines() if line.startswith("!") or "Error" in line
    )
    assert (workdir / f"doc_{tex.stem}.pdf").stat().st_size > 1000
    return log


@pytest.fixture(scope="module")
def demo_reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo_results(root / "results")
    write_reports(root / "results", root / "reports", "quick")
    return root / "reports" / "quick"


@needs_pdflatex
def test_every_generated_table_compiles_and_fits(demo_reports, tmp_path):
    texs = sorted(demo_reports.glob("*.tex"))
    assert [t.name for t in texs] == [
        "friedman.tex",  # its tables and the CD diagram, which it includes from the PNG beside it
        "table1_mnist_auroc.tex",
        "table3_cifar10_auroc.tex",
        "table4_mnist_threshold_metrics.tex",
    ]
    for png in demo_reports.glob("*.png"):
        shutil.copy(png, tmp_path)
    for tex in texs:
        log = compile_tex(tex, tmp_path)
        assert "Overfull \\hbox" not in log, f"{tex.name} is wider than the text"
        assert "LaTeX Warning: Reference" not in log


def test_latex_source_of_table1(demo_reports):
    text = (demo_reports / "table1_mnist_auroc.tex").read_text()
    assert "Mem\\_" in text and "Mem_G" not in text  # escaped
    assert "& Mem\\_GANomaly \\\\" in text and "Mem\\_\\\\" not in text  # a whole name in the header, never broken
    assert "\\label{tab:table1_mnist_auroc}" in text and "\\label{tab:table1_mnist_auroc_difference}" in text
    assert "\\centering" in text and text.count("\\begin{table}") == 2
    assert "Table 1:" not in text  # LaTeX numbers tables; no doubled "Table 1: Table 1:"
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if "& iForest & DAGMM &" in line)
    # One header row with the index name on it (possibly over two lines of a nested tabular), then the rule.
    assert re.match(r"^(normal class|\\begin\{tabular\}\[b\]\{@\{\}l@\{\}\}normal\\\\class\\end\{tabular\}) &",
                    lines[i])
    assert lines[i].endswith("\\\\") and lines[i - 1] == "\\toprule" and lines[i + 1] == "\\midrule"
    assert "– " not in text and "--" in text  # en dash as --
    assert "\\textbf{" in text


def test_latex_escape_and_cells():
    assert latex_escape("false_alarm_rate 10% & #1 {x} ~ ^ \\") == (
        "false\\_alarm\\_rate 10\\% \\& \\#1 \\{x\\} \\textasciitilde{} \\textasciicircum{} \\textbackslash{}"
    )
    assert latex_escape("0.91 ± 0.02") == "0.91 $\\pm$ 0.02"
    assert latex_escape("–") == "--"
    assert latex_escape("-0.0816 f-AnoGAN") == "$-$0.0816 f-AnoGAN"
    frame = pd.DataFrame(
        {"a_b": [Cell("0.5", ref="0.6", note="2/10 classes", bold=True), None]},
        index=pd.Index(["0", "mean"], name="normal class"),
    )
    table = ReportTable("cap_tion", "x_y", frame, notes="50% of x_y")
    tex = table.to_latex()
    assert "\\caption{cap\\_tion}" in tex and "\\label{tab:x_y}" in tex and "a\\_b" in tex and "50\\% of x\\_y" in tex
    assert "\\textbf{0.5}" in tex and "(0.6)" in tex and "[2/10 classes]" in tex
    assert "mean & --" in tex
    assert table.to_markdown().splitlines()[4] == "| 0 | **0.5** [2/10 classes] (0.6) |"
    with pytest.raises(ValueError, match="column_groups"):
        ReportTable("c", "l", frame, column_groups=[("g", 2)])
    with pytest.raises(ValueError, match="label"):
        ReportTable("c", "bad label", frame)


@needs_pdflatex
def test_wide_table_still_fits(tmp_path):
    """A frame of issue-11 style cells (mean ± sd) with ten columns: the renderer shrinks it (or
    scales it, saying it needs graphicx) so it still fits and compiles."""
    frame = pd.DataFrame(
        {f"Method_{i}": ["0.9123 ± 0.0123"] * 3 for i in range(10)},
        index=pd.Index(["0", "1", "mean"], name="normal class"),
    )
    (tmp_path / "src").mkdir()
    tex = tmp_path / "src" / "wide.tex"
    tex.write_text(ReportTable("Wide: mean ± sd over seeds", "wide", frame).to_latex())
    assert "graphicx" in tex.read_text().splitlines()[1]
    log = compile_tex(tex, tmp_path)
    assert "Overfull \\hbox" not in log


@needs_pdflatex
def test_paper_sized_table_needs_only_booktabs(tmp_path):
    """The paper's 8-column layout (class + 7 methods), with failed cells and partial means, fits
    the text width at a readable size without scaling: only booktabs is needed."""
    from report_demo import LABELS, synthetic_record

    results = tmp_path / "results"
    for c in range(10):
        for i, method in enumerate(m for m in LABELS if m != "pyod:knn"):
            if method == "dagmm" and c == 3:
                synthetic_record(results, "mnist", c, method, status="diverged")
            elif not (method == "memae" and c == 9):
                synthetic_record(results, "mnist", c, method, separation=0.5 + 0.2 * i)
    write_reports(results, tmp_path / "reports", "quick")
    (tmp_path / "build").mkdir()
    for name in ("table1_mnist_auroc.tex", "table4_mnist_threshold_metrics.tex"):
        tex = tmp_path / "reports" / "quick" / name
        assert "graphicx" not in tex.read_text() and "\\resizebox" not in tex.read_text()
        log = compile_tex(tex, tmp_path / "build")
        assert "Overfull \\hbox" not in log


# The reports kept in git; reports/<profile>/ folders a local run wrote (git-ignored, maybe by an older
# commit) are not part of the repository.
PUBLISHED = sorted((Path(__file__).resolve().parents[1] / "reports" / "published").rglob("*.tex"))


@needs_pdflatex
@pytest.mark.parametrize("tex", PUBLISHED, ids=[str(p.relative_to(p.parents[3])) for p in PUBLISHED])
def test_every_tex_under_reports_compiles(tex, tmp_path):
    """Every .tex kept under reports/ (the published reports) compiles as it is, with the figures
    beside it (friedman.tex includes critical_difference.png)."""
    for png in tex.parent.glob("*.png"):
        shutil.copy(png, tmp_path)
    log = compile_tex(tex, tmp_path)
    assert "Overfull \\hbox" not in log
