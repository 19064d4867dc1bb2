"""Issue 6, reliability, with real processes and signals: Ctrl-C / SIGTERM stop a run at once and
a rerun does only the missing jobs; SIGKILL in the middle of a write leaves nothing that is read
back as a result; two runners on one results folder never lose a record nor train a job twice.
Every disturbed run must end with records equal, bit for bit, to an uninterrupted run's."""
from __future__ import annotations

import csv
import os
import shutil
import signal
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.records import existing_record, read_record
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

pytestmark = pytest.mark.usefixtures("in_process")  # from fault_methods, through conftest.py
CLASSES = (0, 1, 2, 3)
JOB_DIR = Path("smoke", "paper", "mnist", "slow")
STARTUP = 180  # seconds a subprocess may take to import torch & co. on a loaded 2-core machine


data, reference = shared_run_fixtures(CLASSES)


def _stop_with(process, sig, group: bool) -> int:
    (os.killpg if group else os.kill)(process.pid, sig)
    return process.wait(timeout=60)  # a run that ignores the signal fails here, not on a stopwatch


def test_ctrl_c_stops_at_once_and_rerun_does_only_missing_jobs(data, reference, tmp_path, processes, monkeypatch):
    results, log = tmp_path / "results", tmp_path / "log"
    names = job_classes(data, CLASSES)
    runner = launch(cli_args(data, results, tmp_path / "reports"), tmp_path, FAULT_LOG=str(log),
                    FAULT_EPOCH_SECONDS="1")
    processes.append(runner)
    wait_for(lambda: sum(e == "start" for e, _, _ in log_events(log)) >= 2, STARTUP, "the second job to start")

    code = _stop_with(runner, signal.SIGINT, group=True)  # what Ctrl-C in a terminal sends
    assert code == 130, output_of(runner)
    assert "interrupted" in output_of(runner)
    finished = {names[job] for event, _, job in log_events(log) if event == "end"}
    interrupted = {names[job] for event, _, job in log_events(log) if event == "start"} - finished
    assert finished and interrupted
    # The finished jobs have their records; the interrupted one has nothing, not even a temp file.
    assert sorted(outcomes(results)) == sorted(select(reference[0], finished))
    assert not any((results / JOB_DIR / f"class{k}_seed0.{ext}").exists()
                   for k in interrupted for ext in ("json", "npz"))
    assert temp_files(results) == []

    monkeypatch.setenv("FAULT_LOG", str(log))
    before = len(log_events(log))
    assert main(cli_args(data, results, tmp_path / "reports")) == 0
    rerun = [names[job] for event, _, job in log_events(log)[before:] if event == "start"]
    assert sorted(rerun) == sorted(set(CLASSES) - finished)  # no finished job is trained again
    assert_same_outcomes(outcomes(results), reference[0])


def test_sigterm_stops_parallel_workers_and_rerun_completes(data, reference, tmp_path, processes, monkeypatch):
    results, log = tmp_path / "results", tmp_path / "log"
    runner = launch(cli_args(data, results, tmp_path / "reports", "--jobs", "2"), tmp_path,
                    FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="1")
    processes.append(runner)
    wait_for(lambda: len({pid for e, pid, _ in log_events(log) if e == "start"}) >= 2, STARTUP, "two workers to train")
    assert len(live_group_members(runner.pid)) >= 3  # the runner and its two workers

    code = _stop_with(runner, signal.SIGTERM, group=False)  # to the runner only, as `kill` does
    assert code == 130, output_of(runner)
    wait_for(lambda: live_group_members(runner.pid) == [], 20, "the workers to exit")
    ended = {job for event, _, job in log_events(log) if event == "end"}
    names = job_classes(data, CLASSES)
    recorded = outcomes(results)  # every record there is readable ...
    assert set(recorded) <= set(select(reference[0], [names[job] for job in ended]))  # ... and of a finished job

    monkeypatch.setenv("FAULT_LOG", str(log))
    before = len(log_events(log))
    assert main(cli_args(data, results, tmp_path / "reports")) == 0
    rerun = {names[job] for event, _, job in log_events(log)[before:] if event == "start"}
    assert rerun == set(CLASSES) - {read_record(results / name)["normal_class"] for name in recorded}
    assert temp_files(results) == []  # a worker killed mid-write leaves temp files; the rerun removes them
    assert_same_outcomes(outcomes(results), reference[0])


