"""scripts/precision_fidelity.py: bf16 vs fp32 records of the same jobs, paired, tested and judged.

Synthetic records written by the project's own writer (record_factory) in tmp_path; a hand-worked
example of 3 methods x 3 classes x 3 seeds whose AUROC differences are known.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from record_factory import write_fake_record

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("precision_fidelity", ROOT / "scripts" / "precision_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["precision_fidelity"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


pf = _load_script()

SEEDS = (1, 2, 3)
CLASSES = (0, 1, 2)
# fp32 AUROC per class and seed: per-class sds (ddof = 1) 0.02, 0.01, 0.03 -> mean seed sd 0.02.
FP32 = {0: (0.70, 0.72, 0.74), 1: (0.80, 0.81, 0.82), 2: (0.60, 0.63, 0.66)}
# bf16 - fp32 per class and seed, by method:
DIFFS = {
    # large systematic shift: mean -0.10, sd sqrt(28e-4 / 8), largest |d| 0.13 on class 2, seed 1
    "ganomaly": {0: (-0.10, -0.12, -0.08), 1: (-0.11, -0.09, -0.10), 2: (-0.13, -0.07, -0.10)},
    # bf16 changes nothing
    "memae": {c: (0.0, 0.0, 0.0) for c in CLASSES},
    # small mixed differences, two of them zero
    "dsvdd": {0: (0.01, -0.005, 0.0), 1: (0.002, -0.01, 0.004), 2: (-0.003, 0.006, 0.0)},
}
HYPER = {"lr": 0.002, "epochs": 1, "batch_size": 64, "random_state": 0, "device": "auto"}
SAMPLING = {"sample_seed": 123, "max_train": None, "max_test_normal": None, "max_test_anomalous": 5000,
            "val_fraction": 0.0}
SIZES = {"n_train": 100, "n_test": 200}


def write(results: Path, method: str, normal_class: int, seed: int, auroc, precision: str, *,
          profile=None, recorded_precision="same", threads=1, train_seconds=None, hyper=None, sampling=None,
          status="ok", dataset="mnist"):
    """One record as the runner writes it for `precision` (bf16: profile quick+bf16, run_info.precision)."""
    profile = profile or ("quick" if precision == "fp32" else "quick+bf16")
    run_info = {"device": "cpu", "torch_num_threads": threads}
    if recorded_precision is not None:
        run_info["precision"] = precision if recorded_precision == "same" else recorded_precision
    if train_seconds is None:
        train_seconds = 20.0 if precision == "fp32" else 10.0
    return write_fake_record(results, dataset, normal_class, method, auroc, seed=seed, profile=profile, status=status,
                             run_info=run_info, threads=threads, train_seconds=train_seconds,
                             hyperparameters={**HYPER, "random_state": seed, **(hyper or {})},
                             sampling={**SAMPLING, **(sampling or {})}, sizes=SIZES, cpu_model="Test CPU",
                             worker_host="testhost", method_label=method.upper())


def write_example(fp32_root: Path, bf16_root: Path, methods=("ganomaly", "memae", "dsvdd")) -> None:
    for method in methods:
        for c in CLASSES:
            for i, seed in enumerate(SEEDS):
                write(fp32_root, method, c, seed, FP32[c][i], "fp32")
                write(bf16_root, method, c, seed, FP32[c][i] + DIFFS[method][c][i], "bf16")


def differences(method: str) -> np.ndarray:
    """The differences as the script computes them (bf16 - fp32 of the stored floats), class by class."""
    return np.array([(FP32[c][i] + DIFFS[method][c][i]) - FP32[c][i] for c in CLASSES for i in range(len(SEEDS))])


def run(tmp_path: Path, fp32: Path, bf16: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    code = pf.main(["--fp32", str(fp32), "--bf16", str(bf16), "--out", str(out), *extra])
    return code, out


def read_csv(out: Path) -> dict:
    with open(out / "fidelity.csv", newline="") as handle:
        return {row["method"]: row for row in csv.DictReader(handle)}


@pytest.fixture
def example(tmp_path):
    fp32, bf16 = tmp_path / "fp32_results", tmp_path / "bf16_results"
    write_example(fp32, bf16)
    return fp32, bf16


def test_hand_worked_numbers(tmp_path, example):
    code, out = run(tmp_path, *example)
    assert code == 0
    rows = read_csv(out)
    assert set(rows) == {"ganomaly", "memae", "dsvdd"}
    g = rows["ganomaly"]
    assert int(g["pairs"]) == 9 and int(g["classes"]) == 3 and g["seeds_per_class"] == "3"
    assert float(g["mean_diff"]) == pytest.approx(-0.10, abs=1e-12)
    assert float(g["sd_diff"]) == pytest.approx(math.sqrt(28e-4 / 8), abs=1e-12)
    assert float(g["max_abs_diff"]) == pytest.approx(-0.13, abs=1e-12)
    assert g["max_abs_diff_job"] == "mnist/ganomaly/class2/seed1"
    assert float(g["seed_sd"]) == pytest.approx(0.02, abs=1e-12)
    assert int(g["seed_sd_classes"]) == 3
    half = stats.t.ppf(0.975, 8) * math.sqrt(28e-4 / 8) / 3
    assert float(g["ci95_low"]) == pytest.approx(-0.10 - half, abs=1e-12)
    assert float(g["ci95_high"]) == pytest.approx(-0.10 + half, abs=1e-12)
    # all nine differences negative: W = 0, exact two-sided p = 2 / 2**9
    assert float(g["wilcoxon_statistic"]) == 0 and float(g["wilcoxon_p"]) == pytest.approx(2 / 2**9)
    assert float(rows["ganomaly"]["time_ratio_fp32_over_bf16"]) == pytest.approx(2.0)
    # the mixed method: mean, sd and the largest difference straight from the designed values
    d = differences("dsvdd")
    s = rows["dsvdd"]
    assert float(s["mean_diff"]) == pytest.approx(d.mean(), abs=1e-15)
    assert float(s["mean_diff"]) == pytest.approx(0.004 / 9, abs=1e-12)
    assert float(s["sd_diff"]) == pytest.approx(d.std(ddof=1), abs=1e-15)
    assert float(s["max_abs_diff"]) == pytest.approx(0.01, abs=1e-12)
    assert s["max_abs_diff_job"] == "mnist/dsvdd/class0/seed1"  # the first of the two |0.01|, in job order


@pytest.mark.parametrize("method", ["ganomaly", "memae", "dsvdd"])
def test_wilcoxon_matches_scipy(tmp_path, example, method):
    code, out = run(tmp_path, *example)
    assert code == 0
    row = read_csv(out)[method]
    expected = stats.wilcoxon(differences(method), zero_method="zsplit", alternative="two-sided")
    assert int(row["wilcoxon_n"]) == 9
    assert row["wilcoxon_zero_method"] == "zsplit"
    assert float(row["wilcoxon_statistic"]) == pytest.approx(float(expected.statistic))
    assert float(row["wilcoxon_p"]) == pytest.approx(float(expected.pvalue))


def test_verdicts(tmp_path, example):
    code, out = run(tmp_path, *example)
    assert code == 0
    rows = read_csv(out)
    assert rows["memae"]["verdict"] == "within seed noise" and rows["memae"]["direction"] == ""
    assert float(rows["memae"]["mean_diff"]) == 0.0 and float(rows["memae"]["wilcoxon_p"]) == 1.0
    assert rows["ganomaly"]["verdict"] == "differs" and rows["ganomaly"]["direction"] == "bf16 lower"
    assert rows["dsvdd"]["verdict"] == "within seed noise"  # p = 0.7, |mean| = 0.0004 << 0.02
    text = (out / "fidelity.md").read_text()
    assert "**differs (bf16 lower)**" in text and "**within seed noise**" in text
    assert "within seed noise** when the Wilcoxon" in text  # the rule is stated
    assert f"--fp32 {example[0]}" in text  # and the command
    assert "measured on cpu, Test CPU, 1 thread, host testhost" in text


def test_bf16_higher_direction(tmp_path):
    fp32, bf16 = tmp_path / "a", tmp_path / "b"
    for c in CLASSES:
        for i, seed in enumerate(SEEDS):
            write(fp32, "f_anogan", c, seed, FP32[c][i], "fp32")
            write(bf16, "f_anogan", c, seed, FP32[c][i] + 0.05 + 0.001 * i, "bf16")
    code, out = run(tmp_path, fp32, bf16)
    assert code == 0
    row = read_csv(out)["f_anogan"]
    assert (row["verdict"], row["direction"]) == ("differs", "bf16 higher")


def test_decide_rule():
    assert pf.decide(0.01, 0.5, 0.02) == ("within seed noise", "")
    assert pf.decide(0.03, 0.5, 0.02) == ("differs", "bf16 higher")   # too large, even without a shift found
    assert pf.decide(-0.001, 0.01, 0.02) == ("differs", "bf16 lower")  # small but systematic
    assert pf.decide(0.0, float("nan"), 0.02) == ("within seed noise", "")
    assert pf.decide(0.5, 0.5, None)[0] == "no verdict (no seed noise available)"
    assert pf.decide(-0.05, 0.01, None) == ("differs", "bf16 lower")  # one seed, but a shift the test finds


def test_refuses_fp32_records_in_the_bf16_folder(tmp_path, capsys):
    fp32, wrong = tmp_path / "fp32", tmp_path / "wrong"
    for c in CLASSES:
        write(fp32, "memae", c, 1, FP32[c][0], "fp32")
        # in a folder named quick+bf16, but the records say they trained in fp32
        write(wrong, "memae", c, 1, FP32[c][0], "bf16", recorded_precision="fp32")
    code, out = run(tmp_path, fp32, wrong)
    assert code == 2 and not out.exists()
    assert "not bf16" in capsys.readouterr().err
    # given the profile folder itself
    assert run(tmp_path, fp32, wrong / "quick+bf16")[0] == 2
    # a bf16 folder that is an fp32 run's profile folder (records fp32 by run_info)
    assert run(tmp_path, fp32, fp32 / "quick")[0] == 2
    assert "not bf16" in capsys.readouterr().err
    # a bf16 results root with fp32 profile folders only: no bf16 records, the fp32 folder named
    assert run(tmp_path, fp32, fp32)[0] == 2
    err = capsys.readouterr().err
    assert "no bf16 records" in err and "quick (3 records)" in err


def test_refuses_bf16_records_on_the_fp32_side(tmp_path, example, capsys):
    fp32, bf16 = example
    assert run(tmp_path, bf16 / "quick+bf16", bf16)[0] == 2
    assert "not fp32" in capsys.readouterr().err


def test_precision_by_profile_name_when_not_recorded(tmp_path, capsys):
    """Records without run_info.precision (iForest, failed jobs) count by their profile folder's name."""
    fp32, bf16 = tmp_path / "a", tmp_path / "b"
    for c in CLASSES:
        for i, seed in enumerate(SEEDS):
            write(fp32, "iforest", c, seed, FP32[c][i], "fp32", recorded_precision=None)
            write(bf16, "iforest", c, seed, FP32[c][i], "bf16", recorded_precision=None)
    code, out = run(tmp_path, fp32, bf16)
    assert code == 0
    row = read_csv(out)["iforest"]
    assert row["precision_recorded"] == "no" and row["verdict"] == "within seed noise"
    assert "a control" in (out / "fidelity.md").read_text()
    # an unrecorded record in a folder without +bf16 is fp32: refused on the bf16 side
    assert run(tmp_path, fp32, fp32 / "quick")[0] == 2


