"""The job runner: a run's jobs, each (dataset, class, method, seed, profile, protocol) -> one record.

Every job is trained with a fixed budget, scored once, and written atomically; an existing
`ok` or `diverged` record is skipped (a `failed` one is retried) unless `force`; a failing job
is recorded and the rest go on. The jobs are split into groups (benchmark/stacking.py: one job
each, or up to --stack jobs trained together); every group runs through the one sequence of
benchmark/jobs.py (`run_jobs`), on the backend `--backend` names (benchmark/backends.py: this
process, local worker processes, or a Dask cluster) with per-worker thread limits; each dataset
is read once per process.
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

from benchmark.backends import BACKENDS, ClusterUnusable, Lost
from benchmark.data import resolve_data_root
from benchmark.estimate import RemainingTime

# The names imported `as` themselves are defined in benchmark/jobs.py (below this module and the grouping,
# benchmark/stacking.py) and re-exported: the command line, tests and scripts import them from here.
from benchmark.jobs import DEFAULT_VAL_FRACTION as DEFAULT_VAL_FRACTION
from benchmark.jobs import NOT_STARTED, Job, JobOutcome, RunSettings, run_jobs
from benchmark.jobs import SUGGESTED_VAL_FRACTION as SUGGESTED_VAL_FRACTION
from benchmark.jobs import build_detector as build_detector
from benchmark.jobs import run_job as run_job
from benchmark.records import JobKey, existing_record
from benchmark.stacking import group_jobs


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


def _lost(job: Job, settings: RunSettings, why: str) -> JobOutcome:
    """The outcome of a job whose worker process died: `lost` (a rerun does it), unless that worker had
    recorded it first (a record written since this run began), then the record's status and AUROC."""
    results_dir = Path(settings.results_dir)
    record, _ = existing_record(results_dir, job.key)
    if record is None or job.key.json_path(results_dir).stat().st_mtime < settings.started_at:
        return JobOutcome(job.key, "lost", why)
    return JobOutcome(job.key, record["status"], f"recorded before {why[0].lower()}{why[1:]}",
                      (record.get("metrics") or {}).get("auroc"), float(record.get("seconds") or 0.0))


def execute(jobs: list[Job], settings: RunSettings, n_parallel: int, progress: bool = True,
            backend: str = "local", scheduler: Optional[str] = None,
            expected_seconds: Optional[dict] = None) -> list[JobOutcome]:
    """Run the jobs (already filtered for existing records).

    The jobs are split into groups of up to `settings.stack` (benchmark/stacking.py), each run by
    `benchmark.jobs.run_jobs` on the named backend (benchmark/backends.py: this process when `n_parallel`
    is 1, local worker processes, or a Dask cluster). Jobs another runner holds are retried at the end,
    waiting for its lock, so they are done exactly once. A job whose worker process died is reported `lost`
    (a rerun does it).

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
        A name of `benchmark.backends.BACKENDS`.
    scheduler : str, optional
        Address of a Dask scheduler (default: a LocalCluster started here).
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
    units = group_jobs(jobs, settings.stack)
    runner = BACKENDS[backend]
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
    if runner.cluster:  # workers elsewhere, started elsewhere: the same absolute paths on every host
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

    def show(key: JobKey, stage: str, done: int, planned: int) -> None:
        bar.set_postfix_str(with_remaining(f"{key.label()} {stage} epoch {done}/{planned}"))

    # What a worker must import to unpickle and run a job (a cluster's workers are probed before they get one).
    modules = sorted({run_jobs.__module__} | {job.target.split(":")[0] for job in jobs if job.target})
    try:
        results: Any = (pair for pair in ()) if not units else runner.run(
            run_jobs, units, settings, n_parallel, devices, scheduler, modules, show if progress else None)
        try:
            with closing(results):
                for unit, result in results:
                    if isinstance(result, Lost):  # the worker died: every job of the unit not recorded is lost
                        result = [_lost(job, settings, f"its worker process died: {result.error}") for job in unit]
                    take(result)
        except ClusterUnusable as exc:
            if not outcomes and not deferred:
                raise  # nothing done: a backend error (exit 2)
            bar.write(f"error: {exc}")
            seen = {o.key for o in outcomes} | {job.key for job in deferred}
            interrupted = {job.key for unit in exc.interrupted for job in unit}
            for job in (job for unit in units for job in unit if job.key not in seen):
                outcomes.append(_lost(job, settings, f"its worker process died, then: {exc}")
                                if job.key in interrupted else JobOutcome(job.key, NOT_STARTED, str(exc)))
            deferred.clear()
        for job in deferred:
            bar.write(f"waiting for another runner to finish {job.key.label()}")
            for outcome in run_jobs([job], settings, blocking=True):
                outcomes.append(outcome)
                note(outcome)
    finally:
        bar.close()
    return outcomes
