"""The job runner: (dataset, class, method, seed, profile, protocol) -> one record.

Every job is trained with a fixed budget, scored once, and written atomically; an existing
`ok` or `diverged` record is skipped (a `failed` one is retried) unless `force`; a failing job
is recorded and the rest go on; jobs run in parallel through joblib (or on a Dask cluster,
benchmark/backends.py) with per-worker thread limits; each dataset is read once per process.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from benchmark.data import DataError, load_dataset, resolve_data_root
from benchmark.estimate import RemainingTime, cpu_model
from benchmark.metrics import VAL_PERCENTILE, evaluate, validation_threshold_metrics
from benchmark.profiles import PROFILE_SUBSAMPLE
from benchmark.records import (
    SCHEMA_VERSION,
    JobKey,
    JobLock,
    ResultsWriteError,
    existing_record,
    remove_stray_temp_files,
    write_record,
)
from benchmark.splits import Task, make_task

# Share of the normal training images held out (never fitted on) to set a threshold without test labels.
# 0 by default: Tables 1-3 train on every normal training image, as the paper does (section 4.1). A
# held-out run (`--val-fraction 0.1`) is opt-in; its records live in `<profile>+val<f>/`, and Table 4 of
# the default report shows its label-free columns beside the Youden ones when they exist (README, "Results").
DEFAULT_VAL_FRACTION = 0.0
#: The held-out share that the README and the error messages suggest for the opt-in held-out run.
SUGGESTED_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Job:
    """One training job: a method on one task (dataset, normal class, seed) under one profile."""
    key: JobKey
    base_profile: str          # paper / quick / smoke (key.profile may carry a +tag)
    params: dict               # constructor arguments, random_state and device included
    target: str = ""           # the method's "module:Class", so a method registered at run time
                               # (a plugin, a test detector) also loads in parallel workers
    label: str = ""            # the method's display label, written into the record for the reports


@dataclass(frozen=True)
class RunSettings:
    """What every job of one run shares (picklable, for joblib workers)."""
    results_dir: Path
    data_root: Optional[str]
    download: bool
    threads_per_job: int       # torch / BLAS threads of each job (a Dask worker sets its own: backends.py)
    track_auroc: bool
    overrides: dict
    provenance: dict           # versions, git commit, host, command
    force: bool = False        # --force: retrain jobs recorded before this run began ...
    started_at: float = 0.0    # ... (time.time() at its start; newer records are another runner's)
    val_fraction: float = DEFAULT_VAL_FRACTION  # held-out normal training images (0: none)
    precision: str = "fp32"    # --precision: "bf16" trains the deep detectors under bfloat16 autocast
    cuda_graphs: bool = False  # --cuda-graphs: capture the training steps of stacked-capable detectors
    threads_fixed: bool = False  # --threads given: every job uses threads_per_job, on any worker


@dataclass
class JobOutcome:
    """What became of one job: its status, message, AUROC and seconds."""
    key: JobKey
    status: str                # ok / failed / diverged / claimed (another runner holds it) /
                               # lost (its worker process died: no record, a rerun does it) /
                               # not started (the run stopped before handing it out: no record)
    message: str = ""
    auroc: Optional[float] = None
    seconds: float = 0.0
    by_another_runner: bool = False  # recorded by another runner while this run waited for it


NOT_STARTED = "not started"


def library_versions() -> dict:
    """Versions of Python and the libraries a record depends on.

    Returns
    -------
    dict
        Distribution name -> version (None for one not installed).
    """
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("memgan-bench", "torch", "torchvision", "numpy", "scikit-learn", "pyod", "pandas", "joblib"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
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


@lru_cache(maxsize=1)
def _task(dataset: str, data_root: Optional[str], download: bool, normal_class: int, protocol: str, base_profile: str,
          val_fraction: float = 0.0) -> Task:
    """The last task is kept: jobs are ordered dataset -> class -> method -> seed."""
    return make_task(load_dataset(dataset, data_root, download), normal_class, protocol,
                     PROFILE_SUBSAMPLE[base_profile], val_fraction)


def _method_label(job: Job) -> str:
    """The display label the tables use (the reports read it from the record, never the registry)."""
    if job.label:
        return job.label
    from methods import get_method

    try:
        return get_method(job.key.method).label
    except KeyError:
        return job.key.method


def _limit_threads(threads: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def build_detector(job: Job) -> Any:
    """Construct the job's detector (not yet fitted).

    Parameters
    ----------
    job : Job
        The job; its `target` is used when set, else the registry entry of its method.

    Returns
    -------
    Any
        The detector built with `job.params`.
    """
    from methods import MethodSpec, get_method

    spec = MethodSpec(job.key.method, job.key.method, job.target) if job.target else get_method(job.key.method)
    return spec.load()(**job.params)


def _claim(job: Job, settings: RunSettings, blocking: bool) -> tuple[Optional[JobLock], Optional[JobOutcome]]:
    """Take the job's lock; (lock, None) to go on, or (None, outcome) when another runner holds it
    or has finished it meanwhile (with --force: recorded since this run began)."""
    key, results_dir = job.key, settings.results_dir
    lock = JobLock(key.lock_path(results_dir))
    try:  # the acquire inside: a Ctrl-C right after it still releases (and so deletes) the lock file
        if not lock.acquire(blocking=blocking):
            return None, JobOutcome(key, "claimed", "another runner is working on this job")
        remove_stray_temp_files(key, results_dir)
        done, _ = existing_record(results_dir, key)
        if done is not None and done["status"] in ("ok", "diverged") and not (
                settings.force and key.json_path(results_dir).stat().st_mtime < settings.started_at):
            lock.release()
            return None, JobOutcome(key, done["status"], "recorded by another runner meanwhile",
                                    (done.get("metrics") or {}).get("auroc"), by_another_runner=True)
    except BaseException:
        lock.release()
        raise
    return lock, None


def _new_record(job: Job, settings: RunSettings) -> dict[str, Any]:
    key = job.key
    return {
        "schema_version": SCHEMA_VERSION, "dataset": key.dataset, "normal_class": key.normal_class,
        "method": key.method, "seed": key.seed, "profile": key.profile, "base_profile": job.base_profile,
        "protocol": key.protocol, "status": "failed", "metrics": None,
        "hyperparameter_overrides": settings.overrides, "method_label": _method_label(job),
    }


def _prepare(job: Job, settings: RunSettings, record: dict, progress: Optional[Callable]) -> tuple[Task, Any]:
    """The job's task and detector, their facts written into the record."""
    key = job.key
    try:
        task = _task(key.dataset, settings.data_root, settings.download, key.normal_class, key.protocol,
                     job.base_profile, settings.val_fraction)
    except DataError as exc:
        if settings.download:
            raise
        # The runner read these files before handing out the job: this process sees another disk.
        raise DataError(f"{exc.args[0].split('; ', 1)[0]} on host {platform.node()}: the runner found the data "
                        f"but this process cannot read it, and jobs never download. Make the data root readable "
                        f"at the same path on every worker (a shared file system), or pass --data-root a path "
                        f"that every worker sees") from exc
    subsample = PROFILE_SUBSAMPLE[job.base_profile]
    record["sizes"] = task.sizes
    record["sampling"] = {"sample_seed": task.sample_seed, "max_train": subsample.max_train,
                          "max_test_normal": subsample.max_test_normal,
                          "max_test_anomalous": subsample.max_test_anomalous,
                          "val_fraction": settings.val_fraction}
    detector = build_detector(job)
    if hasattr(detector, "precision"):
        detector.precision = settings.precision
    if settings.cuda_graphs:
        from methods.stacking import supports_stacking

        # Only the stacked engine has a graph path; other detectors train as usual (their run_info
        # says cuda_graphs False).
        if supports_stacking(detector):
            detector.cuda_graphs = True
    if progress is not None and hasattr(detector, "progress_callback"):
        detector.progress_callback = lambda stage, done, planned: progress(key, stage, done, planned)
    record["hyperparameters"] = detector.get_params()
    record["method_class"] = f"{type(detector).__module__}.{type(detector).__name__}"
    return task, detector


