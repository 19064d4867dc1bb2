"""Items 2, 4-7 of issue 10: the one-page HTML report (checked in headless Chromium when it is
installed), ROC curves, a report layer free of torch / methods, tables that fit what was run, and
two processes writing the same reports at once."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from benchmark.figures import mean_roc, roc_points
from benchmark.records import iter_records, read_scores
from benchmark.reports import load_records, write_reports
from report_demo import demo_results, synthetic_record

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    demo_results(root / "results")
    files = write_reports(root / "results", root / "reports", "quick")
    return root, root / "reports" / "quick", files


def test_report_folder_holds_only_what_was_run(demo):
    _, folder, files = demo
    assert sorted(p.name for p in files) == sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == [
        "critical_difference.png",  # the Friedman test over every task (8 detectors, 8 complete MNIST tasks)
        "friedman.md",
        "friedman.tex",
        "index.html",
        "records.csv",
        "roc_cifar10.png",
        "roc_mnist.png",
        "seeds_cifar10.md",  # the reproduction verdict (benchmark/verdict.py)
        "seeds_mnist.md",
        "table1_mnist_auroc.md",
        "table1_mnist_auroc.png",
        "table1_mnist_auroc.tex",
        "table3_cifar10_auroc.md",
        "table3_cifar10_auroc.png",
        "table3_cifar10_auroc.tex",
        "table4_mnist_threshold_metrics.md",
        "table4_mnist_threshold_metrics.tex",
    ]  # no Fashion-MNIST table
    t3 = (folder / "table3_cifar10_auroc.md").read_text()
    header = next(line for line in t3.splitlines() if line.startswith("| normal class"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ["iForest", "GANomaly", "Mem_GANomaly"]
    mean = next(line for line in t3.splitlines() if line.startswith("| mean"))
    assert "**" not in mean and mean.count("[5/10 classes]") == 3  # partial means are never bold


def test_html_page_is_self_contained(demo):
    _, folder, _ = demo
    page = (folder / "index.html").read_text()
    assert page.count("<img alt=") == 5 and page.count("data:image/png;base64,") == 5  # with the CD diagram
    assert 'src="http' not in page and "<script" not in page and "@media print" in page
    for label in (
        "table1_mnist_auroc",
        "table1_mnist_auroc_difference",
        "table3_cifar10_auroc",
        "table4_mnist_threshold_metrics",
        "friedman-ranks",
        "friedman-tests",
    ):
        assert f'id="tab-{label}"' in page
    assert "Youden point on the test labels (paper)" in page and "95th percentile of held-out normals" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_page_in_headless_chromium(demo, tmp_path):
    _, folder, _ = demo
    url = (folder / "index.html").as_uri()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "page.png"
    run = subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", run.stderr[-2000:]
    if os.environ.get("MEMGAN_REVIEW_DIR"):  # keep the screenshot for a human to look at
        shutil.copy(shot, Path(os.environ["MEMGAN_REVIEW_DIR"]) / "index_screenshot.png")
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    for caption in (
        "AUROC on MNIST per normal class",
        "AUROC on MNIST: ours minus the paper's",
        "AUROC on CIFAR-10 per normal class",
        "Mean threshold metrics on MNIST",
        "ROC curves on MNIST",
        "Critical-difference diagram of the average AUROC ranks over 8 tasks",
    ):
        assert caption in text, caption
    assert "Reading: Friedman p =" in re.sub(r"\s+", " ", text)  # the CD diagram's reading, under it
    # Tables 1, 3 (+ its difference table), 4: 5 tables; per dataset the verdict's 4 (cells, verdicts,
    # mean ranks, Wilcoxon tests); the Friedman section's 2 (ranks, tests).
    assert dom.count("<table>") == 5 + 2 * 4 + 2 and dom.count("<img") == 5
    assert "Verdict against the paper" in text
    for label in ("iForest", "DAGMM", "f-AnoGAN", "MemAE", "GANomaly", "DSVDD", "Mem_GANomaly", "pyod:knn"):
        assert label in text


def test_roc_points_hand_worked():
    # scores 0.9 (anomaly), 0.8 (normal), 0.8 (anomaly), 0.1 (normal): thresholds 0.9, 0.8, 0.1
    fpr, tpr = roc_points(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    averaged = mean_roc(
        [(np.array([0.0, 1.0]), np.array([0.0, 1.0])), (np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]))]
    )
    assert (
        averaged[0] == pytest.approx(0.5)
        and averaged[100] == pytest.approx(0.75)
        and averaged[-1] == pytest.approx(1.0)
    )


def test_roc_points_on_tied_scores_agree_with_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(size=400) + labels, 1)  # ~60 distinct values: many ties across the classes
    fpr, tpr = roc_points(scores, labels)
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-12)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)


def _table_cells(page: str, table_id: str) -> dict:
    """{(row header, column header): the first word of the cell's text} of one table of the page."""
    table = page[page.index(f'id="{table_id}"'):]
    table = table[: table.index("</table>")]
    head, body = table.split("</thead>")
    columns = [html.unescape(c) for c in re.findall(r"<th>([^<]*)</th>", head)][1:]
    cells = {}
    for row, tds in re.findall(r"<tr[^>]*><th>([^<]*)</th>(.*?)</tr>", body):
        texts = [html.unescape(re.sub(r"<[^>]+>", " ", td)).split()[0] for td in re.findall(r"<td>(.*?)</td>", tds)]
        assert len(texts) == len(columns)
        cells.update({(row, column): text for column, text in zip(columns, texts)})
    return cells


def test_page_shows_the_auroc_of_the_recorded_scores(demo):
    """Table 1 of the page against sklearn's AUROC of the score arrays stored with the records."""
    root, folder, _ = demo
    cells = _table_cells((folder / "index.html").read_text(), "tab-table1_mnist_auroc")
    per_class: dict = {}
    for path, record, problem in iter_records(root / "results" / "quick" / "paper" / "mnist"):
        assert problem is None
        key = (str(record["normal_class"]), record["method_label"])
        if record["status"] == "ok":
            scores, labels = read_scores(path)
            per_class.setdefault(key, []).append(roc_auc_score(labels, scores))
        else:
            assert cells[key] == record["status"]  # failed / diverged, no number
    assert len(per_class) == 10 * 8 - 2 and len(per_class[("0", "GANomaly")]) == 2
    for key, aurocs in per_class.items():
        assert cells[key] == f"{np.mean(aurocs):.4f}", key  # the mean over seeds
    for label in {label for _, label in per_class}:
        means = [np.mean(aurocs) for (_, other), aurocs in per_class.items() if other == label]
        assert cells["mean", label] == f"{np.mean(means):.4f}", label  # DAGMM: over its 8 ok classes


def test_report_layer_imports_neither_torch_nor_a_detector_module(tmp_path):
    # The registry (methods/__init__.py and the two torch-free modules it imports) says which detectors
    # have a memory (benchmark.labels.memory_size_param); no detector module is imported, so no torch.
    code = (
        "import sys; import benchmark.reports, benchmark.render, benchmark.figures, benchmark.html_report; "
        "from benchmark.reports import write_reports; "
        f"write_reports({str(tmp_path)!r}, {str(tmp_path / 'r')!r}, 'quick'); "
        "registry = {'methods', 'methods.base', 'methods.pyod_adapter'}; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.') "
        "or (m.startswith('methods.') and m not in registry)]; "
        "assert not bad, bad"
    )
    synthetic_record(tmp_path, "mnist", 0, "mem_ganomaly", with_label=False)
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # run_all.py --report-only does not load torch either (it needs no detector code).
    cli = (
        "import sys; from benchmark.cli import main; "
        f"rc = main(['--report-only', '--profile', 'quick', '--results-dir', {str(tmp_path)!r}, "
        f"'--reports-dir', {str(tmp_path / 'r2')!r}]); "
        "assert rc == 0 and 'torch' not in sys.modules, rc"
    )
    run = subprocess.run([sys.executable, "-c", cli], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "r2" / "quick" / "index.html").is_file()
    # An old record without method_label still gets the paper's label, and the paper's value.
    text = (tmp_path / "r" / "quick" / "table1_mnist_auroc.md").read_text()
    assert "| normal class | Mem_GANomaly |" in text and "(0.9910)" in text


def test_old_records_without_validation_scores(tmp_path):
    for c in range(10):
        synthetic_record(tmp_path, "mnist", c, "ganomaly", with_val=False, with_label=False)
    write_reports(tmp_path, tmp_path / "r", "quick")
    t4 = (tmp_path / "r" / "quick" / "table4_mnist_threshold_metrics.md").read_text()
    assert "held-out normals" not in t4 and "made before the validation split existed" in t4
    frame, _ = load_records(tmp_path, "quick")
    assert frame["val_gmean"].isna().all() and (frame["label"] == "GANomaly").all()


CONCURRENT = """
import sys, time
from pathlib import Path
from benchmark.reports import write_reports
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
for _ in range(3):
    write_reports(Path(sys.argv[2]), Path(sys.argv[3]), "quick")
"""


def test_two_processes_write_the_same_reports_at_once(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    demo_results(results)
    start = time.time() + 8.0  # both start writing at the same moment, after their imports
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(start), str(results), str(reports)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    folder = reports / "quick"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    for png in folder.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pd.read_csv(folder / "records.csv").shape[0] == 105
    assert (folder / "index.html").read_text().rstrip().endswith("</html>")
    assert (folder / "table4_mnist_threshold_metrics.tex").read_text().rstrip().endswith("\\end{table}")
