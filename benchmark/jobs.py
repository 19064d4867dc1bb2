"""One job, start to finish: what a job is (`Job`, `RunSettings`, `JobOutcome`) and its sequence,
claim -> prepare -> fit -> score -> write, shared by a job trained alone (`run_job`) and a group
trained stacked (benchmark/stacking.py).

A job takes its lock (`claim`; an existing `ok` or `diverged` record is kept unless `force`), builds
its task and detector (`prepare`), trains with a fixed budget, is scored once (`score_into`) and is
written atomically (`write_result`); anything the detector raises is recorded as `failed` or
`diverged` (`record_error`) and the run goes on. Each dataset is read once per process.
"""
from __future__ import annotations

import datetime as _dt
import platform
import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from benchmark.data import DataError, load_dataset
from benchmark.estimate import cpu_model
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
from methods import MethodSpec, get_method
from methods.base import DivergedError, supports_stacking

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
    try:
        return get_method(job.key.method).label
    except KeyError:
        return job.key.method


def limit_threads(threads: int) -> None:
    """This process's torch and BLAS / OpenMP thread counts: `threads` each."""
    import torch

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
    spec = MethodSpec(job.key.method, job.key.method, job.target) if job.target else get_method(job.key.method)
    return spec.load()(**job.params)


def claim(job: Job, settings: RunSettings, blocking: bool) -> tuple[Optional[JobLock], Optional[JobOutcome]]:
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


def new_record(job: Job, settings: RunSettings) -> dict[str, Any]:
    """The job's record before it runs: its key, settings and label, status `failed` until it ends otherwise."""
    key = job.key
    return {
        "schema_version": SCHEMA_VERSION, "dataset": key.dataset, "normal_class": key.normal_class,
        "method": key.method, "seed": key.seed, "profile": key.profile, "base_profile": job.base_profile,
        "protocol": key.protocol, "status": "failed", "metrics": None,
        "hyperparameter_overrides": settings.overrides, "method_label": _method_label(job),
    }


def prepare(job: Job, settings: RunSettings, record: dict, progress: Optional[Callable]) -> tuple[Task, Any]:
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
        # Only the stacked engine has a graph path; other detectors train as usual (their run_info
        # says cuda_graphs False).
        if supports_stacking(detector):
            detector.cuda_graphs = True
    if progress is not None and hasattr(detector, "progress_callback"):
        detector.progress_callback = lambda stage, done, planned: progress(key, stage, done, planned)
    record["hyperparameters"] = detector.get_params()
    record["method_class"] = f"{type(detector).__module__}.{type(detector).__name__}"
    return task, detector


def score_into(record: dict, detector: Any, task: Task, settings: RunSettings, epoch_aurocs: list) -> tuple:
    """Score the fitted detector and fill the record's results; returns (scores, labels, the extra
    arrays for the .npz: the held-out normal images' scores, or None)."""
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


def record_error(record: dict, exc: BaseException) -> None:
    """Record why the job did not finish: `diverged` for a DivergedError, else `failed`, with the traceback."""
    if isinstance(exc, DivergedError):
        record["status"] = "diverged"
        record["divergence"] = {"epoch": exc.epoch, "step": exc.step, "detail": exc.detail}
        record["error"] = {"type": "DivergedError", "message": str(exc),
                           "traceback": "".join(traceback.format_exception(exc))}
    else:
        record["status"] = "failed"
        record["error"] = {"type": type(exc).__name__, "message": str(exc),
                           "traceback": "".join(traceback.format_exception(exc))}


def write_result(job: Job, settings: RunSettings, record: dict, scores: Any, labels: Any, elapsed: float,
           extra_arrays: Optional[dict] = None) -> JobOutcome:
    """Write the job's record (with its scores and `extra_arrays` when it has scores) and return its outcome."""
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
    lock, outcome = claim(job, settings, blocking)
    if lock is None:
        return outcome
    try:
        limit_threads(settings.threads_per_job)
        started = time.perf_counter()
        record = new_record(job, settings)
        scores = labels = None
        try:
            task, detector = prepare(job, settings, record, progress)
            epoch_aurocs: list = []
            callback = auroc_tracker(task, epoch_aurocs) if settings.track_auroc else None
            t0 = time.perf_counter()
            detector.fit(task.x_train, epoch_callback=callback)
            record["train_seconds"] = time.perf_counter() - t0
            scores, labels, extra = score_into(record, detector, task, settings, epoch_aurocs)
        except (KeyboardInterrupt, ResultsWriteError):
            raise
        except BaseException as exc:  # a detector bug, MemoryError, ...: recorded, the run goes on
            record_error(record, exc)
            scores = labels = extra = None
        return write_result(job, settings, record, scores, labels, time.perf_counter() - started, extra)
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


def auroc_tracker(task: Task, sink: list) -> Callable:
    """Diagnostic only (never used to choose a model): AUROC of the test set after each epoch."""

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
