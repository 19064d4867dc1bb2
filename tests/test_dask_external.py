"""Issue 18: the runner on a real external Dask cluster (`dask scheduler` and `dask worker`
processes started here on 127.0.0.1, as a cluster user starts them), with faults injected.

Every test is bounded in time and checks that nothing finished is lost:
- a worker whose Python cannot import the package gets no job, and the run exits 2 naming the
  worker and the failed import, instead of hanging;
- a cluster that loses all its workers ends the run within MEMGAN_DASK_WORKER_TIMEOUT, the
  finished records kept, the rest reported "not started", and a rerun completes it;
- a worker killed mid-job loses only that job (no job waits queued on a worker);
- each job's torch threads follow its worker host's cores over its Dask threads;
- a worker that cannot see the data root never downloads: its jobs fail naming the path.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("dask.distributed")

from benchmark.backends import process_alive  # noqa: E402
from benchmark.records import iter_records  # noqa: E402
from fault_methods import (  # noqa: E402,F401
    REPO,
    TESTS,
    assert_same_outcomes,
    cli_args,
    finish,
    in_process,
    job_classes,
    launch,
    live_group_members,
    log_events,
    outcomes,
    output_of,
    select,
    shared_run_fixtures,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("in_process")
CLASSES = (0, 1, 2, 3)
STARTUP = 180       # seconds for a process to import torch & co. on a loaded machine
WORKER_WAIT = "5"   # MEMGAN_DASK_WORKER_TIMEOUT of the runners here
CORES = len(os.sched_getaffinity(0))

data, reference = shared_run_fixtures(CLASSES)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A `dask scheduler` and its `dask worker`s, each in its own process group."""

    def __init__(self, workdir: Path, scheduler_path: tuple = (REPO, TESTS)) -> None:
        self.workdir, self.port = workdir, _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []
        # The scheduler unpickles the jobs too: it runs from a Python that has the package (and the test detectors).
        self.scheduler = self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                                    "--no-dashboard"],
                                     {"PYTHONPATH": os.pathsep.join(map(str, scheduler_path))})
        wait_for(lambda: self._answers(), STARTUP, "the scheduler to listen")

    def _answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def _start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.workdir / f"{name}-{len(self.processes)}.log", "w")
        process = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler" if name == "scheduler"
                                    else "distributed.cli.dask_worker", *args[1:]], cwd=self.workdir,
                                   env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        process.log_path = log.name
        self.processes.append(process)
        return process

    def add_worker(self, nthreads: int = 1, pythonpath: tuple = (REPO, TESTS), **env: str) -> subprocess.Popen:
        """A `dask worker` (with its nanny, as by default) from a Python whose path is `pythonpath`;
        `env`: the fault-injection variables, which jobs read in the worker's process."""
        before = self.n_workers()
        worker = self._start("worker", ["worker", self.address, "--nthreads", str(nthreads), "--no-dashboard",
                                        "--host", "127.0.0.1"],
                             {"PYTHONPATH": os.pathsep.join(map(str, pythonpath)), **env})
        wait_for(lambda: self.n_workers() > before, STARTUP, "the worker to join")
        return worker

    def n_workers(self) -> int:
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            return len(client.nthreads())

    def stop(self, process: subprocess.Popen) -> None:
        if live_group_members(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def logs(self) -> list[Path]:
        """The scheduler's and workers' log files."""
        return [Path(process.log_path) for process in self.processes]

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    started = Cluster(tmp_path)
    try:
        yield started
    finally:
        started.close()


def _run(cluster: Cluster, data: Path, tmp_path: Path, *extra: str, **env: str) -> subprocess.Popen:
    return launch(cli_args(data, tmp_path / "results", tmp_path / "reports", "--backend", "dask", "--scheduler",
                           cluster.address, *extra), tmp_path, MEMGAN_DASK_WORKER_TIMEOUT=WORKER_WAIT, **env)


def _records(results: Path) -> dict:
    return {record["normal_class"]: record for _, record, _ in iter_records(results) if record is not None}


def _python_without_the_package(tmp_path: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes `import benchmark` fail as in a Python without it."""
    fake = tmp_path / "broken-python"
    (fake / "benchmark").mkdir(parents=True, exist_ok=True)
    (fake / "benchmark" / "__init__.py").write_text(
        "raise ImportError('simulated: this Python has no memgan-bench')\n")
    return fake


def test_a_worker_that_cannot_import_the_package_is_named_and_the_run_exits_2(cluster, data, tmp_path, processes):
    cluster.add_worker(pythonpath=(_python_without_the_package(tmp_path), TESTS))
    started = time.monotonic()
    runner = _run(cluster, data, tmp_path)
    processes.append(runner)
    code = finish(runner, STARTUP, *cluster.logs())
    out = output_of(runner)
    print(f"exit {code} after {time.monotonic() - started:.1f} s:\n{out}")
    assert code == 2, out
    assert re.search(r"Dask worker tcp://127\.0\.0\.1:\d+ cannot run the jobs \(ImportError: simulated: this "
                     r"Python has no memgan-bench\)", out), out
    assert "no worker of the Dask cluster at " + cluster.address in out and "install it there" in out, out
    assert "nothing was trained" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()


def test_a_scheduler_that_cannot_unpickle_the_jobs_exits_2_saying_so(data, tmp_path, processes):
    cluster = Cluster(tmp_path, scheduler_path=(_python_without_the_package(tmp_path), TESTS))
    try:
        cluster.add_worker()
        runner = _run(cluster, data, tmp_path)
        processes.append(runner)
        code = finish(runner, STARTUP, *cluster.logs())
    finally:
        cluster.close()
    out = output_of(runner)
    assert code == 2, out
    assert f"the Dask cluster at {cluster.address} could not run a job" in out and "simulated" in out, out
    assert "Traceback" not in out and "nothing was trained" in out, out
    assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()


def test_a_cluster_that_loses_all_workers_ends_the_run_and_keeps_finished_records(cluster, data, reference, tmp_path,
                                                                                  processes, monkeypatch):
    log = tmp_path / "log"
    worker = cluster.add_worker(FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="1")
    runner = _run(cluster, data, tmp_path)
    processes.append(runner)
    wait_for(lambda: [e for e, _, _ in log_events(log)].count("end") >= 1, STARTUP, "a first job to finish")
    wait_for(lambda: len(_records(tmp_path / "results")) >= 1, 30, "its record")
    # A second job starts only once the runner has the first one's result: the kill hits a running job.
    wait_for(lambda: [e for e, _, _ in log_events(log)].count("start") >= 2, STARTUP, "a second job to start")
    cluster.stop(worker)  # the worker and its nanny: the cluster has no worker left
    lost_at = time.monotonic()
    code = finish(runner, STARTUP, *cluster.logs())
    out = output_of(runner)
    print(f"exit {code} {time.monotonic() - lost_at:.1f} s after the last worker went:\n{out}")
    assert code == 1, out
    assert f"the Dask cluster at {cluster.address} has had no worker for {WORKER_WAIT} s" in out, out
    # The job its worker was running when it died is lost; the rest never started.
    assert re.search(r"ran \d+ jobs in .*, 1 lost \(worker died; rerun to do them: mnist/slow/class\d/seed0\), "
                     r"\d not started \(rerun to do them: ", out), out
    done = _records(tmp_path / "results")
    assert 1 <= len(done) < 4 and all(r["status"] == "ok" for r in done.values())
    assert all(r["run_info"]["torch_threads"] == r["threads"] == CORES for r in done.values())  # 1 worker, 1 thread

    cluster.add_worker()
    rerun = _run(cluster, data, tmp_path)
    processes.append(rerun)
    assert finish(rerun, STARTUP, *cluster.logs()) == 0, output_of(rerun)
    assert f"4 jobs: {len(done)} already recorded, {4 - len(done)} to run" in output_of(rerun)
    assert_same_outcomes(outcomes(tmp_path / "results"), reference[0])


def test_a_worker_that_dies_before_its_result_is_fetched_neither_hangs_the_run_nor_loses_the_record(
        cluster, data, reference, tmp_path, processes):
    """The CI hang of stop 25: the worker died after a job ended, before the runner fetched its result,
    and the runner waited forever for a recomputation that a job pinned to that worker never gets."""
    log, gate = tmp_path / "log", tmp_path / "fetch"
    worker = cluster.add_worker(FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="1")
    runner = _run(cluster, data, tmp_path, FAULT_HOLD_FETCH=str(gate))
    processes.append(runner)
    wait_for(lambda: [e for e, _, _ in log_events(log)].count("end") >= 1, STARTUP, "a first job to finish")
    wait_for(lambda: len(_records(tmp_path / "results")) >= 1, 30, "its record")
    cluster.stop(worker)
    wait_for(lambda: cluster.n_workers() == 0, 60, "the scheduler to see the worker go")
    gate.touch()  # now the runner fetches the result, from a worker that is gone
    code = finish(runner, STARTUP, *cluster.logs())
    out = output_of(runner)
    assert code == 1, out  # three jobs not started
    assert f"the Dask cluster at {cluster.address} has had no worker for {WORKER_WAIT} s" in out, out
    assert re.search(r"ran 1 jobs in .*: 1 ok, 0 failed, 0 diverged, 3 not started \(rerun to do them: ", out), out
    done = _records(tmp_path / "results")
    assert len(done) == 1 and all(r["status"] == "ok" for r in done.values())

    cluster.add_worker()
    rerun = _run(cluster, data, tmp_path)
    processes.append(rerun)
    assert finish(rerun, STARTUP, *cluster.logs()) == 0, output_of(rerun)
    assert "4 jobs: 1 already recorded, 3 to run" in output_of(rerun)
    assert_same_outcomes(outcomes(tmp_path / "results"), reference[0])


def test_a_killed_worker_loses_only_the_job_it_was_running(cluster, data, reference, tmp_path, processes):
    """Two single-thread workers, four jobs, allowed-failures 0: before, every job was submitted at
    once and queued two per worker, so a killed worker lost two."""
    log, names = tmp_path / "log", job_classes(data, CLASSES)
    for _ in range(2):
        cluster.add_worker(FAULT_LOG=str(log), FAULT_EPOCH_SECONDS="2")
    runner = _run(cluster, data, tmp_path, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    processes.append(runner)
    wait_for(lambda: any(names[job] == 1 for e, _, job in log_events(log) if e == "start"), STARTUP, "class 1 to start")
    pid = next(pid for e, pid, job in log_events(log) if e == "start" and names[job] == 1)
    os.kill(pid, signal.SIGKILL)
    code = finish(runner, STARTUP, *cluster.logs())
    out = output_of(runner)
    assert code == 1, out
    assert "3 ok, 0 failed, 0 diverged, 1 lost (worker died; rerun to do them: mnist/slow/class1/seed0)" in out, out
    assert not process_alive(pid)
    assert_same_outcomes(outcomes(tmp_path / "results"), select(reference[0], [0, 2, 3]))
    # Two single-thread workers on this host share its cores: each job ran max(1, cores // 2) threads.
    threads = max(1, CORES // 2)
    assert {(r["threads"], r["run_info"]["torch_threads"]) for r in _records(tmp_path / "results").values()} == \
        {(threads, threads)}


def test_a_worker_that_cannot_see_the_data_fails_its_jobs_naming_the_path_and_never_downloads(
        cluster, data, tmp_path, processes):
    copy = tmp_path / "data"
    subprocess.run(["cp", "-r", str(data), str(copy)], check=True)
    args = cli_args(copy, tmp_path / "results", tmp_path / "reports", "--backend", "dask", "--scheduler",
                    cluster.address, classes=(0, 1))
    args.remove("--no-download")  # downloads allowed: the runner has the data, the worker must still not fetch it
    runner = launch(args, tmp_path, MEMGAN_DASK_WORKER_TIMEOUT="120")
    processes.append(runner)
    # The runner checked the data (its "to run" line comes after the check); no worker yet.
    wait_for(lambda: "to run" in output_of(runner), STARTUP, "the runner to check the data")
    copy.rename(tmp_path / "data-elsewhere")
    cluster.add_worker()
    code = finish(runner, STARTUP, *cluster.logs())
    out = output_of(runner)
    assert code == 1, out
    assert "0 ok, 2 failed" in out, out
    assert not copy.exists()  # nothing downloaded
    for record in _records(tmp_path / "results").values():
        message = record["error"]["message"]
        assert str(copy / "MNIST" / "raw") in message and "jobs never download" in message, message
