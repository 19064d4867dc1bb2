"""Issue 13: the runner on a Dask cluster and on several GPUs, and no ghost workers.

With real processes and signals: a real LocalCluster of 2 worker processes gives the same
records, bit for bit, as a local run; a worker killed mid-run leaves no corrupt record, the run
reports the lost job and a rerun completes it; a SIGKILLed runner's workers (loky or Dask) exit
within a bounded wait and a rerun completes every job. GPU placement is tested as pure functions
on faked GPU lists (no GPU here)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("dask.distributed")

from benchmark.backends import claim_slot, gpu_for_slot, gpus_to_spread, process_alive, process_start_time  # noqa: E402
from benchmark.cli import main  # noqa: E402
from fault_methods import (  # noqa: E402,F401
    assert_same_outcomes,
    cli_args,
    in_process,
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

pytestmark = pytest.mark.usefixtures("in_process")  # imported from fault_methods
CLASSES = (0, 1, 2, 3)
STARTUP = 180  # seconds a subprocess may take to import torch & co. (and start Dask workers) on a loaded machine
EXIT_WAIT = 30  # seconds the workers of a killed runner may take to notice and exit

data, reference = shared_run_fixtures(CLASSES)


# ---- placement on several GPUs (pure functions; unmeasured on real GPUs) --------------------
def test_gpus_are_spread_only_for_unindexed_cuda_with_several_gpus_and_workers():
    four = ["0", "1", "2", "3"]
    assert gpus_to_spread(["cuda"] * 5, four, 4) == ("0", "1", "2", "3")
    assert gpus_to_spread(["auto", "auto"], ["2", "5"], 2) == ("2", "5")  # CUDA_VISIBLE_DEVICES=2,5
    assert gpus_to_spread(["cuda:1"], four, 4) == ()          # an explicit GPU is kept
    assert gpus_to_spread(["cuda", "cuda:1"], four, 4) == ()
    assert gpus_to_spread(["cpu"], four, 4) == ()
    assert gpus_to_spread(["cuda"], ["0"], 4) == ()           # one GPU: nothing to spread
    assert gpus_to_spread(["cuda"], four, 1) == ()            # one worker
    assert gpus_to_spread([], four, 4) == ()                  # detectors without a device (iforest)


def test_worker_slots_map_round_robin_onto_gpus():
    assert [gpu_for_slot(k, ["0", "1", "2"]) for k in range(7)] == ["0", "1", "2", "0", "1", "2", "0"]
    assert [gpu_for_slot(k, ["GPU-a", "GPU-b"]) for k in range(3)] == ["GPU-a", "GPU-b", "GPU-a"]
    with pytest.raises(ValueError):
        gpu_for_slot(0, [])


def test_worker_slots_are_exclusive_and_freed_when_their_holder_goes(tmp_path):
    first, fd0 = claim_slot(tmp_path)
    second, fd1 = claim_slot(tmp_path)
    assert (first, second) == (0, 1)
    os.close(fd0)  # what the OS does when the worker holding slot 0 dies
    again, fd2 = claim_slot(tmp_path)
    assert again == 0
    third, fd3 = claim_slot(tmp_path)
    assert third == 2
    for fd in (fd1, fd2, fd3):
        os.close(fd)


PLACED_WORKER = """
import os, sys, time
from benchmark.backends import WorkerSetup, prepare_worker
prepare_worker(WorkerSetup(gpu_slots_dir=sys.argv[1], gpus=("3", "5")))
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(120)
"""


def test_each_worker_process_sees_only_its_gpu(tmp_path):
    """Three worker processes of a run spread over two (faked) GPUs 3 and 5: 3, 5, 3."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    workers, seen = [], []
    try:
        for k in range(3):
            out = tmp_path / f"out{k}"
            with open(out, "w") as handle:
                workers.append(subprocess.Popen([sys.executable, "-c", PLACED_WORKER, str(tmp_path)], stdout=handle,
                                                env=env))
            wait_for(lambda: out.read_text().strip() or workers[-1].poll() is not None, 120, f"worker {k}")
            seen.append(out.read_text().strip())
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    assert seen == ["3", "5", "3"]


# ---- the watchdog ---------------------------------------------------------------------------
def test_process_alive_tells_running_dead_zombie_and_reused_pids():
    me = os.getpid()
    assert process_alive(me) and process_alive(me, process_start_time(me))
    assert not process_alive(me, "0")  # same pid, another start time: a reused pid
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 30,
             "the child to exit")
    assert not process_alive(child.pid)  # a zombie is dead
    child.wait()
    assert not process_alive(child.pid)


