"""`run_all.py --estimate`: job counts and expected wall time from a short calibration (never a
timing assertion: only structure, positivity, monotonicity and the cache)."""
from __future__ import annotations

import re

import pytest

from benchmark.cli import main
from benchmark.data import load_dataset
from benchmark.estimate import format_seconds, task_sizes
from benchmark.runner import PROFILE_SUBSAMPLE
from benchmark.splits import make_task
from methods import get_method
from methods.torch_base import Stage

# The three cheapest detectors to calibrate; every detector goes through the same code.
METHODS = ["iforest", "dagmm", "memae"]
UNITS = {"s": 1, "min": 60, "h": 3600, "days": 86400}


def total_seconds(line: str) -> float:
    match = re.search(r"(\d+) jobs, about ([\d.]+) (s|min|h|days) wall time", line)
    assert match, line
    return float(match.group(2)) * UNITS[match.group(3)]


def run_estimate(capsys, shared_data, tmp_path, *extra: str) -> tuple[int, str, str]:
    code = main(["--dataset", "all", "--profile", "paper", "--methods", *METHODS, "--data-root", str(shared_data),
                 "--no-download", "--results-dir", str(tmp_path / "results"),
                 "--reports-dir", str(tmp_path / "reports"), "--estimate", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_of_the_paper_profile_on_the_cpu(capsys, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGAN_CALIBRATION_CACHE", str(tmp_path / "calibration.json"))
    monkeypatch.setenv("MEMGAN_CALIBRATION_STEPS", "1")
    code, out, err = run_estimate(capsys, shared_data, tmp_path, "--device", "cpu")
    assert code == 0
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))
    lines = out.splitlines()
    summary = next(line for line in lines if line.startswith("estimate on cpu"))
    assert " 90 jobs" in summary  # 3 datasets x 10 classes x 3 methods
    full = total_seconds(summary)
    assert full > 0
    rows = [line.split() for line in lines if line.startswith("  ") and line.split()[0] in METHODS]
    assert len(rows) == 9 and all(int(row[2]) == 10 for row in rows)
    assert all(int(row[3]) > 0 for row in rows if row[0] != "iforest")  # planned optimiser steps per job
    assert "calibrating" in err and (tmp_path / "calibration.json").exists()
    if full > 3600:  # on a CPU past an hour the run names the quick profile with its own estimate
        assert "--profile quick" in out

    # Fewer jobs: a smaller estimate, from the cached calibration (nothing recalibrated).
    code, out, err = run_estimate(capsys, shared_data, tmp_path, "--device", "cpu", "--classes", "0", "1")
    assert code == 0 and "calibrating" not in err
    summary = next(line for line in out.splitlines() if line.startswith("estimate on cpu"))
    assert " 18 jobs" in summary
    assert 0 < total_seconds(summary) < full


@pytest.mark.parametrize("dataset,normal_class,protocol,profile", [
    ("mnist", 3, "paper", "paper"), ("mnist", 8, "standard", "quick"), ("fashion_mnist", 0, "paper", "smoke")])
def test_task_sizes_are_counted_as_make_task_draws_them(shared_data, dataset, normal_class, protocol, profile):
    data = load_dataset(dataset, shared_data, download=False)
    sizes = make_task(data, normal_class, protocol, PROFILE_SUBSAMPLE[profile]).sizes
    assert task_sizes(data.train_labels, data.test_labels, normal_class, protocol, PROFILE_SUBSAMPLE[profile]) == \
        (sizes["n_train"], sizes["n_test"])


def test_planned_steps_follow_the_budget():
    assert Stage("s", 64, epochs=15).planned_steps(5923) == 15 * 92  # drop_last: 5923 // 64 = 92
    assert Stage("s", 64, epochs=2, drop_last=False).planned_steps(100) == 4
    assert Stage("s", 64, epochs=15, max_steps=4).planned_steps(5923) == 4
    assert Stage("s", 64, epochs=None, max_steps=50_000).planned_steps(10) == 50_000
    f_anogan = get_method("f_anogan").load()(gan_epochs=7, encoder_max_steps=50_000, batch_size=64)
    assert f_anogan.planned_steps(6000) == {"gan": 7 * 93, "encoder": 50_000}
    dsvdd = get_method("dsvdd").load()(epochs=150, ae_epochs=150, batch_size=200, ae_batch_size=200)
    assert dsvdd.planned_steps(6001) == {"pretrain": 150 * 30, "svdd": 150 * 30}  # a last batch of one is dropped
    assert format_seconds(30) == "30 s" and format_seconds(7200) == "2.0 h" and format_seconds(3 * 86400) == "3.0 days"