def test_one_results_root_for_both_sides(tmp_path):
    root = tmp_path / "results"
    write_example(root, root, methods=("memae",))
    write(root, "memae", 0, 1, 0.5, "fp32", profile="smoke+val0.1+bf16", recorded_precision="fp32")
    # the stray folder above is bf16 by name but fp32 inside: refused ...
    assert run(tmp_path, root, root)[0] == 2
    (root / "smoke+val0.1+bf16" / "paper" / "mnist" / "memae" / "class0_seed1.json").unlink()
    # ... and without it each side takes its own profile folders, the other precision's listed as left out
    code, out = run(tmp_path, root, root)
    assert code == 0
    assert int(read_csv(out)["memae"]["pairs"]) == 9
    text = (out / "fidelity.md").read_text()
    assert "left out (other precision by name): `quick+bf16` (9)" in text
    assert "left out (other precision by name): `quick` (9)" in text


def test_refuses_two_fp32_profiles_of_one_job(tmp_path, example, capsys):
    fp32, bf16 = example
    write(fp32, "memae", 0, 1, 0.7, "fp32", profile="quick+mytag")
    assert run(tmp_path, fp32, bf16)[0] == 2
    err = capsys.readouterr().err
    assert "more than one fp32 record" in err and "quick+mytag" in err
    assert run(tmp_path, fp32 / "quick", bf16)[0] == 0


