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

from benchmark.data import load_dataset, resolve_data_root
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
DEFAULT_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Job:
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
    threads_per_job: int
    track_auroc: bool
    overrides: dict
    provenance: dict           # versions, git commit, host, command
    force: bool = False        # --force: retrain jobs recorded before this run began ...
    started_at: float = 0.0    # ... (time.time() at its start; newer records are another runner's)
    val_fraction: float = DEFAULT_VAL_FRACTION  # held-out normal training images (0: none)


@dataclass
class JobOutcome:
    key: JobKey
    status: str                # ok / failed / diverged / claimed (another runner holds it) /
                               # lost (its worker process died: no record, a rerun does it)
    message: str = ""
    auroc: Optional[float] = None
    seconds: float = 0.0


def library_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("memgan-bench", "torch", "torchvision", "numpy", "scikit-learn", "pyod", "pandas", "joblib"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return versions


def git_state() -> dict:
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
    from methods import MethodSpec, get_method

    spec = MethodSpec(job.key.method, job.key.method, job.target) if job.target else get_method(job.key.method)
    return spec.load()(**job.params)


def run_job(job: Job, settings: RunSettings, blocking: bool = False) -> JobOutcome:
    """Train, score and record one job. Only KeyboardInterrupt and results-folder write errors
    escape: anything else the detector does is recorded as `failed` or `diverged`."""
    from methods.base import DivergedError

    key, results_dir = job.key, settings.results_dir
    lock = JobLock(key.lock_path(results_dir))
    if not lock.acquire(blocking=blocking):
        return JobOutcome(key, "claimed", "another runner is working on this job")
    try:
        remove_stray_temp_files(key, results_dir)
        done, _ = existing_record(results_dir, key)
        # Finished meanwhile by another runner (with --force: recorded since this run began).
        if done is not None and done["status"] in ("ok", "diverged") and not (
                settings.force and key.json_path(results_dir).stat().st_mtime < settings.started_at):
            return JobOutcome(key, done["status"], "already recorded", (done.get("metrics") or {}).get("auroc"))
        _limit_threads(settings.threads_per_job)
        started = time.perf_counter()
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "dataset": key.dataset, "normal_class": key.normal_class,
            "method": key.method, "seed": key.seed, "profile": key.profile, "base_profile": job.base_profile,
            "protocol": key.protocol, "status": "failed", "metrics": None,
            "hyperparameter_overrides": settings.overrides, "method_label": _method_label(job),
        }
        scores = labels = val_scores = None
        try:
            task = _task(key.dataset, settings.data_root, settings.download, key.normal_class, key.protocol,
                         job.base_profile, settings.val_fraction)
            subsample = PROFILE_SUBSAMPLE[job.base_profile]
            record["sizes"] = task.sizes
            record["sampling"] = {"sample_seed": task.sample_seed, "max_train": subsample.max_train,
                                  "max_test_normal": subsample.max_test_normal,
                                  "max_test_anomalous": subsample.max_test_anomalous,
                                  "val_fraction": settings.val_fraction}
            detector = build_detector(job)
            record["hyperparameters"] = detector.get_params()
            record["method_class"] = f"{type(detector).__module__}.{type(detector).__name__}"
            epoch_aurocs: list = []
            callback = _auroc_tracker(task, epoch_aurocs) if settings.track_auroc else None
            t0 = time.perf_counter()
            detector.fit(task.x_train, epoch_callback=callback)
            record["train_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = detector.decision_function(task.x_test)
            record["score_seconds"] = time.perf_counter() - t0
            labels = task.y_test
            record["run_info"] = detector.run_info()
            record["training_log"] = getattr(detector, "training_log_", {})
            if settings.track_auroc:
                record["diagnostics"] = _auroc_summary(epoch_aurocs)
            if not np.all(np.isfinite(scores)):
                n_bad = int((~np.isfinite(scores)).sum())
                raise DivergedError(epoch=-1, step=-1, detail=f"{n_bad} non-finite test scores")
            record["metrics"] = evaluate(scores, labels)
            if getattr(task, "x_val", None) is not None and len(task.x_val):
                val_scores = _validation_metrics(detector, task, scores, record)
            record["status"] = "ok"
        except DivergedError as exc:
            record["status"] = "diverged"
            record["divergence"] = {"epoch": exc.epoch, "step": exc.step, "detail": exc.detail}
            record["error"] = {"type": "DivergedError", "message": str(exc), "traceback": traceback.format_exc()}
            scores = None
        except (KeyboardInterrupt, ResultsWriteError):
            raise
        except BaseException as exc:  # a detector bug, MemoryError, ...: recorded, the run goes on
            record["status"] = "failed"
            record["error"] = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
            scores = None
        elapsed = time.perf_counter() - started
        created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        record.update({"seconds": elapsed, "created_at": created_at,
                       "threads": settings.threads_per_job, **settings.provenance,
                       "worker_host": platform.node()})  # optional field: where the job ran ("host" is the runner's)
        record.setdefault("run_info", {"device": str(job.params.get("device", "cpu"))})
        write_record(results_dir, key, record, scores, labels,
                     {"val_scores": val_scores} if scores is not None and val_scores is not None else None)
        auroc = record["metrics"]["auroc"] if record["status"] == "ok" else None
        message = record.get("error", {}).get("message", "") if record["status"] != "ok" else ""
        return JobOutcome(key, record["status"], message, auroc, elapsed)
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
            backend: str = "local", scheduler: Optional[str] = None) -> list[JobOutcome]:
    """Run the jobs (already filtered for existing records): in this process (local, one job at
    a time), in `n_parallel` local worker processes, or on a Dask cluster (benchmark/backends.py).
    Jobs another runner holds are retried at the end, waiting for its lock, so they are done
    exactly once. A job whose worker process died is reported `lost` (a rerun does it)."""
    from contextlib import closing

    from tqdm.auto import tqdm

    from benchmark.backends import Lost, run_dask, run_local

    _install_sigterm_handler()
    outcomes: list[JobOutcome] = []
    bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=not progress, dynamic_ncols=True)

    def note(outcome: JobOutcome) -> None:
        bar.update(1)
        auroc = f"auroc={outcome.auroc:.4f}" if outcome.auroc is not None else outcome.status
        bar.set_postfix_str(f"{outcome.key.label()} {auroc}")
        if outcome.status in ("failed", "diverged", "lost"):
            first_line = outcome.message.splitlines()[0] if outcome.message else ""
            bar.write(f"[{outcome.status}] {outcome.key.label()}: {first_line}")

    devices = [str(job.params["device"]) for job in jobs if "device" in job.params]
    if backend == "dask":  # workers elsewhere, started elsewhere: the same absolute paths on every host
        settings = replace(settings, results_dir=Path(settings.results_dir).resolve(),
                           data_root=str(resolve_data_root(settings.data_root).resolve()))
    deferred: list[Job] = []
    try:
        if not jobs:
            results: Any = (pair for pair in ())
        elif backend == "dask":
            results = run_dask(run_job, jobs, settings, n_parallel, devices, scheduler)
        elif n_parallel <= 1:
            results = ((job, run_job(job, settings)) for job in jobs)
        else:
            results = run_local(run_job, jobs, settings, n_parallel, devices)
        with closing(results):
            for job, result in results:
                outcome = JobOutcome(job.key, "lost", f"its worker process died: {result.error}") \
                    if isinstance(result, Lost) else result
                if outcome.status == "claimed":
                    deferred.append(job)
                else:
                    outcomes.append(outcome)
                    note(outcome)
        for job in deferred:
            bar.write(f"waiting for another runner to finish {job.key.label()}")
            outcome = run_job(job, settings, blocking=True)
            outcomes.append(outcome)
            note(outcome)
    finally:
        bar.close()
    return outcomes
