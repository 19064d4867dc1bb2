"""Issue 6, reliability, in process: rerun / --force / --report-only, record fields, --jobs 2,
failing and diverging detectors, determinism, unreadable records, a full or read-only disk."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from benchmark.cli import main
from benchmark.records import iter_records, read_record, read_scores
from fault_methods import assert_same_outcomes, cli_args, log_events, outcomes, select, shared_run_fixtures, temp_files

pytestmark = pytest.mark.usefixtures("in_process")  # from fault_methods, through conftest.py
CLASSES = (0, 1, 2, 3, 4)
JOB_DIR = Path("smoke", "paper", "mnist", "slow")


data, reference = shared_run_fixtures(CLASSES)


def _files(folder: Path) -> dict:
    """{path: (bytes, mtime_ns)} of every file under `folder`."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerun_force_report_only_and_record_fields(data, tmp_path, monkeypatch, capsys):
    results, reports, log = tmp_path / "results", tmp_path / "reports", tmp_path / "log"
    monkeypatch.setenv("FAULT_LOG", str(log))
    monkeypatch.setenv("FAULT_EPOCH_SECONDS", "0.05")  # each fit sleeps 2 epochs x 0.05 s
    args = cli_args(data, results, reports, classes=(0, 1))
    started = time.perf_counter()
    assert main(args) == 0
    wall = time.perf_counter() - started
    for path, record, problem in iter_records(results):
        assert problem is None
        assert {"dataset": "mnist", "method": "slow", "seed": 0, "profile": "smoke", "protocol": "paper",
                "status": "ok"}.items() <= record.items()
        assert record["normal_class"] == int(path.stem[5])
        assert set(record["metrics"]) >= {"auroc", "gmean", "false_alarm_rate", "miss_rate", "threshold"}
        # The timers enclose the fit (which sleeps 0.1 s) and the scoring, within the job, within the run.
        assert 0.1 <= record["train_seconds"] and 0 < record["score_seconds"]
        assert record["train_seconds"] + record["score_seconds"] <= record["seconds"] <= wall
        # Every normal training image is fitted on: --val-fraction is 0 by default (opt-in held-out split).
        assert record["sizes"] == {"n_train": 30, "n_test": 210, "n_test_normal": 10, "n_test_anomalous": 200}
        assert record["hyperparameters"] == {"epochs": 2, "batch_size": 8, "memory_size": 4, "random_state": 0}
        assert record["run_info"]["device"] == "cpu"
        assert record["versions"]["torch"] and record["versions"]["numpy"] and record["versions"]["python"]
        assert set(record["git"]) == {"commit", "dirty"}
        scores, labels = read_scores(path)
        assert scores.dtype == np.float64 and scores.shape == labels.shape == (210,)
    expected_commit = subprocess.run(["git", "-C", str(Path(__file__).parents[1]), "rev-parse", "HEAD"],
                                     capture_output=True, text=True).stdout.strip() or None
    assert record["git"]["commit"] == expected_commit
    assert len(log_events(log)) == 4  # start + end of two jobs
    capsys.readouterr()

    # A rerun trains nothing and touches no record.
    before = _files(results)
    assert main(args) == 0
    assert "2 jobs: 2 already recorded, 0 to run" in capsys.readouterr().out
    assert _files(results) == before and len(log_events(log)) == 4

    # --report-only rebuilds the very same tables.
    tables = {p.relative_to(reports): content for p, (content, _) in _files(reports).items()}
    shutil.rmtree(reports)
    assert main(cli_args(data, results, reports, "--report-only")) == 0
    assert {p.relative_to(reports): content for p, (content, _) in _files(reports).items()} == tables

    # --force trains every job again, to the same scores.
    old = outcomes(results)
    assert main([*args, "--force"]) == 0
    assert [event for event, _, _ in log_events(log)[4:]] == ["start", "end"] * 2
    after = _files(results)
    assert all(after[path][1] != before[path][1] for path in before if path.suffix in (".json", ".npz"))  # rewritten
    assert_same_outcomes(outcomes(results), old)


def test_two_parallel_jobs_give_the_same_records_as_one(data, reference, tmp_path):
    results = tmp_path / "results"
    assert main(cli_args(data, results, tmp_path / "reports", "--jobs", "2", classes=CLASSES)) == 0
    assert_same_outcomes(outcomes(results), reference[0])