def test_unpaired_jobs_are_listed(tmp_path, example):
    fp32, bf16 = example
    (bf16 / "quick+bf16" / "paper" / "mnist" / "memae" / "class2_seed3.json").unlink()       # fp32 only
    write(bf16, "memae", 1, 2, None, "bf16", status="failed")                                 # not ok in bf16
    write(bf16, "memae", 5, 1, 0.9, "bf16")                                                   # bf16 only
    write(fp32, "dagmm", 0, 1, 0.6, "fp32")                                                   # fp32 only method
    code, out = run(tmp_path, fp32, bf16)
    assert code == 0
    rows = read_csv(out)
    assert int(rows["memae"]["pairs"]) == 7 and "dagmm" not in rows
    text = (out / "fidelity.md").read_text()
    unpaired = text.split("## Jobs not paired", 1)[1]
    assert "mnist/memae/class2/seed3: only in the fp32 folder (status ok)" in unpaired
    assert "mnist/memae/class1/seed2: not ok on both sides: fp32 ok, bf16 failed" in unpaired
    assert "mnist/memae/class5/seed1: only in the bf16 folder (status ok)" in unpaired
    assert "mnist/dagmm/class0/seed1: only in the fp32 folder (status ok)" in unpaired
    assert "jobs not paired: 4" in text


