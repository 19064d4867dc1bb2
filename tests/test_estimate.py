"""`run_all.py --estimate`: job counts and expected wall time, from finished records or a short
calibration (never a timing assertion: structure, positivity, monotonicity, the cache, and the
arithmetic on hand-made records and a fake clock)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import benchmark.estimate as estimate_module
from benchmark.cli import build_jobs, main, parse_config
from benchmark.data import CLASS_NAMES, load_dataset
from benchmark.estimate import (
    RemainingTime,
    calibrate,
    cpu_model,
    estimate_jobs,
    format_seconds,
    makespan,
    task_sizes,
)
from benchmark.profiles import PROFILE_SUBSAMPLE
from benchmark.splits import make_task
from methods import get_method
from methods.torch_base import Stage
from record_factory import write_fake_record

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
    monkeypatch.setattr(estimate_module, "busy_fraction", lambda window=0.5: 0.0)  # the cache's reuse is tested
    code, out, err = run_estimate(capsys, shared_data, tmp_path, "--device", "cpu")
    assert code == 0
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))
    lines = out.splitlines()
    summary = next(line for line in lines if line.startswith("estimate on cpu"))
    n_classes = {dataset: len(names) for dataset, names in CLASS_NAMES.items()}  # every registered dataset
    assert f" {len(METHODS) * sum(n_classes.values())} jobs" in summary
    assert "(range " in summary and "calibration" in out  # thin evidence: a range, and where it comes from
    full = total_seconds(summary)
    assert full > 0
    rows = [line.split() for line in lines if line.startswith("  ") and line.split()[0] in METHODS]
    assert len(rows) == len(METHODS) * len(n_classes) and all(int(row[2]) == n_classes[row[1]] for row in rows)
    assert all(int(row[3]) > 0 for row in rows if row[0] != "iforest")  # planned optimiser steps per job
    assert "calibrating" in err and (tmp_path / "calibration.json").exists()
    if full > 3600:  # on a CPU past an hour the run names the quick profile with its own estimate
        assert "--profile quick" in out

    # Fewer jobs: a smaller estimate, from the cached calibration (nothing recalibrated).
    code, out, err = run_estimate(capsys, shared_data, tmp_path, "--device", "cpu", "--classes", "0", "1")
    assert code == 0 and "calibrating" not in err
    summary = next(line for line in out.splitlines() if line.startswith("estimate on cpu"))
    assert f" {len(METHODS) * 2 * len(n_classes)} jobs" in summary
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


def test_makespan_hands_jobs_out_in_order():
    assert makespan([], 2) == 0.0
    assert makespan([5.0, 1.0, 1.0, 1.0], 1) == 8.0
    # Two processes: 5 | 1, 1, 1 -> the first finishes at 5, the second at 3.
    assert makespan([5.0, 1.0, 1.0, 1.0], 2) == 5.0
    # In order, not the best packing: 1 | 1, then 5 goes to the first free one (at 1) -> 6.
    assert makespan([1.0, 1.0, 5.0], 2) == 6.0


def test_remaining_time_scales_estimates_by_what_finished_jobs_measured():
    remaining = RemainingTime({"a": 10.0, "b": 10.0, "c": 20.0}, n_parallel=1)
    assert remaining.seconds() == 40.0 and remaining.text() == "about 40 s left"
    remaining.finished("a", 20.0)  # took twice its estimate: the rest is scaled by (20 + 4) / (10 + 4)
    assert remaining.seconds() == pytest.approx(30.0 * 24 / 14)
    remaining.finished("b", 0.0)  # a job that did not run here (claimed, recorded) says nothing of the speed
    assert remaining.seconds() == pytest.approx(20.0 * 24 / 14)
    assert RemainingTime({}, 2).seconds() is None and RemainingTime({}, 2).text() == ""


def _quick_jobs(shared_data, tmp_path, *methods: str, classes=("0", "1")) -> list:
    return build_jobs(parse_config(["--dataset", "mnist", "--profile", "quick", "--methods", *methods, "--classes",
                                    *classes, "--device", "cpu", "--data-root", str(shared_data),
                                    "--results-dir", str(tmp_path / "results")]))


def _timing_record(results, job, train_seconds: float, score_seconds: float, rest: float, n_train: int,
                   n_test: int, **extra) -> None:
    detector = get_method(job.key.method).load()(**job.params)
    write_fake_record(results, job.key.dataset, job.key.normal_class, job.key.method, 0.7, seed=job.key.seed,
                      profile="quick", hyperparameters=detector.get_params(), train_seconds=train_seconds,
                      score_seconds=score_seconds, seconds=train_seconds + score_seconds + rest,
                      sizes={"n_train": n_train, "n_test": n_test}, threads=torch.get_num_threads(),
                      cpu_model=cpu_model(), run_info={"device": "cpu", "precision": "fp32"}, **extra)


def test_estimate_from_finished_records_scales_by_planned_steps(shared_data, tmp_path, monkeypatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("records of the same setting exist: nothing is calibrated")

    monkeypatch.setenv("MEMGAN_CALIBRATION_CACHE", str(tmp_path / "calibration.json"))
    monkeypatch.setattr(estimate_module, "calibrate", no_calibration)
    jobs = _quick_jobs(shared_data, tmp_path, "memae")
    results = tmp_path / "results"
    detector = get_method("memae").load()(**jobs[0].params)
    # Three finished records of class 0 at 6,400 training images, 100 s of training each at the median.
    for seed, train_seconds in zip((5, 6, 7), (90.0, 100.0, 130.0)):
        job = jobs[0].__class__(jobs[0].key.__class__(**{**vars(jobs[0].key), "seed": seed}), "quick",
                                jobs[0].params, jobs[0].target, jobs[0].label)
        _timing_record(results, job, train_seconds, 10.0, 2.0, 6400, 1000)
    # Records of another setting, another precision, made with --track-auroc or on 3 threads are not used.
    odd = jobs[1]
    _timing_record(results, odd, 1e6, 0, 0, 6400, 1000, diagnostics={"auroc_per_epoch": []})
    got = estimate_jobs(jobs[:1], str(shared_data), False, 1, "cpu", results_dir=results)
    (job,) = got.jobs
    n_train, n_test = task_sizes(load_dataset("mnist", shared_data, False).train_labels,
                                 load_dataset("mnist", shared_data, False).test_labels, 0, "paper",
                                 PROFILE_SUBSAMPLE["quick"])
    scale = sum(detector.planned_steps(n_train).values()) / sum(detector.planned_steps(6400).values())
    assert job.source == "records" and job.n_records == 3
    assert job.train_seconds == pytest.approx(100.0 * scale)
    assert job.score_seconds == pytest.approx(10.0 * n_test / 1000) and job.overhead_seconds == pytest.approx(2.0)
    assert job.low == pytest.approx(min(t * scale for t in (90, 100, 130)) + 10.0 * n_test / 1000 + 2.0)
    assert job.high == pytest.approx(130.0 * scale + 10.0 * n_test / 1000 + 2.0)
    # A held-out run trains on fewer images: fewer planned steps, a smaller figure.
    held = estimate_jobs(jobs[:1], str(shared_data), False, 1, "cpu", results_dir=results, val_fraction=0.5)
    assert held.jobs[0].train_seconds < job.train_seconds


def test_calibration_drops_warm_up_and_takes_the_median_of_whole_periods(monkeypatch):
    from methods.memae import MemAE

    stages = [Stage("a", 4, epochs=1, max_steps_param="max_steps", epochs_param="epochs"),
              Stage("b", 4, epochs=1, max_steps_param="b_steps", epochs_param=None, period=2)]
    now = [0.0]

    class Clocked(MemAE):
        def _stages(self, n_train):
            caps = {"a": self.max_steps, "b": getattr(self, "b_steps", 1)}
            return [Stage(s.name, s.batch_size, epochs=None, max_steps=caps[s.name], max_steps_param=s.max_steps_param,
                          epochs_param=None, period=s.period) for s in stages]

        def __init__(self, b_steps: int = 1, max_steps=None, device: str = "cpu", random_state: int = 0):
            super().__init__(max_steps=max_steps, device=device, random_state=random_state)
            self.b_steps = b_steps

        def _fit(self, x_train, epoch_callback):
            self._build_networks(x_train)
            for stage in self._stages(len(x_train)):
                def step(idx, number, stage=stage):
                    warm = number <= 2
                    cost = 1.0 if stage.period == 1 else (3.0 if number % 2 == 0 else 1.0)
                    now[0] += 50.0 if warm else cost
                    return torch.zeros(1)
                self._train_stage(stage, len(x_train), step, ("loss",), None)

        def _clock_now(self):
            return now[0]

    Clocked.__module__ = __name__
    globals()["Clocked"] = Clocked
    cal = calibrate(f"{__name__}:Clocked", {"device": "cpu", "max_steps": 1}, (1, 28, 28), steps=4)
    # Stage a: 2 warm-up steps dropped, 4 timed at 1 s. Stage b: warm-up rounded to a whole period (2),
    # then at least three whole periods (6 steps), each (1 + 3) / 2 per step.
    assert cal["step_seconds"] == {"a": pytest.approx(1.0), "b": pytest.approx(2.0)}
    assert cal["steps_timed"] == {"a": 4, "b": 6}


def test_a_busy_calibration_is_redone_once_the_machine_is_idle(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGAN_CALIBRATION_CACHE", str(tmp_path / "calibration.json"))
    calls = []

    def fake_calibrate(target, params, shape, steps, precision="fp32"):
        calls.append(target)
        return {"kind": "linear", "fit_seconds_per_image": 1e-3, "score_seconds_per_image": 1e-4}

    monkeypatch.setattr(estimate_module, "calibrate", fake_calibrate)
    jobs = _quick_jobs(shared_data, tmp_path, "iforest", classes=("0",))
    monkeypatch.setattr(estimate_module, "busy_fraction", lambda window=0.5: 0.9)
    log: list[str] = []
    estimate_jobs(jobs, str(shared_data), False, 1, "cpu", log.append)
    assert len(calls) == 1 and "busy" in log[0]
    estimate_jobs(jobs, str(shared_data), False, 1, "cpu", log.append)  # still busy: the cached figure stays
    assert len(calls) == 1
    monkeypatch.setattr(estimate_module, "busy_fraction", lambda window=0.5: 0.0)
    estimate_jobs(jobs, str(shared_data), False, 1, "cpu", log.append)
    assert len(calls) == 2 and any("recalibrating" in line for line in log)
    estimate_jobs(jobs, str(shared_data), False, 1, "cpu", log.append)  # an idle calibration is kept
    assert len(calls) == 2
    entry = next(iter(next(iter(json.loads((tmp_path / "calibration.json").read_text()).values())).values()))
    assert entry["busy"] is False


def test_a_calibration_far_from_finished_records_is_dropped(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGAN_CALIBRATION_CACHE", str(tmp_path / "calibration.json"))
    monkeypatch.setattr(estimate_module, "busy_fraction", lambda window=0.5: 0.0)
    monkeypatch.setattr(estimate_module, "calibrate", lambda *a: {"kind": "linear", "fit_seconds_per_image": 1.0,
                                                                  "score_seconds_per_image": 0.0})
    jobs = _quick_jobs(shared_data, tmp_path, "iforest", classes=("0", "1"))
    results = tmp_path / "results"
    estimate_jobs(jobs[1:], str(shared_data), False, 1, "cpu")  # caches 1 s per image: 1,000 s for 1,000 images
    _timing_record(results, jobs[0], 10.0, 0.0, 0.0, 1000, 100)  # ... but such a job took 10 s
    got = estimate_jobs(jobs, str(shared_data), False, 1, "cpu", results_dir=results)
    assert got.jobs[0].source == "records" and any("dropped" in note for note in got.notes)
    (entries,) = json.loads((tmp_path / "calibration.json").read_text()).values()  # one device
    assert entries == {}  # the calibration was dropped
    assert np.isfinite(got.wall_seconds)
