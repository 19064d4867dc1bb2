"""Small defects: an interrupted or finished run leaves no job lock files (and the lock protocol stays
safe when a lock file is deleted under a waiting runner); method names stay whole in LaTeX headers;
every table lists the detectors in one order."""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import threading
from pathlib import Path

import pandas as pd
import pytest

from benchmark.records import JobLock, read_record
from benchmark.reports import load_records, paper_labels, write_reports
from fault_methods import (
    assert_same_outcomes,
    cli_args,
    job_classes,
    launch,
    live_group_members,
    log_events,
    outcomes,
    output_of,
    select,
    shared_run_fixtures,
    temp_files,
    wait_for,
)
from report_demo import LABELS, demo_results, synthetic_record

CLASSES = (0, 1, 2)
STARTUP = 180  # seconds a subprocess may take to import torch & co. on a loaded 2-core machine

data, reference = shared_run_fixtures(CLASSES)


def _locks(folder: Path) -> list[Path]:
    return sorted(Path(folder).rglob("*.lock"))


# ---- lock files -----------------------------------------------------------------------------------
def test_finished_run_leaves_no_lock_files(reference):
    results = reference[1]
    assert len(list(results.rglob("*.json"))) == len(CLASSES) and _locks(results) == []


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_leaves_no_lock_files_and_keeps_finished_records(data, reference, tmp_path, processes, jobs):
    results, log = tmp_path / "results", tmp_path / "log"
    names = job_classes(data, CLASSES)
    runner = launch(cli_args(data, results, tmp_path / "reports", "--jobs", jobs, classes=CLASSES), tmp_path,
                    FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="1")
    processes.append(runner)
    # The first job has ended (jobs 1) or two are training at once (jobs 2).
    wait_for(lambda: sum(e == "start" for e, _, _ in log_events(log)) >= 2, STARTUP, "the second job to start")
    assert _locks(results)  # a job in progress holds its lock file

    os.killpg(runner.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: to every process of the group
    assert runner.wait(timeout=60) == 130, output_of(runner)
    wait_for(lambda: live_group_members(runner.pid) == [], 30, "the workers to exit")
    assert _locks(results) == [], output_of(runner)
    # The records there are those of finished jobs (the first one's at least with one job at a time),
    # intact: equal, bit for bit, to an uninterrupted run's.
    finished = {names[job] for event, _, job in log_events(log) if event == "end"}
    recorded = outcomes(results)  # fails on an unreadable record
    assert set(recorded) <= set(select(reference[0], finished)) and (recorded or jobs == "2")
    assert_same_outcomes(recorded, {name: reference[0][name] for name in recorded})
    assert temp_files(results) == []


def test_lock_deleted_under_a_waiting_runner_is_taken_afresh(tmp_path, monkeypatch):
    """A waits on the file B holds; B deletes it on release, and C creates and locks a new one before
    B lets go. A must end up waiting on C's file, never holding the deleted one beside C."""
    path = tmp_path / "job" / "class0_seed0.lock"
    b, c = JobLock(path), JobLock(path)
    assert b.acquire()
    a_waits, real_flock, c_took = threading.Event(), fcntl.flock, []

    def flock(fd: int, operation: int) -> None:
        if threading.current_thread().name == "A" and not operation & fcntl.LOCK_NB:
            a_waits.set()  # A has opened B's file and waits on it
        if operation == fcntl.LOCK_UN and a_waits.is_set() and not c_took:  # B's release: file deleted, still held
            c_took.append(c.acquire())
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    a = JobLock(path)
    thread = threading.Thread(target=a.acquire, kwargs={"blocking": True}, name="A", daemon=True)
    thread.start()
    assert a_waits.wait(10)
    b.release()
    assert c_took == [True] and path.exists()
    thread.join(0.5)
    assert thread.is_alive()  # A waits on C's file: no second holder of the job's lock
    c.release()
    thread.join(10)
    assert not thread.is_alive() and path.exists()  # A holds the file now at the path
    assert not JobLock(path).acquire()
    a.release()
    assert not path.exists()


def test_release_keeps_a_lock_file_that_is_no_longer_its_own(tmp_path):
    path = tmp_path / "class0_seed0.lock"
    first = JobLock(path)
    assert first.acquire()
    path.unlink()  # removed by hand while held
    second = JobLock(path)
    assert second.acquire()
    first.release()
    assert path.exists() and not JobLock(path).acquire()  # the second runner's file and lock stay
    second.release()
    assert not path.exists()


# ---- LaTeX headers --------------------------------------------------------------------------------
def test_latex_headers_keep_method_names_whole(tmp_path):
    demo_results(tmp_path / "results")
    write_reports(tmp_path / "results", tmp_path / "reports", "quick")
    for name in ("table1_mnist_auroc.tex", "table4_mnist_threshold_metrics.tex"):
        text = (tmp_path / "reports" / "quick" / name).read_text()
        for label in ("Mem\\_GANomaly", "f-AnoGAN", "GANomaly", "pyod:knn"):
            assert re.search(rf"(^|& ){re.escape(label)}( &| \\\\$)", text, re.M), (name, label)  # a cell of its own
        assert "Mem\\_\\\\" not in text and "f-\\\\" not in text and "pyod:\\\\" not in text


# ---- one detector order ---------------------------------------------------------------------------
def _header(markdown: str, start: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


def _first_column(markdown: str, after: str) -> list[str]:
    lines = markdown.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| ---"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("| "):
            break
        rows.append(line.strip("|").split("|")[0].strip())
    return rows


def test_every_table_lists_the_detectors_in_one_order(tmp_path):
    results, folder = tmp_path / "results", tmp_path / "reports" / "quick"
    health = {"per_epoch": {"memory_slots_in_use": [3.0], "memory_slots_per_query": [1.0], "memory_max_weight": [0.9],
                            "query_norm": [2.0], "memory_row_norm": [1.0]}}
    methods = list(LABELS)[::-1]  # written in the opposite order, so no order comes from the writing
    for c in range(10):
        for i, method in enumerate(methods):
            for seed in (0, 1):
                synthetic_record(results, "mnist", c, method, seed=seed, separation=0.4 + 0.2 * i)
    # The best epoch comes from record fields; alphabetically these four would be DSVDD, GANomaly, MemAE,
    # Mem_GANomaly. Memory health, of the two with a memory, too.
    for method in ("dsvdd", "ganomaly", "memae", "mem_ganomaly"):
        for path in (results / "quick" / "paper" / "mnist" / method).glob("class*_seed*.json"):
            record = read_record(path)
            if method in ("memae", "mem_ganomaly"):  # the detectors with a memory (Detector.memory_size_param)
                record["training_log"] = health
            record["diagnostics"] = {"best_epoch_on_test_OPTIMISTIC": {"epoch": 1, "auroc": 0.9}}
            path.write_text(json.dumps(record))
    write_reports(results, tmp_path / "reports", "quick")
    order = paper_labels() + ["pyod:knn"]  # Table 1's: the paper's columns, then the others alphabetically
    four = [label for label in order if label in ("DSVDD", "GANomaly", "MemAE", "Mem_GANomaly")]
    assert four == ["MemAE", "GANomaly", "DSVDD", "Mem_GANomaly"]

    assert _header((folder / "table1_mnist_auroc.md").read_text(), "| normal class") == order
    assert _first_column((folder / "table4_mnist_threshold_metrics.md").read_text(), "**Mean threshold") == order
    assert _header((folder / "seeds_mnist.md").read_text(), "| normal class") == order
    best = _header((folder / "best_epoch_mnist.md").read_text(), "| normal class")
    assert [column.split(":")[0] for column in best if column.endswith(": final")] == four
    health_rows = _first_column((folder / "memory_health_mnist.md").read_text(), "Last epoch")
    assert list(dict.fromkeys(health_rows)) == ["MemAE", "Mem_GANomaly"]
    in_csv = pd.read_csv(folder / "records.csv")["label"].tolist()
    assert list(dict.fromkeys(in_csv)) == order and len(in_csv) == len(load_records(results, "quick")[0])
