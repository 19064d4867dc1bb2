"""How long a run will take on this device, before any training: `run_all.py ... --estimate`.

A job's expected seconds come from the best evidence at hand, in this order:

1. **Finished records** of the same method, settings (every hyperparameter but the seed), dataset,
   precision and device (device type, CPU model or GPU name, thread count), found anywhere under the
   run's results folder. Each record's measured training seconds are scaled by the planned optimiser
   steps of the new job against the record's (`TorchDetector.planned_steps`; training images for
   detectors without stages), its scoring seconds by the test images, and its remaining seconds
   (data, writing) are kept. The job's figure is the median over the records; the range is their
   spread. Records made with `--track-auroc` (per-epoch scoring inside training) or trained stacked
   are not used.
2. Otherwise a **calibration** per (method, settings, image shape): the detector itself is fitted on
   random images with every stage capped at a few steps (its `Stage`'s own `max_steps` / `epochs`
   arguments), and each optimiser step is timed alone (`TorchDetector.step_clock`, synchronised on a
   GPU). The first steps of each stage are warm-up and dropped; the figure is the median over
   whole periods of the rest (f-AnoGAN's generator update every n_critic steps is a period). Scoring
   is timed three times on a score batch; the median is used. A job's time is then

       sum over stages of planned steps x seconds per step + test images x seconds per image
       + the fixed cost of a fit.

   A calibration made while other processes kept the machine busy (more than a quarter of its CPU
   time, read from /proc/stat just before) is marked so and redone once the machine is idle; one
   whose figure disagrees with finished records of the same setting by more than 2x is redone too.
   A calibration is thin evidence, so it is printed as a range (0.8x to 1.5x of its figure:
   data loading, epoch ends and contention between parallel jobs are not in it).

Calibrations are cached per device, torch version and thread count in
~/.cache/memgan-bench/calibration.json ($MEMGAN_CALIBRATION_CACHE overrides the file);
$MEMGAN_CALIBRATION_STEPS (default 8) sets the timed steps per stage. The wall time of a run is the
finishing time of its last job when the jobs are handed in order to `n_parallel` processes, each
taking the next job when it is free (joblib's and Dask's order). Left out: the per-epoch AUROC of
`--track-auroc`.
"""
from __future__ import annotations

import heapq
import importlib
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from benchmark.data import load_dataset
from benchmark.profiles import PROFILE_SUBSAMPLE
from benchmark.records import iter_records
from methods import get_method
from methods.base import TrainOptions, resolve_device

CACHE_ENV = "MEMGAN_CALIBRATION_CACHE"
STEPS_ENV = "MEMGAN_CALIBRATION_STEPS"
DEFAULT_STEPS = 8
WARMUP_STEPS = 2          # per stage, rounded up to whole periods; dropped from the timing
SCORE_REPEATS = 3
LINEAR_SAMPLE = 512       # images timed for detectors without stages (fit and score scale linearly)
BUSY_FRACTION = 0.25      # other processes' share of the CPU time above which a calibration is "busy"
DISAGREEMENT = 2.0        # a calibration off by more than this factor from finished records is redone ...
MIN_CHECKED_SECONDS = 10.0  # ... when the job takes this long (a second's job is all fixed costs)
CALIBRATION_RANGE = (0.8, 1.5)  # printed range of a calibration-only figure (thin evidence)
FEW_RECORDS = 3           # fewer matching records than this: the range is widened like a calibration's
CALIBRATION_VERSION = 2   # cache entries of an older procedure are redone


@dataclass(frozen=True)
class JobEstimate:
    """Expected seconds of one job, with the range the evidence allows.

    Attributes
    ----------
    method, dataset : str
        The job's method and dataset.
    train_seconds, score_seconds, overhead_seconds : float
        Expected seconds of training, of scoring the test set, and the rest (data, fixed costs).
    steps : int
        Planned optimiser steps (0 for detectors without stages).
    low, high : float
        The range of the job's seconds.
    source : str
        ``"records"`` (scaled from n finished records) or ``"calibration"``.
    n_records : int
        Number of finished records the figure comes from (0 for a calibration).
    """
    method: str
    dataset: str
    train_seconds: float
    score_seconds: float
    overhead_seconds: float
    steps: int
    low: float = 0.0
    high: float = 0.0
    source: str = "calibration"
    n_records: int = 0

    @property
    def seconds(self) -> float:
        """Expected seconds of the whole job."""
        return self.train_seconds + self.score_seconds + self.overhead_seconds


