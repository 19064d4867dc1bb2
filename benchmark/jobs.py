"""Jobs, start to finish: what a job is (`Job`, `RunSettings`, `JobOutcome`) and the one sequence every
unit of work runs, a group of K >= 1 jobs (`run_jobs`; one job is a group of one):
claim -> prepare -> train -> score -> write.

Each job takes its lock (`claim`; an existing `ok` or `diverged` record is kept unless `force`), builds
its task and detector (`prepare`); the group trains through the one training seam, `train_jobs` (alone
for K = 1, stacked as one batched model for K > 1, methods/engine/); each job is scored once
(`score_into`) and written atomically (`write_result`); anything a detector raises is recorded as
`failed` or `diverged` (`record_error`) and the run goes on. Each dataset is read once per process.
Which jobs form a group is benchmark/stacking.py's decision.
"""
from __future__ import annotations

import datetime as _dt
import platform
import time
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

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
from methods.base import DivergedError, EpochCallback, TrainOptions, trains_through_engine

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
    threads_fixed: bool = False  # --threads given: every job uses threads_per_job, on any worker
    # --precision, --cuda-graphs: how the jobs train (speed, not what a detector is); only `train_jobs` reads them
    train_options: TrainOptions = field(default_factory=TrainOptions)
    stack: int = 1             # --stack: the largest group of jobs trained together (benchmark/stacking.py)


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


def prepare(job: Job, settings: RunSettings, record: dict) -> tuple[Task, Any]:
    """The job's task and detector (as built from its parameters), their facts written into the record."""
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


ProgressHook = Callable[[JobKey, str, int, int], None]


def train_jobs(detectors: Sequence[Any], Xs: Sequence[np.ndarray], callbacks: Sequence[Optional[EpochCallback]],
               options: TrainOptions, progress: Optional[Sequence[Callable[[str, int, int], None]]] = None,
               ) -> list[Optional[DivergedError]]:
    """Train K >= 1 detectors: the runner's one way into the training engine.

    The run options reach the training here and nowhere else, as one `TrainOptions` object passed to
    `methods.engine.fit_jobs` (never set on the detectors). A detector outside the torch engine (numpy,
    pyod) has no options to take and trains alone through its own `fit`.

    Parameters
    ----------
    detectors : sequence of Detector
        The jobs' unfitted detectors; K > 1 of them must share class and hyperparameters but random_state
        (benchmark/stacking.py groups only such jobs).
    Xs : sequence of np.ndarray
        Their training images, (N_k, C, H, W).
    callbacks : sequence of EpochCallback or None
        Per job, called after every epoch (the --track-auroc diagnostic).
    options : methods.base.TrainOptions
        Precision, memory format, CUDA graphs.
    progress : sequence of callable, optional
        Per job, `progress(stage, epochs done, epochs planned)` after every epoch (the progress bar: a
        display hook, not a run option).

    Returns
    -------
    list of Optional[DivergedError]
        Per job, None or the DivergedError that stopped it.

    Raises
    ------
    Exception
        Whatever the training raises besides a DivergedError (for K > 1 the whole group's error, e.g. out
        of memory; the caller then trains the jobs alone).
    """
    for index, detector in enumerate(detectors):
        if progress is not None and hasattr(detector, "progress_callback"):
            detector.progress_callback = progress[index]
    if not trains_through_engine(detectors[0]):
        if len(detectors) != 1:
            raise ValueError(f"{type(detectors[0]).__name__} cannot be trained stacked")
        try:
            detectors[0].fit(Xs[0], epoch_callback=callbacks[0])
        except DivergedError as exc:
            return [exc]
        return [None]
    from methods.engine import fit_jobs  # loads torch: this module imports without it (the command line's)

    return fit_jobs(detectors, Xs, callbacks, options)


@dataclass
class _Prepared:
    """A claimed job ready to train: its record so far, task, detector and per-epoch AUROCs."""
    job: Job
    record: dict
    task: Task
    detector: Any
    epoch_aurocs: list