WATCHED_WORKER = """
import os, sys, time
from benchmark.backends import start_watchdog, process_start_time
runner = int(sys.argv[1])
start_watchdog(runner, process_start_time(runner), poll_seconds=0.2)
print(os.getpid(), flush=True)
time.sleep(120)
"""


def test_watchdog_ends_a_worker_whose_runner_was_killed(tmp_path):
    """A runner starts a worker process and is SIGKILLed; the worker, adopted by init, exits."""
    runner_code = (f"import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', {WATCHED_WORKER!r}, "
                   "str(__import__('os').getpid())]); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(tmp_path / "out", "w") as out:
        runner = subprocess.Popen([sys.executable, "-c", runner_code], stdout=out, env=env, start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "out").read_text().strip(), 60, "the worker to start")
        worker = int((tmp_path / "out").read_text())
        assert process_alive(worker)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        wait_for(lambda: not process_alive(worker), EXIT_WAIT, f"worker {worker} to exit")
    finally:
        if live_group_members(runner.pid):
            os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()


# ---- whole runs -----------------------------------------------------------------------------
def _workers_in_log(log: Path) -> dict[int, str]:
    return {pid: job for event, pid, job in log_events(log) if event == "start"}


@pytest.mark.parametrize("backend, sig", [("local", signal.SIGKILL), ("dask", signal.SIGKILL),
                                         ("dask", signal.SIGTERM)])
def test_killed_runner_leaves_no_workers_and_rerun_completes(backend, sig, data, reference, tmp_path, processes,
                                                             monkeypatch):
    """SIGKILL: the workers notice and exit. SIGTERM (as Ctrl-C): exit 130, the runner stops them."""
    results, log = tmp_path / "results", tmp_path / "log"
    runner = launch(cli_args(data, results, tmp_path / "reports", "--jobs", "2", "--backend", backend), tmp_path,
                    FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="2")
    processes.append(runner)
    wait_for(lambda: len(_workers_in_log(log)) >= 2, STARTUP, "two workers to train")
    workers = sorted(_workers_in_log(log))
    assert runner.pid not in workers

    killed = time.monotonic()
    os.kill(runner.pid, sig)
    code = runner.wait(timeout=60)
    assert code == (130 if sig == signal.SIGTERM else -signal.SIGKILL), output_of(runner)
    wait_for(lambda: not any(process_alive(pid) for pid in workers), EXIT_WAIT, f"workers {workers} to exit")
    print(f"{backend}: runner {runner.pid} got signal {sig}, exit {code}; workers {workers} gone after "
          f"{time.monotonic() - killed:.1f} s")
    wait_for(lambda: live_group_members(runner.pid) == [], EXIT_WAIT, "every process of the run to exit")

    names = job_classes(data, CLASSES)
    ended = [names[job] for event, _, job in log_events(log) if event == "end"]
    recorded = outcomes(results)  # every record there is readable ...
    assert set(recorded) <= set(select(reference[0], ended))  # ... and of a job that finished

    monkeypatch.setenv("FAULT_LOG", str(log))
    assert main(cli_args(data, results, tmp_path / "reports")) == 0
    assert temp_files(results) == []
    assert_same_outcomes(outcomes(results), reference[0])


