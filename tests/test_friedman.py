"""benchmark.friedman: the Friedman test, Nemenyi's critical difference and the CD diagram (Demsar 2006)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchmark import friedman as fr


def _scores(rows: dict, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)


def test_demsar_worked_example_from_average_ranks():
    # Demsar 2006, section 3.2.2: four C4.5 variants on 14 data sets.
    ranks = pd.Series([3.143, 2.000, 2.893, 1.964], index=["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"])
    chi2 = fr.friedman_from_ranks(ranks, 14)
    assert chi2 == pytest.approx(9.28, abs=0.005)
    f_stat, f_p = fr.iman_davenport(chi2, 4, 14)
    assert f_stat == pytest.approx(3.69, abs=0.005)
    assert f_p < 0.05  # Demsar: F(3, 39) critical value 2.85 at alpha 0.05, so the null is rejected
    assert fr.nemenyi_q(4) == pytest.approx(2.569, abs=5e-4)
    assert fr.critical_difference(4, 14) == pytest.approx(1.25, abs=0.005)
    # The largest difference, C4.5 - C4.5+m+cf = 1.179, is below CD 1.25: at alpha 0.05 one group of all four;
    # at alpha 0.10 (q = 2.291) CD = 1.12 and that pair differs.
    assert fr.nemenyi_q(4, alpha=0.10) == pytest.approx(2.291, abs=5e-4)
    assert fr.critical_difference(4, 14, alpha=0.10) == pytest.approx(1.12, abs=0.005)
    assert fr.cliques(ranks.sort_values(), fr.critical_difference(4, 14)) == (
        ("C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5"),)


def test_nemenyi_q_matches_demsar_table_5():
    for k, q in [(2, 1.960), (3, 2.343), (5, 2.728), (7, 2.949), (10, 3.164)]:
        assert fr.nemenyi_q(k) == pytest.approx(q, abs=1e-3)


def test_hand_ranked_example_without_ties():
    # A always best, C always worst: ranks 1, 2, 3 on each of 4 tasks.
    scores = _scores({f"t{i}": [0.9 - 0.01 * i, 0.8, 0.7 - 0.01 * i] for i in range(4)}, ["A", "B", "C"])
    result = fr.friedman_test(scores)
    assert result.average_ranks.to_dict() == {"A": 1.0, "B": 2.0, "C": 3.0}
    # chi2 = 12 N / (k (k+1)) (sum R^2 - k (k+1)^2 / 4) = 12 * 4 / 12 * (14 - 12) = 8; p = exp(-8 / 2)
    assert result.chi2 == pytest.approx(8.0)
    assert result.p_value == pytest.approx(math.exp(-4.0))
    assert math.isinf(result.f_statistic) and result.f_p_value == 0.0  # perfect agreement
    assert result.critical_difference == pytest.approx(2.3437 * math.sqrt(12 / 24), abs=1e-4)
    # |A - B| = |B - C| = 1 < CD 1.657 <= |A - C| = 2
    assert result.cliques == (("A", "B"), ("B", "C"))
    assert result.significantly_different("A", "C") and not result.significantly_different("A", "B")
    assert result.rejects
    assert result.reading.startswith("Friedman p = 0.0183 over 4 tasks (3 detectors): the detectors differ")
    assert "C ranks last (3.00), significantly below A." in result.reading


def test_ties_share_the_average_rank_and_correct_the_statistic():
    scores = _scores({"t1": [0.9, 0.9, 0.5], "t2": [0.8, 0.7, 0.6]}, ["A", "B", "C"])
    ranks = fr.rank_scores(scores)
    assert ranks.loc["t1"].tolist() == [1.5, 1.5, 3.0]
    result = fr.friedman_test(scores)
    assert result.average_ranks.to_dict() == {"A": 1.25, "B": 1.75, "C": 3.0}
    # Uncorrected 0.5 * 54.5 - 24 = 3.25; tie correction 1 - (2^3 - 2) / (2 * 3 * 8) = 0.875.
    assert result.chi2 == pytest.approx(3.25 / 0.875)
    assert fr._friedman_chi2(ranks.to_numpy()) == pytest.approx(3.25 / 0.875)
    assert result.chi2 == pytest.approx(stats.friedmanchisquare(*scores.to_numpy().T).statistic)


def test_two_detectors_use_the_same_statistic():
    scores = _scores({f"t{i}": [0.9, 0.5] for i in range(5)}, ["A", "B"])
    result = fr.friedman_test(scores)
    # 12 / (5 * 2 * 3) * (5^2 + 10^2) - 3 * 5 * 3 = 50 - 45 = 5
    assert result.chi2 == pytest.approx(5.0)
    assert result.p_value == pytest.approx(stats.chi2.sf(5.0, 1))
    assert result.q_alpha == pytest.approx(1.960, abs=1e-3)


def test_everything_tied_is_no_difference():
    scores = _scores({f"t{i}": [0.5, 0.5, 0.5] for i in range(5)}, ["A", "B", "C"])
    result = fr.friedman_test(scores)
    assert result.chi2 == 0.0 and result.p_value == 1.0 and not result.rejects
    assert "no significant difference" in result.reading
    assert result.detectors == ["A", "B", "C"]  # ties keep the table's order


def test_missing_value_names_the_task_and_detector():
    scores = _scores({"t1": [0.9, 0.8, 0.7], "t2": [0.9, np.nan, 0.7], "t3": [0.6, 0.8, 0.7]}, ["A", "B", "C"])
    with pytest.raises(ValueError, match=r"task 't2' has no score for detector 'B'"):
        fr.friedman_test(scores)
    complete, dropped = fr.complete_tasks(scores)
    assert list(complete.index) == ["t1", "t3"] and dropped == ["t2"]
    assert fr.friedman_test(complete).n_tasks == 2


@pytest.mark.parametrize("scores, message", [
    (_scores({"t1": [0.9], "t2": [0.8]}, ["A"]), "at least 2 detectors, got 1"),
    (_scores({"t1": [0.9, 0.8]}, ["A", "B"]), "at least 2 tasks, got 1"),
])
def test_too_small_tables_are_refused(scores, message):
    with pytest.raises(ValueError, match=message):
        fr.friedman_test(scores)


def test_applies_needs_more_than_two_detectors_and_five_tasks():
    assert fr.applies(3, 5)
    assert not fr.applies(2, 30)
    assert not fr.applies(7, 4)


def test_wide_scores_averages_the_seeds():
    long = pd.DataFrame({"dataset": ["mnist"] * 4, "normal_class": [0, 0, 0, 1], "label": ["A", "A", "B", "A"],
                         "auroc": [0.8, 0.6, 0.5, 0.9]})
    wide = fr.wide_scores(long)
    assert wide.loc[("mnist", 0), "A"] == pytest.approx(0.7)
    assert math.isnan(wide.loc[("mnist", 1), "B"])


def test_cd_diagram_writes_png_and_pdf(tmp_path):
    rng = np.random.default_rng(0)
    names = ["GANomaly", "DSVDD", "iForest", "DAGMM", "MemAE", "f-AnoGAN", "Mem_GANomaly"]
    scores = pd.DataFrame(rng.uniform(0.5, 1.0, (10, len(names))) + np.linspace(0.3, 0, len(names)),
                          columns=names)
    result = fr.friedman_test(scores)
    written = fr.plot_cd_diagram(result, tmp_path / "cd" / "friedman", title="test")
    assert [p.name for p in written] == ["friedman.png", "friedman.pdf"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[0].stat().st_size > 5000
    assert written[1].read_bytes()[:5] == b"%PDF-"
    assert not list((tmp_path / "cd").glob(".tmp-*"))