def makespan(seconds: list[float], n_parallel: int) -> float:
    """Finishing time of the last job when jobs are taken in order by `n_parallel` processes.

    Parameters
    ----------
    seconds : list of float
        Each job's seconds, in the order the jobs are handed out.
    n_parallel : int
        Number of processes.

    Returns
    -------
    float
        The wall time.
    """
    free_at = [0.0] * max(1, min(n_parallel, len(seconds) or 1))
    for job_seconds in seconds:
        heapq.heappush(free_at, heapq.heappop(free_at) + job_seconds)
    return max(free_at)


@dataclass(frozen=True)
class RunEstimate:
    """Expected time of a run: its jobs, the number of parallel processes and the device."""
    jobs: list[JobEstimate]
    n_parallel: int
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        """Sum over jobs of their expected seconds (one process's work)."""
        return float(sum(job.seconds for job in self.jobs))

    @property
    def wall_seconds(self) -> float:
        """Expected wall time with n_parallel jobs at a time (calibrated at their thread count)."""
        return makespan([job.seconds for job in self.jobs], self.n_parallel)

    @property
    def wall_range(self) -> tuple[float, float]:
        """The range of the wall time (every job at its low, then at its high figure)."""
        return (makespan([job.low for job in self.jobs], self.n_parallel),
                makespan([job.high for job in self.jobs], self.n_parallel))


def format_seconds(seconds: float) -> str:
    """Human-readable duration: '45 s', '12 min', '3.4 h', '2.1 days'.

    Parameters
    ----------
    seconds : float
        The duration.

    Returns
    -------
    str
        The text.
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cache_path() -> Path:
    """The calibration cache's file (${CACHE_ENV}, else ~/.cache/memgan-bench/calibration.json).

    Returns
    -------
    Path
        The file.
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "memgan-bench" / "calibration.json")


def calibration_steps() -> int:
    """Training steps timed per stage in a calibration, after the warm-up (${STEPS_ENV}, default 8).

    Returns
    -------
    int
        The number of steps.

    Raises
    ------
    ValueError
        When the variable is not a positive integer.
    """
    text = os.environ.get(STEPS_ENV, str(DEFAULT_STEPS))
    try:
        steps = int(text)
    except ValueError:
        raise ValueError(f"${STEPS_ENV} must be a positive integer, got {text!r}") from None
    if steps < 1:
        raise ValueError(f"${STEPS_ENV} must be a positive integer, got {text!r}")
    return steps


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one).

    Returns
    -------
    str
        The name, else `platform.processor()` or the machine type.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_identity(device: str) -> tuple[str, str, int]:
    """(device type, GPU name or CPU model, torch threads) of this process's `device`: what makes
    seconds comparable, as `record_device` reads it from a record.

    Parameters
    ----------
    device : str
        Torch device.

    Returns
    -------
    tuple
        The device's type, its name and the thread count.
    """
    import torch

    resolved = resolve_device(device)
    name = torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else cpu_model()
    return resolved.type, name, torch.get_num_threads()


def device_description(device: str) -> str:
    """Device, torch version and thread count: the calibration cache's outer key.

    Parameters
    ----------
    device : str
        Torch device.

    Returns
    -------
    str
        The description.
    """
    import torch

    kind, name, threads = device_identity(device)
    return f"{kind}:{name}|torch {torch.__version__}|{threads} threads"