def run_jobs(jobs: Sequence[Job], settings: RunSettings, blocking: bool = False,
             progress: Optional[ProgressHook] = None) -> list[JobOutcome]:
    """Train, score and record a group of K >= 1 jobs (one job is a group of one).

    Jobs another runner holds or has finished are left out (their outcomes say so); a job whose task or
    detector cannot be built is recorded `failed` and the rest go on. Two or more jobs left train together
    as one stacked model; if that training itself fails (say, out of memory), they train one by one instead.
    Only KeyboardInterrupt and results-folder write errors escape: anything else a detector does is recorded
    as `failed` or `diverged`.

    Parameters
    ----------
    jobs : sequence of Job
        The group: jobs that differ only in class and seed when there are several (benchmark/stacking.py).
    settings : RunSettings
        What every job of the run shares.
    blocking : bool, default=False
        Wait for a job's lock when another runner holds it (else its outcome is `claimed`).
    progress : callable, optional
        `progress(key, stage, epochs done, epochs planned)`, called after every epoch.

    Returns
    -------
    list of JobOutcome
        One outcome per job.
    """
    outcomes: list[JobOutcome] = []
    claimed: list[tuple[Job, JobLock]] = []
    try:
        for job in jobs:
            lock, outcome = claim(job, settings, blocking)
            if lock is None:
                outcomes.append(outcome)
            else:
                claimed.append((job, lock))
        if claimed:
            limit_threads(settings.threads_per_job)
            outcomes += _train_claimed([job for job, _ in claimed], settings, progress)
        return outcomes
    finally:
        for _, lock in claimed:
            lock.release()


def _train_claimed(jobs: list[Job], settings: RunSettings, progress: Optional[ProgressHook]) -> list[JobOutcome]:
    """prepare -> train -> score -> write for jobs whose locks this process holds."""
    started = time.perf_counter()
    outcomes: list[JobOutcome] = []
    prepared: list[_Prepared] = []
    for job in jobs:
        record = new_record(job, settings)
        try:
            task, detector = prepare(job, settings, record)
        except (KeyboardInterrupt, ResultsWriteError):
            raise
        except BaseException as exc:  # noqa: BLE001 - a detector bug, missing data, ...: recorded, the rest go on
            record_error(record, exc)
            outcomes.append(write_result(job, settings, record, None, None, time.perf_counter() - started))
            continue
        prepared.append(_Prepared(job, record, task, detector, []))
    if not prepared:
        return outcomes
    stacked = len(prepared) > 1
    callbacks = [auroc_tracker(p.task, p.epoch_aurocs) if settings.track_auroc else None for p in prepared]
    hooks = None if progress is None else [_progress_of(p.job.key, progress) for p in prepared]
    t0 = time.perf_counter()
    try:
        errors: list[Optional[BaseException]] = list(train_jobs(
            [p.detector for p in prepared], [p.task.x_train for p in prepared], callbacks, settings.train_options,
            hooks))
    except (KeyboardInterrupt, ResultsWriteError):
        raise
    except BaseException as exc:  # noqa: BLE001 - a detector bug, MemoryError, ...: recorded, the run goes on
        if stacked and isinstance(exc, Exception):  # e.g. out of memory while stacked: the jobs train alone
            return outcomes + [outcome for p in prepared for outcome in _train_claimed([p.job], settings, progress)]
        errors = [exc] * len(prepared)
    train_seconds = time.perf_counter() - t0
    labels_of_group = [p.job.key.label() for p in prepared]
    for p, error in zip(prepared, errors):
        record = p.record
        if stacked:  # the group's seconds, also for a job that diverged: the group trained on
            record["train_seconds"] = train_seconds
            record["stack"] = {"jobs": labels_of_group, "size": len(prepared), "group_train_seconds": train_seconds,
                               "note": "trained together as one batched model; train_seconds is the group's"}
        elif error is None:
            record["train_seconds"] = train_seconds
        scores = labels = extra = None
        try:
            if error is not None:
                raise error
            scores, labels, extra = score_into(record, p.detector, p.task, settings, p.epoch_aurocs)
        except (KeyboardInterrupt, ResultsWriteError):
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded, the run goes on
            record_error(record, exc)
            scores = labels = extra = None
            if stacked and isinstance(exc, DivergedError):
                record.setdefault("run_info", p.detector.run_info() if hasattr(p.detector, "device_") else {})
        outcomes.append(write_result(p.job, settings, record, scores, labels, time.perf_counter() - started, extra))
    return outcomes


def _progress_of(key: JobKey, progress: ProgressHook) -> Callable[[str, int, int], None]:
    """One job's per-epoch progress hook: `progress` with the job's key."""
    return lambda stage, done, planned: progress(key, stage, done, planned)


def run_job(job: Job, settings: RunSettings, blocking: bool = False,
            progress: Optional[ProgressHook] = None) -> JobOutcome:
    """Train, score and record one job: `run_jobs` of a group of one.

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
    return run_jobs([job], settings, blocking, progress)[0]


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