def _kill_worker_training(log: Path, names: dict, normal_class: int) -> int:
    """SIGKILL the worker process that trains `normal_class`'s job (from its start line in the log)."""
    wait_for(lambda: normal_class in [names[job] for job in _workers_in_log(log).values()], STARTUP,
             f"class {normal_class} to start")
    pid = next(pid for pid, job in _workers_in_log(log).items() if names[job] == normal_class)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_dask_worker_killed_mid_run_is_reported_lost_and_rerun_completes(data, reference, tmp_path, processes,
                                                                         monkeypatch):
    """A real LocalCluster of 2 worker processes. The runner hands a job whose worker died to
    another worker until `allowed-failures` (the runner's Dask config); at 0, the first death loses the job."""
    results, log = tmp_path / "results", tmp_path / "log"
    names = job_classes(data, CLASSES)
    runner = launch(cli_args(data, results, tmp_path / "reports", "--jobs", "2", "--backend", "dask"), tmp_path,
                    FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="1", DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    processes.append(runner)
    killed = _kill_worker_training(log, names, 1)
    code = runner.wait(timeout=STARTUP)
    out = output_of(runner)
    assert code == 1, out
    assert "3 ok, 0 failed, 0 diverged, 1 lost" in out and "mnist/slow/class1/seed0" in out, out
    assert re.search(r"\[lost\] mnist/slow/class1/seed0: its worker process died: worker tcp://\S+ died while "
                     r"running it", out), out
    assert not process_alive(killed)
    # The other jobs are recorded as in a local run; the lost one has no record, nothing is corrupt.
    assert_same_outcomes(outcomes(results), select(reference[0], [0, 2, 3]))

    monkeypatch.setenv("FAULT_LOG", str(log))
    before = len(log_events(log))
    assert main(cli_args(data, results, tmp_path / "reports", "--jobs", "2", "--backend", "dask")) == 0
    assert [names[job] for event, _, job in log_events(log)[before:] if event == "start"] == [1]
    assert temp_files(results) == []
    assert_same_outcomes(outcomes(results), reference[0])  # the same records as a local run, bit for bit


def test_dask_reruns_the_job_of_a_killed_worker_by_default(data, reference, tmp_path, processes):
    results, log = tmp_path / "results", tmp_path / "log"
    names = job_classes(data, CLASSES)
    runner = launch(cli_args(data, results, tmp_path / "reports", "--jobs", "2", "--backend", "dask"), tmp_path,
                    FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="1")
    processes.append(runner)
    killed = _kill_worker_training(log, names, 2)
    assert runner.wait(timeout=STARTUP) == 0, output_of(runner)
    starts = [(pid, names[job]) for event, pid, job in log_events(log) if event == "start"]
    assert sorted(k for _, k in starts) == [0, 1, 2, 2, 3]  # class 2 twice: killed, then rerun elsewhere
    assert [pid for pid, k in starts if k == 2][0] == killed
    assert_same_outcomes(outcomes(results), reference[0])


def test_local_worker_killed_mid_run_loses_unfinished_jobs_and_rerun_completes(data, reference, tmp_path, processes,
                                                                              monkeypatch):
    """loky stops its whole pool when a worker dies: the jobs without a result are lost."""
    results, log = tmp_path / "results", tmp_path / "log"
    names = job_classes(data, CLASSES)
    runner = launch(cli_args(data, results, tmp_path / "reports", "--jobs", "2"), tmp_path,
                    FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="1")
    processes.append(runner)
    _kill_worker_training(log, names, 1)
    code = runner.wait(timeout=STARTUP)
    out = output_of(runner)
    assert code == 1, out
    assert "mnist/slow/class1/seed0" in out.split("lost (")[1], out
    ended = [names[job] for event, _, job in log_events(log) if event == "end"]
    assert_same_outcomes(outcomes(results), select(reference[0], ended))

    monkeypatch.setenv("FAULT_LOG", str(log))
    assert main(cli_args(data, results, tmp_path / "reports")) == 0
    assert temp_files(results) == []
    assert_same_outcomes(outcomes(results), reference[0])


@pytest.mark.parametrize("extra, message", [
    (["--backend", "spark"], "unknown backend 'spark'; valid choices: local, dask"),
    (["--scheduler", "tcp://head:8786"], "--scheduler needs --backend dask")])
def test_backend_usage_errors_exit_2_and_write_nothing(extra, message, data, tmp_path, capsys):
    assert main(cli_args(data, tmp_path / "results", tmp_path / "reports", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()


# ---- a worker that dies between a job's end and the fetch of its result (stop 25's CI hang) ---
class _FakeFuture:
    """A finished job whose result is on a worker that has gone (`result` times out, as distributed's
    does while it waits for a recomputation that never comes)."""

    def __init__(self, status: str) -> None:
        self.status = status

    def done(self) -> bool:
        return self.status == "finished"

    def result(self, timeout=None):
        raise TimeoutError


class _FakeClient:
    def __init__(self, nthreads_answers: list) -> None:
        self.answers, self.cancelled = nthreads_answers, []

    def nthreads(self) -> dict:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def cancel(self, futures, force=False) -> None:
        self.cancelled += futures


@pytest.mark.parametrize("status, answers", [
    ("finished", [{"tcp://a:1": 1}, {}]),  # seen finished, the worker gone when its result is fetched
    ("lost", [{}]),                        # the scheduler said the finished job's data went with its worker
])
def test_a_result_whose_worker_is_gone_is_reported_lost_instead_of_awaited(status, answers, monkeypatch):
    import distributed

    from benchmark.backends import Lost, _DaskDispatch, _DaskWorker

    monkeypatch.setattr(distributed, "wait", lambda *args, **kwargs: None)
    client = _FakeClient(answers)
    dispatch = _DaskDispatch(client, len, ["job0"], None, (), timeout=60, where="here")
    dispatch.workers["tcp://a:1"] = _DaskWorker("tcp://a:1", 1, "a", cores=1)
    future = _FakeFuture(status)
    dispatch.pending, dispatch.running = [], {future: (0, "tcp://a:1")}
    (item, result), = list(dispatch.run())
    assert item == "job0" and isinstance(result, Lost)
    assert result.error == "worker tcp://a:1 died after the job ended, before its result reached the runner"
    assert client.cancelled == [future] and not dispatch.running and not dispatch.pending
