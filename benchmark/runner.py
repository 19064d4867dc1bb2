"""The job runner: a run's jobs, each (dataset, class, method, seed, profile, protocol) -> one record.

Every job is trained with a fixed budget, scored once, and written atomically; an existing
`ok` or `diverged` record is skipped (a `failed` one is retried) unless `force`; a failing job
is recorded and the rest go on (one job: benchmark/jobs.py); jobs run in parallel through joblib
(or on a Dask cluster, benchmark/backends.py) with per-worker thread limits, alone or trained
together in groups (benchmark/stacking.py); each dataset is read once per process.
"""
from __future__ import annotations

import os
import platform
import signal
import subprocess
from contextlib import closing
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from benchmark.backends import ClusterUnusable, Lost, run_dask, run_local
from benchmark.data import resolve_data_root
from benchmark.estimate import RemainingTime

# The names imported `as` themselves are defined in benchmark/jobs.py (below this module and the stacked
# runs) and re-exported: the command line, tests and scripts import them from here.
from benchmark.jobs import DEFAULT_VAL_FRACTION as DEFAULT_VAL_FRACTION
from benchmark.jobs import NOT_STARTED, Job, JobOutcome, RunSettings, run_job
from benchmark.jobs import SUGGESTED_VAL_FRACTION as SUGGESTED_VAL_FRACTION
from benchmark.jobs import build_detector as build_detector
from benchmark.records import JobKey
from benchmark.stacking import group_jobs, run_unit


def library_versions() -> dict:
    """Versions of Python and the libraries a record depends on.

    Returns
    -------
    dict
        Distribution name -> version (None for one not installed).
    """
    versions = {"python": platform.python_version()}
    for dist in ("memgan-bench", "torch", "torchvision", "numpy", "scikit-learn", "pyod", "pandas", "joblib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def git_state() -> dict:
    """The git commit of the code and whether tracked files are modified.

    Returns
    -------
    dict
        The commit and dirty flag (None where git is unavailable).
    """
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def provenance(argv: list[str]) -> dict:
    """Provenance of a run, written into every record.

    Parameters
    ----------
    argv : list of str
        The command line.

    Returns
    -------
    dict
        Library versions, git state, host, platform, CPU count and command.
    """
    return {"versions": library_versions(), "git": git_state(), "host": platform.node(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "command": " ".join(argv)}


def _install_sigterm_handler() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)


def execute(jobs: list[Job], settings: RunSettings, n_parallel: int, progress: bool = True,
            backend: str = "local", scheduler: Optional[str] = None, stack: int = 1,
            expected_seconds: Optional[dict] = None) -> list[JobOutcome]:
    """Run the jobs (already filtered for existing records).

    The jobs run in this process (local, one unit at a time), in `n_parallel` local worker processes, or on a
    Dask cluster (benchmark/backends.py). Jobs another runner holds are retried at the end, waiting for its
    lock, so they are done exactly once. A job whose worker process died is reported `lost` (a rerun does it).

    Parameters
    ----------
    jobs : list of Job
        The jobs.
    settings : RunSettings
        What every job of the run shares.
    n_parallel : int
        Number of worker processes (1: in this process).
    progress : bool, default=True
        Show progress.
    backend : str, default="local"
        "local" or "dask".
    scheduler : str, optional
        Address of a Dask scheduler (default: a LocalCluster started here).
    stack : int, default=1
        With stack > 1, jobs that can train together do so in groups of up to `stack` (benchmark/stacking.py).
    expected_seconds : dict, optional
        Job key -> estimated seconds (`--estimate`'s figures): the progress display's remaining time
        comes from them (benchmark.estimate.RemainingTime), never from a count of jobs.

    Returns
    -------
    list of JobOutcome
        One outcome per job.
    """
    _install_sigterm_handler()
    outcomes: list[JobOutcome] = []
    # No tqdm ETA: a count of jobs says nothing of a run whose jobs take 1 s to 1 h; the remaining
    # time comes from the per-job estimates instead.
    bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    units = group_jobs(jobs, stack)
    remaining = RemainingTime(expected_seconds or {}, n_parallel)

    def with_remaining(text: str) -> str:
        left = remaining.text()
        return f"{text}; {left}" if left else text

    def note(outcome: JobOutcome) -> None:
        bar.update(1)
        remaining.finished(outcome.key, outcome.seconds)
        auroc = f"auroc={outcome.auroc:.4f}" if outcome.auroc is not None else outcome.status
        bar.set_postfix_str(with_remaining(f"{outcome.key.label()} {auroc}"))
        if outcome.status in ("failed", "diverged", "lost"):
            first_line = outcome.message.splitlines()[0] if outcome.message else ""
            bar.write(f"[{outcome.status}] {outcome.key.label()}: {first_line}")

    devices = [str(job.params["device"]) for job in jobs if "device" in job.params]
    if backend == "dask":  # workers elsewhere, started elsewhere: the same absolute paths on every host
        settings = replace(settings, results_dir=Path(settings.results_dir).resolve(),
                           data_root=str(resolve_data_root(settings.data_root).resolve()))
    by_key = {job.key: job for job in jobs}
    deferred: list[Job] = []

    def take(results: list[JobOutcome]) -> None:
        for outcome in results:
            if outcome.status == "claimed":
                deferred.append(by_key[outcome.key])
            else:
                outcomes.append(outcome)
                note(outcome)

    try:
        if not units:
            results: Any = (pair for pair in ())
        elif backend == "dask":
            # What a worker must import to unpickle and run a job (probed before it gets one).
            modules = sorted({run_unit.__module__} | {job.target.split(":")[0] for job in jobs if job.target})
            results = run_dask(run_unit, units, settings, n_parallel, devices, scheduler, modules=modules)
        elif n_parallel <= 1:
            def show(key: JobKey, stage: str, done: int, planned: int) -> None:
                bar.set_postfix_str(with_remaining(f"{key.label()} {stage} epoch {done}/{planned}"))

            results = ((unit, run_unit(unit, settings, progress=show if progress else None)) for unit in units)
        else:
            results = run_local(run_unit, units, settings, n_parallel, devices)
        try:
            with closing(results):
                for unit, result in results:
                    if isinstance(result, Lost):  # the worker died: every job of the unit is lost
                        result = [JobOutcome(job.key, "lost", f"its worker process died: {result.error}")
                                  for job in unit]
                    take(result)
        except ClusterUnusable as exc:
            if not outcomes and not deferred:
                raise  # nothing done: a backend error (exit 2)
            bar.write(f"error: {exc}")
            seen = {o.key for o in outcomes} | {job.key for job in deferred}
            interrupted = {job.key for unit in exc.interrupted for job in unit}
            for job in (job for unit in units for job in unit if job.key not in seen):
                outcomes.append(JobOutcome(job.key, "lost", f"its worker process died, then: {exc}")
                                if job.key in interrupted else JobOutcome(job.key, NOT_STARTED, str(exc)))
            deferred.clear()
        for job in deferred:
            bar.write(f"waiting for another runner to finish {job.key.label()}")
            outcome = run_job(job, settings, blocking=True)
            outcomes.append(outcome)
            note(outcome)
    finally:
        bar.close()
    return outcomes
