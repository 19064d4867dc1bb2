"""How long a run will take on this device, before any training: `run_all.py ... --estimate`.

Per (method, settings, image shape) a short calibration fits the detector itself with every
training stage capped at a few steps (the stage's own `max_steps` / `epochs` arguments, named by
its `Stage`), and scores a few batches; it measures seconds per optimiser step of each stage,
seconds per scored image, and the fixed cost of a fit (networks, preprocessing). A job's time
is then

    sum over stages of planned steps x seconds per step  +  test images x seconds per image
    + the fixed cost,

with the planned steps from the detector's budget and the job's task sizes (counted from the
labels, no training: `TorchDetector.planned_steps`). Detectors without stages (iForest, pyod
models) are timed on a small sample and scaled linearly in the number of images.

Calibrations are cached per device, torch version and thread count in
~/.cache/memgan-bench/calibration.json ($MEMGAN_CALIBRATION_CACHE overrides the file);
$MEMGAN_CALIBRATION_STEPS (default 3) sets the steps per stage of a calibration fit.
What it leaves out: data loading (seconds), the per-epoch AUROC of --track-auroc (one scoring
pass per epoch), and contention between parallel jobs beyond the even split of the cores.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

CACHE_ENV = "MEMGAN_CALIBRATION_CACHE"
STEPS_ENV = "MEMGAN_CALIBRATION_STEPS"
LINEAR_SAMPLE = 512  # images timed for detectors without stages (fit and score scale linearly)


@dataclass(frozen=True)
class JobEstimate:
    """Expected seconds of one job: training steps, scoring, and the fixed cost of a fit."""
    method: str
    dataset: str
    train_seconds: float
    score_seconds: float
    overhead_seconds: float
    steps: int

    @property
    def seconds(self) -> float:
        """Expected seconds of the whole job."""
        return self.train_seconds + self.score_seconds + self.overhead_seconds


@dataclass(frozen=True)
class RunEstimate:
    """Expected time of a run: its jobs, the number of parallel processes and the device."""
    jobs: list[JobEstimate]
    n_parallel: int
    device: str

    @property
    def total_seconds(self) -> float:
        """Sum over jobs of their expected seconds (one process's work)."""
        return float(sum(job.seconds for job in self.jobs))

    @property
    def wall_seconds(self) -> float:
        """Expected wall time with n_parallel jobs at a time (calibrated at their thread count)."""
        return self.total_seconds / max(1, min(self.n_parallel, len(self.jobs) or 1))


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
    """Training steps timed per stage in a calibration (${STEPS_ENV}, default 3).

    Returns
    -------
    int
        The number of steps.

    Raises
    ------
    ValueError
        When the variable is not a positive integer.
    """
    text = os.environ.get(STEPS_ENV, "3")
    try:
        steps = int(text)
    except ValueError:
        raise ValueError(f"${STEPS_ENV} must be a positive integer, got {text!r}") from None
    if steps < 1:
        raise ValueError(f"${STEPS_ENV} must be a positive integer, got {text!r}")
    return steps


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

    from methods.torch_base import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        name = torch.cuda.get_device_name(resolved)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"{resolved.type}:{name}|torch {torch.__version__}|{torch.get_num_threads()} threads"


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


def _stage_steps(stage: Any, steps: int) -> int:
    """Steps of a timed calibration fit: 1 + whole periods of the stage (at least `steps` - 1)."""
    if steps <= 1:
        return 1
    return 1 + stage.period * -(-(steps - 1) // stage.period)


def _calibration_params(stages: list, steps: int) -> dict:
    params = {}
    for stage in stages:
        params[stage.max_steps_param] = _stage_steps(stage, steps)
        if stage.epochs_param is not None:
            params[stage.epochs_param] = _stage_steps(stage, steps)
    return params


def calibrate(target: str, params: dict, shape: tuple, steps: int) -> dict:
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
        Training steps timed per stage.

    Returns
    -------
    dict
        {"kind": "stages", "step_seconds": {stage: s}, "score_seconds_per_image", "overhead_seconds"} or
        {"kind": "linear", "fit_seconds_per_image", "score_seconds_per_image"}.
    """
    import importlib

    from methods.torch_base import TorchDetector

    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    rng = np.random.default_rng(0)
    detector = cls(**params)
    if not isinstance(detector, TorchDetector) or not detector._stages(1):
        x = rng.random((LINEAR_SAMPLE, *shape), dtype=np.float32)
        cls(**params).fit(x[:64]).decision_function(x[:64])  # imports, first-call costs
        t0 = time.perf_counter()
        detector.fit(x)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        detector.decision_function(x)
        score_s = time.perf_counter() - t0
        return {"kind": "linear", "fit_seconds_per_image": fit_s / len(x), "score_seconds_per_image": score_s / len(x)}
    probe_stages = detector._stages(1)
    n = max(stage.batch_size for stage in probe_stages)
    stages = detector._stages(n)
    x = rng.random((n, *shape), dtype=np.float32)
    # A 1-step fit first (kernels, allocator); with more steps, the per-step time is the
    # difference between the two fits, so first-step costs drop out.
    first = cls(**{**params, **_calibration_params(stages, 1)})
    t0 = time.perf_counter()
    first.fit(x)
    fit_s = time.perf_counter() - t0
    timed, stage_s = first, dict(first.stage_seconds_)
    step_s = dict(stage_s)
    if steps > 1:
        timed = cls(**{**params, **_calibration_params(stages, steps)})
        t0 = time.perf_counter()
        timed.fit(x)
        fit_s = time.perf_counter() - t0
        stage_s = dict(timed.stage_seconds_)
        counts = {stage.name: _stage_steps(stage, steps) for stage in stages}
        step_s = {name: max((s - first.stage_seconds_.get(name, 0.0)) / (counts[name] - 1), 0.2 * s / counts[name])
                  for name, s in stage_s.items()}
    n_score = min(n, timed.score_batch_size)
    timed.decision_function(x[:min(n_score, 8)])
    t0 = time.perf_counter()
    timed.decision_function(x[:n_score])
    score_s = time.perf_counter() - t0
    return {"kind": "stages", "step_seconds": step_s, "score_seconds_per_image": score_s / n_score,
            "overhead_seconds": max(0.0, fit_s - sum(stage_s.values()))}


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


def estimate_jobs(jobs: list, data_root: Optional[str], download: bool, n_parallel: int = 1,
                  device: str = "auto", log: Any = None) -> RunEstimate:
    """Expected time of `jobs` on this device, calibrating what the cache lacks.

    Parameters
    ----------
    jobs : list of benchmark.runner.Job
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
        `log(text)` is told about each calibration (they take seconds each).

    Returns
    -------
    RunEstimate
        The estimate.
    """
    import importlib

    from benchmark.data import load_dataset
    from benchmark.runner import PROFILE_SUBSAMPLE
    from methods import get_method

    steps = calibration_steps()
    outer = device_description(device)
    cache = _load_cache()
    entries = cache.setdefault(outer, {})
    datasets: dict[str, Any] = {}
    estimates = []
    for job in jobs:
        key = job.key
        if key.dataset not in datasets:
            datasets[key.dataset] = load_dataset(key.dataset, data_root, download)
        data = datasets[key.dataset]
        shape = tuple(data.train_images.shape[1:])
        n_train, n_test = task_sizes(data.train_labels, data.test_labels, key.normal_class, key.protocol,
                                     PROFILE_SUBSAMPLE[job.base_profile])
        target = job.target or get_method(key.method).target
        calib_params = {k: v for k, v in job.params.items() if k != "random_state"}
        inner = json.dumps([target, list(shape), calib_params], sort_keys=True, default=repr)
        if inner not in entries:
            if log is not None:
                log(f"calibrating {key.method} on {key.dataset}-sized images ({steps} steps per stage)")
            entries[inner] = calibrate(target, dict(calib_params), shape, steps)
            _save_cache(cache)
        cal = entries[inner]
        if cal["kind"] == "linear":
            estimates.append(JobEstimate(key.method, key.dataset, cal["fit_seconds_per_image"] * n_train,
                                         cal["score_seconds_per_image"] * n_test, 0.0, 0))
            continue
        module_name, class_name = target.split(":")
        detector = getattr(importlib.import_module(module_name), class_name)(**job.params)
        planned = detector.planned_steps(n_train)
        train_s = sum(n * cal["step_seconds"].get(stage, 0.0) for stage, n in planned.items())
        estimates.append(JobEstimate(key.method, key.dataset, train_s, cal["score_seconds_per_image"] * n_test,
                                     cal["overhead_seconds"], sum(planned.values())))
    return RunEstimate(estimates, n_parallel, outer)


def describe(estimate: RunEstimate) -> str:
    """The estimate as printed: per method and dataset, then the total.

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
    lines = [f"estimate on {estimate.device}: {len(estimate.jobs)} jobs, about "
             f"{format_seconds(estimate.wall_seconds)} wall time with {estimate.n_parallel} job(s) at a time "
             f"({format_seconds(estimate.total_seconds)} of work)"]
    if groups:
        lines.append(f"  {'method':<16}{'dataset':<15}{'jobs':>5}{'steps/job':>11}{'per job':>10}{'total':>10}")
    for (method, dataset), group in groups.items():
        total = sum(job.seconds for job in group)
        steps = sum(job.steps for job in group) / len(group)
        lines.append(f"  {method:<16}{dataset:<15}{len(group):>5}{steps:>11.0f}{format_seconds(total / len(group)):>10}"
                     f"{format_seconds(total):>10}")
    return "\n".join(lines)