def _score_into(record: dict, detector: Any, task: Task, settings: RunSettings, epoch_aurocs: list) -> tuple:
    """Score the fitted detector and fill the record's results; returns (scores, labels, the extra
    arrays for the .npz: the held-out normal images' scores, or None)."""
    from methods.base import DivergedError

    t0 = time.perf_counter()
    scores = detector.decision_function(task.x_test)
    record["score_seconds"] = time.perf_counter() - t0
    record["run_info"] = detector.run_info()
    record["training_log"] = getattr(detector, "training_log_", {})
    if settings.track_auroc:
        record["diagnostics"] = _auroc_summary(epoch_aurocs)
    if not np.all(np.isfinite(scores)):
        raise DivergedError(epoch=-1, step=-1, detail=f"{int((~np.isfinite(scores)).sum())} non-finite test scores")
    record["metrics"] = evaluate(scores, labels := task.y_test)
    extra = None
    if getattr(task, "x_val", None) is not None and len(task.x_val):
        extra = {"val_scores": _validation_metrics(detector, task, scores, record)}
    record["status"] = "ok"
    return scores, labels, extra


def _record_error(record: dict, exc: BaseException) -> None:
    from methods.base import DivergedError

    if isinstance(exc, DivergedError):
        record["status"] = "diverged"
        record["divergence"] = {"epoch": exc.epoch, "step": exc.step, "detail": exc.detail}
        record["error"] = {"type": "DivergedError", "message": str(exc),
                           "traceback": "".join(traceback.format_exception(exc))}
    else:
        record["status"] = "failed"
        record["error"] = {"type": type(exc).__name__, "message": str(exc),
                           "traceback": "".join(traceback.format_exception(exc))}