def test_failing_and_diverging_detectors_are_recorded_and_the_rest_go_on(data, tmp_path, monkeypatch, capsys):
    results, reports, log = tmp_path / "results", tmp_path / "reports", tmp_path / "log"
    monkeypatch.setenv("FAULT_LOG", str(log))
    args = cli_args(data, results, reports, methods=("boom", "diverge", "nan_scores", "slow"), classes=(0,))
    assert main(args) == 1  # some job failed
    out = capsys.readouterr().out
    assert "[failed] mnist/boom/class0/seed0: boom: injected failure in epoch 1" in out
    assert "[diverged] mnist/diverge/class0/seed0: injected non-finite loss at epoch 1, step 3" in out
    assert "1 ok, 1 failed, 2 diverged" in out

    record = {r["method"]: r for _, r, _ in iter_records(results)}
    assert record["boom"]["status"] == "failed" and record["boom"]["metrics"] is None
    assert record["boom"]["error"]["type"] == "RuntimeError"
    assert "fault_methods.py" in record["boom"]["error"]["traceback"]
    assert "RuntimeError: boom: injected failure in epoch 1" in record["boom"]["error"]["traceback"]
    assert record["diverge"]["status"] == "diverged"
    assert record["diverge"]["divergence"] == {"epoch": 1, "step": 3, "detail": "injected non-finite loss"}
    assert record["nan_scores"]["status"] == "diverged"
    assert record["nan_scores"]["divergence"]["detail"] == "30 non-finite test scores"  # 210 scores, every 7th NaN
    assert record["slow"]["status"] == "ok"
    assert not (results / "smoke/paper/mnist/boom/class0_seed0.npz").exists()

    row = next(line for line in (reports / "smoke" / "table1_mnist_auroc.md").read_text().splitlines()
               if line.startswith("| 0 "))
    header = next(line for line in (reports / "smoke" / "table1_mnist_auroc.md").read_text().splitlines()
                  if line.startswith("| normal class"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["Boom"] == "failed (–)" and cells["Diverge"] == "diverged (–)" and cells["NanScores"] == "diverged (–)"
    assert cells["Slow"] == f"**{record['slow']['metrics']['auroc']:.4f}** (–)"

    # A rerun retries the failed job only; the diverged ones stay recorded; the exit code still says so.
    capsys.readouterr()
    before = len(log_events(log))
    assert main(args) == 1
    assert [job.split("-")[0] for event, _, job in log_events(log)[before:] if event == "start"] == ["Boom"]


def test_same_seed_same_scores_bit_for_bit_with_run_info(data, tmp_path):
    results = tmp_path / "results"
    args = cli_args(data, results, tmp_path / "reports", "--device", "cpu", "--seeds", "3", methods=("tiny_ae",),
                    classes=(2,))
    assert main(args) == 0
    path = results / "smoke" / "paper" / "mnist" / "tiny_ae" / "class2_seed3.json"
    first, first_record = read_scores(path)[0], read_record(path)
    assert main([*args, "--force"]) == 0
    np.testing.assert_array_equal(read_scores(path)[0], first)
    info = read_record(path)["run_info"]
    assert info["device"] == "cpu" and info["torch_num_threads"] == read_record(path)["threads"]
    assert info["deterministic_algorithms"] in (True, False) and "bit-identical on CPU" in info["determinism"]
    assert first_record["hyperparameters"]["random_state"] == 3
    # Another seed gives other scores (the seed reaches the detector).
    other = cli_args(data, results, tmp_path / "reports", "--device", "cpu", "--seeds", "4", methods=("tiny_ae",),
                     classes=(2,))
    assert main(other) == 0
    assert not np.array_equal(read_scores(path.with_name("class2_seed4.json"))[0], first)


def test_unreadable_records_are_named_and_treated_as_missing(data, reference, tmp_path, capsys):
    results, reports = tmp_path / "results", tmp_path / "reports"
    shutil.copytree(reference[1], results)
    job_dir = results / JOB_DIR
    truncated = job_dir / "class0_seed0.json"
    truncated.write_bytes(truncated.read_bytes()[:200])
    edited = job_dir / "class1_seed0.json"
    record = json.loads(edited.read_text())
    edited.write_text(json.dumps({**record, "metrics": {**record["metrics"], "auroc": "0.99 (checked by hand)"}}))
    older = job_dir / "class2_seed0.json"
    older.write_text(json.dumps({k: v for k, v in json.loads(older.read_text()).items()
                                 if k not in ("schema_version", "protocol")}))
    bad_scores = job_dir / "class3_seed0.npz"
    bad_scores.write_bytes(bad_scores.read_bytes()[:100])

    assert main(cli_args(data, results, reports, "--report-only")) == 0
    err = capsys.readouterr().err
    for path, why in ((truncated, "unreadable record"), (edited, "status ok but metrics incomplete"),
                      (older, "missing fields"), (bad_scores, "unreadable scores")):
        assert f"{path}: {why}" in err
        assert str(path) in (reports / "smoke" / "table1_mnist_auroc.md").read_text()
    rows = (reports / "smoke" / "records.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and "class4_seed0.json" in rows[0]

    # A run treats them as missing: it warns by name and redoes exactly those four jobs.
    assert main(cli_args(data, results, reports, classes=CLASSES)) == 0
    captured = capsys.readouterr()
    assert "5 jobs: 1 already recorded, 4 to run" in captured.out
    assert all(str(path) in captured.err for path in (truncated, edited, older))
    assert_same_outcomes(outcomes(results), reference[0])


def test_scores_file_of_another_run_is_not_read_back(data, reference, tmp_path):
    """A --force rewrite killed between its two renames pairs the old JSON with the new scores."""
    results = tmp_path / "results"
    shutil.copytree(reference[1], results)
    job_dir = results / JOB_DIR
    shutil.copy(job_dir / "class1_seed0.npz", job_dir / "class0_seed0.npz")
    with pytest.raises(Exception, match="belongs to another run"):
        read_record(job_dir / "class0_seed0.json")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs when this process may mount one (root), else a plain folder (the tests
    then inject the same errors by patching)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    yield folder, bool(mounted)
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_names_the_path_and_keeps_written_records(data, reference, small_disk, tmp_path, monkeypatch, capsys):
    folder, mounted = small_disk
    results, reports = folder / "results", tmp_path / "reports"
    assert main(cli_args(data, results, reports, classes=(0,))) == 0
    kept = _files(results)
    if mounted:
        filler = _fill(folder)  # the real thing
    else:
        def no_space(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", no_space)
    capsys.readouterr()

    assert main(cli_args(data, results, reports, classes=(0, 1, 2))) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(results / JOB_DIR / "class1_seed0.npz") in err
    assert "records already written are intact" in err
    assert _files(results) == {**kept, **{p: v for p, v in _files(results).items() if p.suffix == ".lock"}}
    assert temp_files(results) == []

    if mounted:
        filler.unlink()
    else:
        monkeypatch.undo()
    assert main(cli_args(data, results, reports, classes=(0, 1, 2))) == 0
    assert_same_outcomes(outcomes(results), select(reference[0], (0, 1, 2)))


def test_read_only_results_folder_is_a_usage_error_naming_it(data, small_disk, tmp_path, monkeypatch, capsys):
    folder, mounted = small_disk
    results = folder / "results"
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    else:
        import benchmark.cli

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(benchmark.cli.tempfile, "NamedTemporaryFile", read_only)
        results.mkdir()
    assert main(cli_args(data, results, tmp_path / "reports", classes=(0,))) == 2
    err = capsys.readouterr().err
    assert f"cannot write into the results folder {results}: Read-only file system" in err


def test_stray_temp_files_of_a_claimed_job_are_left_to_its_runner(tmp_path):
    from benchmark.records import JobKey, JobLock, remove_idle_stray_temp_files

    key = JobKey("mnist", 0, "slow", 0, "smoke", "paper")
    key.directory(tmp_path).mkdir(parents=True)
    stray = key.directory(tmp_path) / ".tmp-class0_seed0.npz.abc123"
    stray.write_bytes(b"half")
    other = key.directory(tmp_path) / ".tmp-class1_seed0.npz.abc123"  # another job's
    other.write_bytes(b"half")
    holder = JobLock(key.lock_path(tmp_path))
    assert holder.acquire()
    assert remove_idle_stray_temp_files(key, tmp_path) == [] and stray.exists()  # a live runner is writing it
    holder.release()
    assert remove_idle_stray_temp_files(key, tmp_path) == [stray] and not stray.exists()
    assert other.exists()