def busy_fraction(window: float = 0.5) -> Optional[float]:
    """Share of the machine's CPU time used by running processes over `window` seconds (this one
    is idle meanwhile, so it is other processes' share); None where /proc/stat cannot be read.

    Parameters
    ----------
    window : float, default=0.5
        Seconds to watch.

    Returns
    -------
    float or None
        A share in [0, 1].
    """
    def read() -> Optional[tuple[int, int]]:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()
        except (OSError, IndexError):
            return None
        if not fields or fields[0] != "cpu":
            return None
        values = [int(v) for v in fields[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle  # user .. steal (guest time is counted in user already)

    first = read()
    time.sleep(window)
    second = read()
    if first is None or second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return max(0.0, min(1.0, 1.0 - idle / total))


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs a recalibration next time


def _warmup_steps(stage: Any) -> int:
    return stage.period * -(-WARMUP_STEPS // stage.period)


def _timed_steps(stage: Any, steps: int) -> int:
    """Timed steps of a stage: whole periods covering `steps`, at least three periods."""
    return stage.period * max(3, -(-steps // stage.period))


def _calibration_params(stages: list, steps: int) -> dict:
    params = {}
    for stage in stages:
        count = _warmup_steps(stage) + _timed_steps(stage, steps)
        params[stage.max_steps_param] = count
        if stage.epochs_param is not None:
            params[stage.epochs_param] = count
    return params


def _median_time(call: Callable[[], Any], repeats: int = SCORE_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(target: str, params: dict, shape: tuple, steps: int, precision: str = "fp32") -> dict:
    """Time the detector `target` built with `params` on random images.

    Parameters
    ----------
    target : str
        The detector's "module:Class".
    params : dict
        Constructor arguments.
    shape : tuple
        Image shape (C, H, W).
    steps : int
        Training steps timed per stage, after the warm-up (rounded up to whole periods).
    precision : str, default="fp32"
        The training precision of the timed fit (a torch detector's; `job_precision`).

    Returns
    -------
    dict
        {"kind": "stages", "step_seconds": {stage: s}, "score_seconds_per_image", "overhead_seconds",
        "steps_timed": {stage: n}} or {"kind": "linear", "fit_seconds_per_image", "score_seconds_per_image"}.
    """
    from methods.engine import fit_jobs  # loads torch: this module imports without it (the command line's)
    from methods.torch_base import TorchDetector

    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    rng = np.random.default_rng(0)
    detector = cls(**params)
    if not isinstance(detector, TorchDetector) or not detector._stages(1):
        x = rng.random((LINEAR_SAMPLE, *shape), dtype=np.float32)
        cls(**params).fit(x[:64]).decision_function(x[:64])  # imports, first-call costs
        fit_s = _median_time(lambda: detector.fit(x))
        score_s = _median_time(lambda: detector.decision_function(x))
        return {"kind": "linear", "fit_seconds_per_image": fit_s / len(x), "score_seconds_per_image": score_s / len(x)}
    n = max(stage.batch_size for stage in detector._stages(1))
    stages = detector._stages(n)
    x = rng.random((n, *shape), dtype=np.float32)
    timed = cls(**{**params, **_calibration_params(stages, steps)})
    timed.step_clock = clock = []
    t0 = time.perf_counter()
    (error,) = fit_jobs([timed], [x], options=TrainOptions(precision=precision))
    fit_s = time.perf_counter() - t0
    if error is not None:
        raise error
    step_s, counted = {}, {}
    for stage in stages:
        durations = [seconds for name, seconds in clock if name == stage.name][_warmup_steps(stage):]
        periods = [sum(durations[i:i + stage.period]) / stage.period
                   for i in range(0, len(durations) - stage.period + 1, stage.period)]
        if periods:
            step_s[stage.name] = statistics.median(periods)
            counted[stage.name] = len(durations)
    n_score = min(timed.score_batch_size, LINEAR_SAMPLE)
    x_score = rng.random((n_score, *shape), dtype=np.float32)
    timed.decision_function(x_score[:8])
    score_s = _median_time(lambda: timed.decision_function(x_score))
    return {"kind": "stages", "step_seconds": step_s, "score_seconds_per_image": score_s / n_score,
            "overhead_seconds": max(0.0, fit_s - sum(seconds for _, seconds in clock)), "steps_timed": counted}


def predicted_seconds(cal: dict, planned: dict[str, int], n_train: int, n_test: int) -> tuple[float, float, float]:
    """(train, score, overhead) seconds of a job from a calibration.

    Parameters
    ----------
    cal : dict
        A calibration (`calibrate`).
    planned : dict of str to int
        Planned optimiser steps per stage (empty for detectors without stages).
    n_train, n_test : int
        Training and test images.

    Returns
    -------
    tuple of float
    """
    if cal["kind"] == "linear":
        return cal["fit_seconds_per_image"] * n_train, cal["score_seconds_per_image"] * n_test, 0.0
    train = sum(n * cal["step_seconds"].get(stage, 0.0) for stage, n in planned.items())
    return train, cal["score_seconds_per_image"] * n_test, cal["overhead_seconds"]


def task_sizes(labels_train: np.ndarray, labels_test: np.ndarray, normal_class: int, protocol: str,
               subsample: Any) -> tuple[int, int]:
    """Sizes of a task, counted as `benchmark.splits.make_task` draws them.

    Parameters
    ----------
    labels_train : numpy.ndarray
        Labels of the dataset's training split.
    labels_test : numpy.ndarray
        Labels of the dataset's test split.
    normal_class : int
        The normal class.
    protocol : str
        The protocol.
    subsample : Any
        The profile's subsampling setting.

    Returns
    -------
    n_train : int
        Training images.
    n_test : int
        Test images.
    """
    def cap(n: int, limit: Optional[int]) -> int:
        return n if limit is None else min(n, limit)

    n_train = cap(int((labels_train == normal_class).sum()), subsample.max_train)
    n_normal = cap(int((labels_test == normal_class).sum()), subsample.max_test_normal)
    n_anomalous = int((labels_test != normal_class).sum())
    if protocol == "paper":
        n_anomalous += int((labels_train != normal_class).sum())
    return n_train, n_normal + cap(n_anomalous, subsample.max_test_anomalous)


def _settings_key(params: dict) -> str:
    return json.dumps({k: v for k, v in params.items() if k not in ("random_state", "device")},
                      sort_keys=True, default=repr)


def record_device(record: dict) -> tuple[str, str, int]:
    """(device type, CPU model or GPU name, threads) of a record: what makes its seconds comparable.

    Parameters
    ----------
    record : dict
        A job record.

    Returns
    -------
    tuple
        The device's type, its name ("" when the record does not say) and the thread count.
    """
    info = record.get("run_info") or {}
    kind = str(info.get("device", "cpu")).split(":")[0]
    name = info.get("gpu_name") if kind == "cuda" else record.get("cpu_model")
    threads = int(record.get("threads") or info.get("torch_num_threads") or 0)
    return kind, str(name or ""), threads


@dataclass
class RecordTimings:
    """Finished records' seconds, grouped by (method, dataset, settings, precision, device)."""
    groups: dict = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def from_results(cls, results_dir: Optional[Path]) -> "RecordTimings":
        """Read every usable record under `results_dir` (ok, solo, without --track-auroc).

        Parameters
        ----------
        results_dir : Path or None
            The results folder (None: no records).

        Returns
        -------
        RecordTimings
        """
        timings = cls()
        if results_dir is None or not Path(results_dir).is_dir():
            return timings
        for _, record, problem in iter_records(Path(results_dir)):
            if problem or record is None or record.get("status") != "ok" or record.get("diagnostics"):
                continue
            if (record.get("stack") or {}).get("size", 1) > 1 or "train_seconds" not in record:
                continue
            precision = (record.get("run_info") or {}).get("precision", "fp32")
            key = (record["method"], record["dataset"], _settings_key(record.get("hyperparameters") or {}), precision)
            timings.groups[key].append(record)
        return timings

    def matching(self, method: str, dataset: str, params: dict, precision: str,
                 device: tuple[str, str, int]) -> list[dict]:
        """Records of the same method, dataset, settings, precision and device.

        A record that does not name its CPU model (older records) matches any CPU of the same
        thread count.

        Parameters
        ----------
        method, dataset : str
            The job's.
        params : dict
            The job's full hyperparameters (`get_params()`).
        precision : str
            The job's precision.
        device : tuple
            `record_device` of the run's device.

        Returns
        -------
        list of dict
        """
        found = []
        for record in self.groups.get((method, dataset, _settings_key(params), precision), []):
            kind, name, threads = record_device(record)
            if kind == device[0] and threads == device[2] and (not name or name == device[1]):
                found.append(record)
        return found


def _from_records(records: list[dict], steps_of: Callable[[int], int], n_train: int,
                  n_test: int) -> tuple[float, float, float, float, float]:
    """Median (train, score, rest) seconds scaled to the job's sizes, and the (low, high) of the totals."""
    trains, scores, rests = [], [], []
    for record in records:
        sizes = record.get("sizes") or {}
        rec_train, rec_test = int(sizes.get("n_train", 0)), int(sizes.get("n_test", 0))
        rec_steps, new_steps = steps_of(rec_train), steps_of(n_train)
        if rec_steps and new_steps:
            scale = new_steps / rec_steps
        else:
            scale = n_train / rec_train if rec_train else 1.0
        train_s = float(record["train_seconds"])
        score_s = float(record.get("score_seconds", 0.0))
        trains.append(train_s * scale)
        scores.append(score_s * (n_test / rec_test if rec_test else 1.0))
        rests.append(max(0.0, float(record.get("seconds", train_s + score_s)) - train_s - score_s))
    totals = [t + s + r for t, s, r in zip(trains, scores, rests)]
    return (statistics.median(trains), statistics.median(scores), statistics.median(rests), min(totals),
            max(totals))


def job_precision(detector: Any, precision: str) -> str:
    """The precision a detector trains in under the run's --precision: "auto" resolved on its device
    (`TorchDetector.resolve_train_options`); "fp32" for a detector without torch training.

    Parameters
    ----------
    detector : Detector
        The job's detector (not fitted).
    precision : str
        The run's --precision.

    Returns
    -------
    str
        "fp32" or "bf16".
    """
    resolve = getattr(detector, "resolve_train_options", None)
    if resolve is None:
        return "fp32"
    return resolve(TrainOptions(precision=precision)).precision


def estimate_jobs(jobs: list, data_root: Optional[str], download: bool, n_parallel: int = 1,
                  device: str = "auto", log: Any = None, results_dir: Optional[Path] = None,
                  precision: str = "fp32", val_fraction: float = 0.0) -> RunEstimate:
    """Expected time of `jobs` on this device: from finished records where there are some, else
    from a calibration (cached; redone when it was made on a busy machine or disagrees with records).

    Parameters
    ----------
    jobs : list of benchmark.jobs.Job
        The jobs.
    data_root : str or None
        Dataset folder.
    download : bool
        Download missing datasets.
    n_parallel : int, default=1
        Number of parallel processes.
    device : str, default="auto"
        Torch device.
    log : callable, optional
        `log(text)` is told about each calibration (they take seconds each) and each redone one.
    results_dir : Path, optional
        Where finished records are looked for (the run's results folder; None: none).
    precision : str, default="fp32"
        The run's --precision ("auto" resolves per detector: `job_precision`); records of another
        precision are not used.
    val_fraction : float, default=0.0
        The run's held-out share of the normal training images (fewer images to train on).

    Returns
    -------
    RunEstimate
        The estimate.
    """
    steps = calibration_steps()
    outer = device_description(device)
    this_device = device_identity(device)
    timings = RecordTimings.from_results(results_dir)
    cache = _load_cache()
    entries = cache.setdefault(outer, {})
    busy_now: Optional[float] = None
    datasets: dict[str, Any] = {}
    estimates, notes, checked = [], [], set()

    def say(text: str) -> None:
        if log is not None:
            log(text)

    def calibration(inner: str, method: str, dataset: str, target: str, params: dict, shape: tuple,
                    job_precision: str) -> dict:
        nonlocal busy_now
        entry = entries.get(inner)
        if entry is not None and entry.get("version") != CALIBRATION_VERSION:
            entry = None
        if entry is not None and entry.get("busy"):
            if busy_now is None:
                busy_now = busy_fraction()
            if busy_now is not None and busy_now <= BUSY_FRACTION:
                say(f"recalibrating {method}: its cached calibration was made on a busy machine")
                entry = None
        if entry is None:
            if busy_now is None:
                busy_now = busy_fraction()
            busy = busy_now is not None and busy_now > BUSY_FRACTION
            say(f"calibrating {method} on {dataset}-sized images ({steps} timed steps per stage after "
                f"{WARMUP_STEPS} warm-up steps)" + (f"; the machine is busy ({busy_now:.0%} of its CPU time in "
                                                   "use by other processes), so this figure is marked to be redone"
                                                   if busy else ""))
            entry = {**calibrate(target, dict(params), shape, steps, job_precision), "version": CALIBRATION_VERSION,
                     "busy": busy, "busy_fraction": busy_now, "created": time.time()}
            entries[inner] = entry
            _save_cache(cache)
            busy_now = None  # the machine's state is read afresh before the next calibration
        return entry

    for job in jobs:
        key = job.key
        if key.dataset not in datasets:
            datasets[key.dataset] = load_dataset(key.dataset, data_root, download)
        data = datasets[key.dataset]
        shape = tuple(data.train_images.shape[1:])
        n_train, n_test = task_sizes(data.train_labels, data.test_labels, key.normal_class, key.protocol,
                                     PROFILE_SUBSAMPLE[job.base_profile])
        if val_fraction > 0:  # as benchmark.splits.make_task holds them out
            n_train -= max(1, int(round(val_fraction * n_train)))
        target = job.target or get_method(key.method).target
        module_name, class_name = target.split(":")
        detector = getattr(importlib.import_module(module_name), class_name)(**job.params)
        staged = bool(detector._stages(n_train)) if hasattr(detector, "_stages") else False

        def steps_of(n: int, detector: Any = detector, staged: bool = staged) -> int:
            """Planned optimiser steps on n images (0 for a detector without stages)."""
            return sum(detector.planned_steps(n).values()) if staged and n > 0 else 0

        planned = detector.planned_steps(n_train) if staged else {}
        calib_params = {k: v for k, v in job.params.items() if k != "random_state"}
        trains_in = job_precision(detector, precision)
        inner = json.dumps([target, list(shape), calib_params] + ([trains_in] if trains_in != "fp32" else []),
                           sort_keys=True, default=repr)  # fp32 keeps the key of the calibrations made before
        records = timings.matching(key.method, key.dataset, detector.get_params(), trains_in, this_device)
        if records:
            train_s, score_s, rest_s, low, high = _from_records(records, steps_of, n_train, n_test)
            point = train_s + score_s + rest_s
            if len(records) < FEW_RECORDS:
                low, high = min(low, point * CALIBRATION_RANGE[0]), max(high, point * CALIBRATION_RANGE[1])
            estimates.append(JobEstimate(key.method, key.dataset, train_s, score_s, rest_s, sum(planned.values()),
                                         low, high, "records", len(records)))
            cached = entries.get(inner)
            if cached is not None and inner not in checked:  # a calibration far from what jobs measured is redone
                checked.add(inner)
                rec = records[0]
                sizes = rec.get("sizes") or {}
                rec_n_train, rec_n_test = int(sizes.get("n_train", 0)), int(sizes.get("n_test", 0))
                rec_planned = detector.planned_steps(rec_n_train) if staged and rec_n_train else {}
                predicted = sum(predicted_seconds(cached, rec_planned, rec_n_train, rec_n_test))
                measured = float(rec["train_seconds"]) + float(rec.get("score_seconds", 0.0))
                if (predicted > 0 and max(predicted, measured) >= MIN_CHECKED_SECONDS
                        and not 1 / DISAGREEMENT <= measured / predicted <= DISAGREEMENT):
                    notes.append(f"{key.method}: the cached calibration said {format_seconds(predicted)} for a job "
                                 f"that took {format_seconds(measured)}; it is dropped and redone when needed")
                    del entries[inner]
                    _save_cache(cache)
            continue
        cal = calibration(inner, key.method, key.dataset, target, calib_params, shape, trains_in)
        train_s, score_s, overhead_s = predicted_seconds(cal, planned, n_train, n_test)
        point = train_s + score_s + overhead_s
        estimates.append(JobEstimate(key.method, key.dataset, train_s, score_s, overhead_s, sum(planned.values()),
                                     point * CALIBRATION_RANGE[0], point * CALIBRATION_RANGE[1], "calibration"))
    return RunEstimate(estimates, n_parallel, outer, notes)


class RemainingTime:
    """A run's remaining wall time, for the progress display: the unfinished jobs' estimated seconds
    (the same per-job figures `--estimate` prints), scaled by how finished jobs compared with their
    estimates, handed in order to `n_parallel` processes. The scale starts at 1 and moves with the
    evidence: (measured + w) / (estimated + w) over finished jobs, w = a tenth of the run's
    estimated work, so one short job does not swing the figure.

    Parameters
    ----------
    expected : dict
        Job key -> estimated seconds (jobs without an estimate are left out of the figure).
    n_parallel : int
        Number of parallel processes.
    """

    def __init__(self, expected: dict, n_parallel: int) -> None:
        self.expected = dict(expected)
        self.n_parallel = max(1, n_parallel)
        self.pending = list(self.expected)
        self.measured = 0.0
        self.predicted = 0.0

    def finished(self, key: Any, seconds: float) -> None:
        """Note a finished job and its measured seconds.

        Parameters
        ----------
        key : Any
            The job's key.
        seconds : float
            Its measured seconds (0 for a job that did not run here: claimed, already recorded).
        """
        if key in self.expected and key in self.pending:
            self.pending.remove(key)
            if seconds > 0:
                self.measured += seconds
                self.predicted += self.expected[key]

    def seconds(self) -> Optional[float]:
        """Expected seconds left (None without estimates)."""
        if not self.expected:
            return None
        prior = 0.1 * sum(self.expected.values())
        ratio = (self.measured + prior) / (self.predicted + prior) if self.predicted + prior > 0 else 1.0
        return makespan([self.expected[key] * ratio for key in self.pending], self.n_parallel)

    def text(self) -> str:
        """'about 12 min left', or '' without estimates."""
        left = self.seconds()
        return "" if left is None else f"about {format_seconds(left)} left"


def describe(estimate: RunEstimate) -> str:
    """The estimate as printed: the wall time with its range, then per method and dataset.

    Parameters
    ----------
    estimate : RunEstimate
        The estimate.

    Returns
    -------
    str
        The text.
    """
    groups: dict[tuple[str, str], list[JobEstimate]] = defaultdict(list)
    for job in estimate.jobs:
        groups[(job.method, job.dataset)].append(job)
    low, high = estimate.wall_range
    lines = [f"estimate on {estimate.device}: {len(estimate.jobs)} jobs, about "
             f"{format_seconds(estimate.wall_seconds)} wall time (range {format_seconds(low)} to "
             f"{format_seconds(high)}) with {estimate.n_parallel} job(s) at a time "
             f"({format_seconds(estimate.total_seconds)} of work)"]
    if groups:
        lines.append(f"  {'method':<16}{'dataset':<15}{'jobs':>5}{'steps/job':>11}{'per job':>10}{'total':>10}"
                     f"  from")
    for (method, dataset), group in groups.items():
        total = sum(job.seconds for job in group)
        steps = sum(job.steps for job in group) / len(group)
        n_records = [job.n_records for job in group if job.source == "records"]
        source = (f"{min(n_records)}+ finished records" if len(n_records) == len(group) and n_records
                  else "calibration" if not n_records else f"records ({len(n_records)} jobs), calibration")
        lines.append(f"  {method:<16}{dataset:<15}{len(group):>5}{steps:>11.0f}{format_seconds(total / len(group)):>10}"
                     f"{format_seconds(total):>10}  {source}")
    lines.extend(f"  note: {note}" for note in estimate.notes)
    return "\n".join(lines)