def _write(job: Job, settings: RunSettings, record: dict, scores: Any, labels: Any, elapsed: float,
           extra_arrays: Optional[dict] = None) -> JobOutcome:
    key = job.key
    record.update({"seconds": elapsed, "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "threads": settings.threads_per_job, **settings.provenance,
                   "worker_host": platform.node(),  # optional field: where the job ran ("host" is the runner's)
                   "cpu_model": cpu_model()})  # optional field: the worker's CPU (benchmark/estimate.py matches on it)
    record.setdefault("run_info", {"device": str(job.params.get("device", "cpu"))})
    write_record(settings.results_dir, key, record, scores, labels, extra_arrays if scores is not None else None)
    auroc = record["metrics"]["auroc"] if record["status"] == "ok" else None
    message = record.get("error", {}).get("message", "") if record["status"] != "ok" else ""
    return JobOutcome(key, record["status"], message, auroc, elapsed)


def run_job(job: Job, settings: RunSettings, blocking: bool = False,
            progress: Optional[Callable[[JobKey, str, int, int], None]] = None) -> JobOutcome:
    """Train, score and record one job.

    Only KeyboardInterrupt and results-folder write errors escape: anything else the detector does is
    recorded as `failed` or `diverged`.

    Parameters
    ----------
    job : Job
        The job.
    settings : RunSettings
        What every job of the run shares.
    blocking : bool, default=False
        Wait for the job's lock when another runner holds it (else the outcome is `claimed`).
    progress : callable, optional
        `progress(key, stage, epochs done, epochs planned)`, called after every epoch.

    Returns
    -------
    JobOutcome
        The job's outcome.
    """
    lock, outcome = _claim(job, settings, blocking)
    if lock is None:
        return outcome
    try:
        _limit_threads(settings.threads_per_job)
        started = time.perf_counter()
        record = _new_record(job, settings)
        scores = labels = None
        try:
            task, detector = _prepare(job, settings, record, progress)
            epoch_aurocs: list = []
            callback = _auroc_tracker(task, epoch_aurocs) if settings.track_auroc else None
            t0 = time.perf_counter()
            detector.fit(task.x_train, epoch_callback=callback)
            record["train_seconds"] = time.perf_counter() - t0
            scores, labels, extra = _score_into(record, detector, task, settings, epoch_aurocs)
        except (KeyboardInterrupt, ResultsWriteError):
            raise
        except BaseException as exc:  # a detector bug, MemoryError, ...: recorded, the run goes on
            _record_error(record, exc)
            scores = labels = extra = None
        return _write(job, settings, record, scores, labels, time.perf_counter() - started, extra)
    finally:
        lock.release()


def _validation_metrics(detector: Any, task: Task, scores: np.ndarray, record: dict) -> Optional[np.ndarray]:
    """Score the held-out normal images; record the metrics at their VAL_PERCENTILE threshold
    (no test labels used) as `metrics_val_threshold`. Non-finite validation scores leave it out."""
    t0 = time.perf_counter()
    val_scores = np.asarray(detector.decision_function(task.x_val), dtype=np.float64)
    record["val_score_seconds"] = time.perf_counter() - t0
    if not np.all(np.isfinite(val_scores)):
        record["metrics_val_threshold"] = None
        record["val_threshold_problem"] = f"{int((~np.isfinite(val_scores)).sum())} non-finite validation scores"
        return val_scores
    record["metrics_val_threshold"] = validation_threshold_metrics(scores, task.y_test, val_scores, VAL_PERCENTILE)
    return val_scores


def _auroc_tracker(task: Task, sink: list) -> Callable:
    """Diagnostic only (never used to choose a model): AUROC of the test set after each epoch."""
    from sklearn.metrics import roc_auc_score

    def callback(epoch: int, detector: Any) -> None:
        scores = detector.decision_function(task.x_test)
        auroc = float(roc_auc_score(task.y_test, scores)) if np.all(np.isfinite(scores)) else None
        sink.append({"epoch": epoch, "auroc": auroc})

    return callback


def _auroc_summary(epoch_aurocs: list) -> dict:
    finite = [e for e in epoch_aurocs if e["auroc"] is not None]
    best = max(finite, key=lambda e: e["auroc"]) if finite else None
    return {"auroc_per_epoch": epoch_aurocs,
            "best_epoch_on_test_OPTIMISTIC": best,
            "note": "per-epoch test AUROC is a diagnostic of training dynamics; the reported metrics are the "
                    "final model's"}


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
    from contextlib import closing

    from tqdm.auto import tqdm

    from benchmark.backends import ClusterUnusable, Lost, run_dask, run_local
    from benchmark.stacking import group_jobs, run_unit

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
            for job in (job for unit in units for job in unit if job.key not in seen):
                outcomes.append(JobOutcome(job.key, NOT_STARTED, str(exc)))
            deferred.clear()
        for job in deferred:
            bar.write(f"waiting for another runner to finish {job.key.label()}")
            outcome = run_job(job, settings, blocking=True)
            outcomes.append(outcome)
            note(outcome)
    finally:
        bar.close()
    return outcomes