def test_methods_filter(tmp_path, example, capsys):
    code, out = run(tmp_path, *example, "--methods", "memae")
    assert code == 0
    assert set(read_csv(out)) == {"memae"}
    assert "None: every job is on both sides and ok." in (out / "fidelity.md").read_text()
    assert run(tmp_path, *example, "--methods", "mem_ganomaly")[0] == 2
    assert "--methods mem_ganomaly" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"hyper": {"lr": 0.001}}, "hyperparameters differ: lr 0.002 (fp32) vs 0.001 (bf16)"),
    ({"sampling": {"val_fraction": 0.1}}, "sampling differ: val_fraction 0.0 (fp32) vs 0.1 (bf16)"),
    ({"profile": "paper+bf16"}, "base profile differs: quick (fp32) vs paper (bf16)"),
])
def test_refuses_pairs_that_differ_besides_precision(tmp_path, capsys, change, message):
    fp32, bf16 = tmp_path / "a", tmp_path / "b"
    for c in CLASSES:
        for i, seed in enumerate(SEEDS):
            write(fp32, "memae", c, seed, FP32[c][i], "fp32")
            write(bf16, "memae", c, seed, FP32[c][i], "bf16", **(change if c == 1 else {}))
    code, out = run(tmp_path, fp32, bf16)
    assert code == 2 and not out.exists()
    assert message in capsys.readouterr().err


def test_thread_count_difference_is_a_warning(tmp_path, capsys):
    fp32, bf16 = tmp_path / "a", tmp_path / "b"
    for c in CLASSES:
        for i, seed in enumerate(SEEDS):
            write(fp32, "memae", c, seed, FP32[c][i], "fp32", threads=1)
            write(bf16, "memae", c, seed, FP32[c][i], "bf16", threads=2)
    code, out = run(tmp_path, fp32, bf16)
    assert code == 0
    assert "thread count differs" in capsys.readouterr().err
    text = (out / "fidelity.md").read_text()
    assert "## Warnings" in text and "thread count differs: fp32 1 (torch 1), bf16 2 (torch 2)" in text
    assert "9 pair(s)" in text


def test_no_seed_noise_with_one_seed(tmp_path):
    fp32, bf16 = tmp_path / "a", tmp_path / "b"
    for c in CLASSES:
        write(fp32, "memae", c, 1, FP32[c][0], "fp32")
        write(bf16, "memae", c, 1, FP32[c][0] - 0.01, "bf16")
    code, out = run(tmp_path, fp32, bf16)
    assert code == 0
    row = read_csv(out)["memae"]
    assert row["verdict"] == "no verdict (no seed noise available)" and row["seed_sd"] == ""
    text = (out / "fidelity.md").read_text()
    assert "no seed noise available" in text
    assert "no outcome can reach p < 0.05" in text  # 3 pairs: the test cannot decide anything


def test_missing_folder_and_usage(tmp_path, capsys):
    assert run(tmp_path, tmp_path / "nope", tmp_path / "nope")[0] == 2
    assert "no such folder" in capsys.readouterr().err
    assert pf.main(["--fp32", "x"]) == 2