@pytest.mark.parametrize("killed_in, force", [("class1_seed0.json", False), ("class1_seed0.npz", True),
                                             ("class1_seed0.json", True)])
def test_sigkill_mid_write_is_never_read_back(data, reference, tmp_path, processes, capsys, killed_in, force):
    """Killed half-way through writing class 1's JSON (its scores already renamed into place) on a
    fresh run, or its scores or JSON on a --force rewrite of existing records."""
    results, reports = tmp_path / "results", tmp_path / "reports"
    if force:
        shutil.copytree(reference[1], results)
    runner = launch(cli_args(data, results, reports, *(["--force"] if force else [])), tmp_path,
                    FAULT_KILL_WRITING=killed_in)
    processes.append(runner)
    assert runner.wait(timeout=STARTUP) == -signal.SIGKILL, output_of(runner)

    strays = temp_files(results)
    assert [p.name.split(".")[:3] for p in strays] == [["", "tmp-class1_seed0", killed_in.split(".")[1]]]
    assert strays[0].stat().st_size > 0  # half-written
    assert (results / JOB_DIR / "class1_seed0.lock").exists()  # the dead runner's claim
    # Class 1 is read back only as the old record whose scores are intact; a JSON paired with the
    # new run's scores is refused.
    old_pair_intact = force and killed_in.endswith(".npz")
    record, problem = existing_record(results, _key(1))
    assert (record is not None) == old_pair_intact
    assert (problem is not None) == (force and killed_in.endswith(".json"))
    if problem:
        assert "belongs to another run" in problem

    assert main(cli_args(data, results, reports, "--report-only")) == 0
    expected = [0, 1, 2, 3] if old_pair_intact else [0, 2, 3] if force else [0]
    with open(reports / "smoke" / "records.csv") as handle:
        assert [int(row["normal_class"]) for row in csv.DictReader(handle)] == expected
    capsys.readouterr()

    assert main(cli_args(data, results, reports)) == 0  # the stale lock does not block
    done = len(expected)
    assert f"4 jobs: {done} already recorded, {4 - done} to run" in capsys.readouterr().out
    assert temp_files(results) == []  # cleaned, also beside a record that stays
    assert_same_outcomes(outcomes(results), reference[0])


def _key(normal_class):
    from benchmark.records import JobKey

    return JobKey("mnist", normal_class, "slow", 0, "smoke", "paper")


def test_two_runners_on_one_folder_train_each_job_once(data, reference, tmp_path, processes):
    results, log = tmp_path / "results", tmp_path / "log"
    # Overlapping job lists; each fit waits until both runners are training, so they overlap.
    env = {"FAULT_LOG": str(log), "FAULT_EPOCH_SECONDS": "0.5", "FAULT_BARRIER": "2"}
    first = launch(cli_args(data, results, tmp_path / "reports-a", classes=(0, 1, 2)), tmp_path, **env)
    second = launch(cli_args(data, results, tmp_path / "reports-b", classes=CLASSES), tmp_path, **env)
    processes.extend([first, second])
    assert first.wait(timeout=STARTUP) == 0, output_of(first)
    assert second.wait(timeout=STARTUP) == 0, output_of(second)

    events = log_events(log)
    names = job_classes(data, CLASSES)
    assert len({pid for _, pid, _ in events}) == 2  # both runners trained
    for job, normal_class in names.items():
        mine = [(event, pid) for event, pid, name in events if name == job]
        assert [e for e, _ in mine] == ["start", "end"] and mine[0][1] == mine[1][1], f"class {normal_class}: {mine}"
    assert_same_outcomes(outcomes(results), reference[0])
    # Each runner's summary counts what it trained and names what the other finished meanwhile.
    trainer = {names[job]: pid for event, pid, job in events if event == "start"}
    for runner, classes in ((first, (0, 1, 2)), (second, CLASSES)):
        mine = sorted(k for k in classes if trainer[k] == runner.pid)
        others = sorted(k for k in classes if trainer[k] != runner.pid)
        line = output_of(runner).splitlines()[-2]
        assert line.startswith(f"ran {len(mine)} jobs in ") and f": {len(mine)} ok, 0 failed" in line, line
        if others:
            listed = line.split("finished by another runner meanwhile (not counted above): ")[1]
            assert sorted(int(x.split("/class")[1].split("/")[0]) for x in listed.split(", ")) == others, line
        else:
            assert "another runner" not in line, line
