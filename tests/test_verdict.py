"""The reproduction verdict (benchmark/verdict.py): spreads, verdicts, ranks and Wilcoxon tests
against hand-worked numbers, and the report files written from records."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmark.reports import load_records, write_reports
from benchmark.verdict import (
    NO_VERDICT,
    OURS_HIGHER,
    OURS_LOWER,
    REPRODUCED,
    best_epoch_table,
    format_cell,
    mean_sd,
    rank_table,
    seeds_tables,
    verdict,
    wilcoxon_sentence,
    wilcoxon_table,
    wilcoxon_test,
)
from record_factory import write_fake_record


def test_mean_sd_uses_ddof_1():
    mean, sd, n = mean_sd(np.array([0.80, 0.90, 1.00, np.nan]))
    # deviations -0.1, 0, 0.1: sum of squares 0.02 over n - 1 = 2 -> variance 0.01, sd 0.1
    assert (mean, n) == (pytest.approx(0.9), 3) and sd == pytest.approx(0.1)
    assert math.isnan(mean_sd(np.array([0.7]))[1])


@pytest.mark.parametrize("paper, expected", [
    (0.915, REPRODUCED),     # band [0.88, 0.92]
    (0.92, REPRODUCED),      # on the edge
    (0.93, OURS_LOWER),      # the paper above our band
    (0.87, OURS_HIGHER),     # the paper below our band
    (None, ""),
])
def test_verdict_rule(paper, expected):
    assert verdict(0.90, 0.01, 3, paper) == expected


def test_no_verdict_with_one_seed():
    assert verdict(0.90, math.nan, 1, 0.90) == NO_VERDICT


def test_format_cell():
    assert format_cell(0.9, 0.1, 3, 3) == "0.9000 ± 0.1000"
    assert format_cell(0.9, 0.1, 2, 3) == "0.9000 ± 0.1000 (n=2)"
    assert format_cell(0.9, math.nan, 1, 1) == "0.9000"
    assert format_cell(math.nan, math.nan, 0, 3) == "–"


def _frame(rows):
    """A long frame as load_records gives (the columns the verdict reads)."""
    from benchmark.data import CLASS_NAMES

    frame = pd.DataFrame(rows, columns=["dataset", "normal_class", "label", "seed", "status", "auroc",
                                        "best_epoch_auroc_on_test"])
    frame["class_name"] = [CLASS_NAMES[d][c] for d, c in zip(frame["dataset"], frame["normal_class"])]
    return frame


def test_seeds_table_cells_verdicts_and_mean_row():
    rows = []
    for c in range(10):
        for seed, offset in enumerate((-0.01, 0.0, 0.01)):
            rows.append(("mnist", c, "Mem_GANomaly", seed, "ok", 0.99 + offset if c == 0 else 0.5 + offset, None))
        rows.append(("mnist", c, "GANomaly", 0, "ok", 0.90, None))
    rows.append(("mnist", 0, "GANomaly", 1, "failed", None, None))
    cells, verdicts, footer = seeds_tables(_frame(rows), "mnist")
    # class 0: 0.98, 0.99, 1.00 -> 0.99 ± 0.01; paper 0.991 in [0.97, 1.01]
    assert cells.loc["0", "Mem_GANomaly"] == "0.9900 ± 0.0100 (0.9910)"
    assert verdicts.loc["0", "Mem_GANomaly"] == REPRODUCED
    assert verdicts.loc["1", "Mem_GANomaly"] == OURS_LOWER     # 0.50 ± 0.01 vs 0.999
    # GANomaly: one ok seed of the 3 a cell can have -> n shown, the failed run named, no verdict
    assert cells.loc["0", "GANomaly"] == "0.9000 (n=1) [failed] (0.9890)"
    assert verdicts.loc["0", "GANomaly"] == NO_VERDICT
    # mean row: per seed (0.98 + 9 * 0.49) / 10 = 0.539, 0.549, 0.559 -> 0.549 ± 0.01
    assert cells.loc["mean", "Mem_GANomaly"] == "0.5490 ± 0.0100 (0.9687)"
    assert verdicts.loc["mean", "Mem_GANomaly"] == OURS_LOWER
    assert "mean ± 2 sd" in footer


def test_rank_table_hand_worked():
    values = {"iForest": (0.9, 0.8, 0.5), "DAGMM": (0.8, 0.8, 0.9), "GANomaly": (0.7, 0.9, 0.7)}
    rows = [("mnist", c, label, 0, "ok", v[c], None) for label, v in values.items() for c in range(3)]
    rows.append(("mnist", 4, "iForest", 0, "ok", 0.9, None))  # class 4: not every detector -> not ranked
    table, caption = rank_table(_frame(rows), "mnist")
    # ranks per class: (1, 2, 3), (2.5, 2.5, 1), (3, 1, 2)
    assert table.loc["iForest", "mean rank (ours)"] == f"{(1 + 2.5 + 3) / 3:.2f}"
    assert table.loc["DAGMM", "mean rank (ours)"] == f"{(2 + 2.5 + 1) / 3:.2f}"
    assert table.loc["GANomaly", "mean rank (ours)"] == "2.00"
    assert list(table.index) == ["DAGMM", "GANomaly", "iForest"]          # best mean rank first
    # the paper on classes 0-2 (table1 csv): GANomaly first in each; iForest 2, 2, 3; DAGMM 3, 3, 2
    assert table.loc["iForest", "mean rank (paper, same detectors and classes)"] == "2.33"
    assert table.loc["DAGMM", "mean rank (paper, same detectors and classes)"] == "2.67"
    assert table.loc["GANomaly", "mean rank (paper, same detectors and classes)"] == "1.00"
    assert "3 classes" in caption


def test_wilcoxon_hand_worked_small_n():
    # |d| ranks: 0.05 -> 1, 0.1 -> 2, 0.2 -> 3, 0.3 -> 4, 0.4 -> 5: W- = 1, W+ = 14, W = min = 1.
    # Exact two-sided p: P(W+ <= 1) = 2/32 (W+ = 0 or 1), doubled = 0.125.
    test = wilcoxon_test(np.array([0.1, 0.2, -0.05, 0.3, 0.4]))
    assert test["statistic"] == 1.0 and test["p"] == pytest.approx(0.125)
    assert test["min_p"] == pytest.approx(0.0625) and (test["higher"], test["lower"]) == (4, 1)
    sentence = wilcoxon_sentence("Mem_GANomaly", "GANomaly", test)
    assert "cannot show a difference" in sentence and "0.0625" in sentence


def test_wilcoxon_six_classes_can_be_significant():
    # all six differences positive: W = 0, exact two-sided p = 2 / 2**6 = 0.03125
    test = wilcoxon_test(np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]))
    assert test["statistic"] == 0.0 and test["p"] == pytest.approx(0.03125)
    assert "unlikely to be chance" in wilcoxon_sentence("Mem_GANomaly", "DAGMM", test)


def test_wilcoxon_table_pairs_classes_present_for_both():
    rows = [("mnist", c, "Mem_GANomaly", s, "ok", 0.9 + c / 100, None) for c in range(8) for s in (0, 1)]
    rows += [("mnist", c, "DAGMM", 0, "ok", 0.5, None) for c in range(6)]
    table, sentences = wilcoxon_table(_frame(rows), "mnist")
    assert table.loc["DAGMM", "classes"] == 6
    assert table.loc["DAGMM", "better by median"] == "Mem_GANomaly"
    assert table.loc["DAGMM", "p (two-sided)"] == "0.03125"
    assert sentences[0].startswith("Mem_GANomaly vs DAGMM over 6 classes")


def test_best_epoch_table_beside_final():
    rows = [("mnist", 0, "Mem_GANomaly", 0, "ok", 0.90, 0.95), ("mnist", 0, "Mem_GANomaly", 1, "ok", 0.92, 0.97),
            ("mnist", 1, "GANomaly", 0, "ok", 0.80, None)]  # no --track-auroc: not in the table
    table = best_epoch_table(_frame(rows), "mnist")
    assert list(table.columns) == ["Mem_GANomaly: final",
                                   "Mem_GANomaly: best epoch on test set (optimistic)",
                                   "Mem_GANomaly: paper"]
    assert table.loc["0"].tolist() == ["0.9100 ± 0.0141", "0.9600 ± 0.0141", "0.9910"]
    assert table.loc["mean"].iloc[0] == "0.9100 [1/10 classes]"


def test_report_files_from_records(tmp_path):
    results, out = tmp_path / "results", tmp_path / "reports"
    health = {"per_epoch": {"memory_slots_in_use": [40.0, 3.0], "memory_slots_per_query": [9.0, 1.2],
                            "memory_max_weight": [0.3, 0.97], "query_norm": [2.0, 30.5],
                            "memory_row_norm": [0.6, 0.61]}}
    for seed in (0, 1):
        write_fake_record(results, "mnist", 0, "mem_ganomaly", 0.9 + seed / 50, seed=seed, training_log=health,
                          hyperparameters={"memory_size": 100},
                          diagnostics={"best_epoch_on_test_OPTIMISTIC": {"epoch": 3, "auroc": 0.97}})
        write_fake_record(results, "mnist", 0, "ganomaly", 0.8, seed=seed)
    write_fake_record(results, "mnist", 1, "memae", 0.7, training_log={"epoch_mean_loss": [1.0]})  # an older log
    names = {p.name for p in write_reports(results, out, "quick")}
    assert {"seeds_mnist.md", "best_epoch_mnist.md", "memory_health_mnist.md"} <= names
    seeds = (out / "quick" / "seeds_mnist.md").read_text()
    assert "0.9100 ± 0.0141 (0.9910)" in seeds and "Wilcoxon" in seeds and "Mean rank" in seeds
    memory = (out / "quick" / "memory_health_mnist.md").read_text()
    assert "3.0 / 100" in memory and "30.5" in memory and "MemAE" not in memory.split("Memory health after")[0]
    frame, _ = load_records(results, "quick")
    assert len(frame) == 5
