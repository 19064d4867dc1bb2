"""Stacked jobs in the runner (`run_all.py --stack K`): pending jobs that share method, dataset,
profile, protocol and hyperparameters (they differ in class and/or seed) are trained K at a time
as one batched model (methods/stacking.py), in one process; each job still writes its own record
and scores, and its record's `stack` field names the jobs that trained together and how long
the group's training took.

A unit of work is a list of jobs: one job runs through `run_job`, a group through `run_group`; both
go through the same steps of benchmark/jobs.py.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable, Optional

from benchmark.jobs import (
    Job,
    JobOutcome,
    RunSettings,
    auroc_tracker,
    build_detector,
    claim,
    limit_threads,
    new_record,
    prepare,
    record_error,
    run_job,
    score_into,
    write_result,
)
from benchmark.records import ResultsWriteError
from methods.base import DivergedError, resolve_device, supports_stacking


def auto_stack(device: str) -> int:
    """The stack size of --stack auto.

    1 on the CPU (stacking measured no faster there, see README); on a GPU, up to 10 jobs while each has at
    least 4 GiB of the GPU's memory (a rule of thumb: not measured yet on a GPU; `python -m benchmark.speed`
    prints the throughput at K = 1, 4, 10).

    Parameters
    ----------
    device : str
        Torch device.

    Returns
    -------
    int
        The stack size.
    """
    import torch

    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return 1
    total_gib = torch.cuda.get_device_properties(resolved).total_memory / 2**30
    return max(1, min(10, int(total_gib // 4)))


def _stackable(job: Job) -> bool:
    try:
        return supports_stacking(build_detector(job))
    except Exception:  # noqa: BLE001 - a job that cannot be built runs alone and is recorded failed
        return False


def group_jobs(jobs: list[Job], stack: int) -> list[list[Job]]:
    """Split jobs into units of work.

    Groups hold up to `stack` jobs with the same method, dataset, profile, protocol and hyperparameters but
    random_state (for detectors that can train stacked); other jobs stay single. Groups keep the jobs' order
    of first appearance.

    Parameters
    ----------
    jobs : list of Job
        The jobs.
    stack : int
        Largest group size.

    Returns
    -------
    list of list of Job
        The units.
    """
    if stack <= 1:
        return [[job] for job in jobs]
    groups: "OrderedDict[Any, list[Job]]" = OrderedDict()
    units: list[list[Job]] = []
    for job in jobs:
        if not _stackable(job):
            units.append([job])
            continue
        params = {k: v for k, v in job.params.items() if k != "random_state"}
        signature = (job.key.method, job.key.dataset, job.key.profile, job.key.protocol, job.target,
                     repr(sorted(params.items())))
        group = groups.setdefault(signature, [])
        group.append(job)
        if len(group) == stack:
            units.append(groups.pop(signature))
    units.extend(groups.values())
    return units


def run_unit(unit: list[Job], settings: RunSettings,
             progress: Optional[Callable] = None) -> list[JobOutcome]:
    """One unit of work: a single job (run_job) or a group (run_group).

    Parameters
    ----------
    unit : list of Job
        The unit.
    settings : RunSettings
        What every job of the run shares.
    progress : callable, optional
        Per-epoch progress callback.

    Returns
    -------
    list of JobOutcome
        One outcome per job.
    """
    if len(unit) == 1:
        return [run_job(unit[0], settings, progress=progress)]
    return run_group(unit, settings, progress)


def run_group(jobs: list[Job], settings: RunSettings, progress: Optional[Callable] = None) -> list[JobOutcome]:
    """Train the jobs as one stacked model and record each.

    Jobs another runner holds or has finished are left out (their outcomes say so); if the stacked training
    itself fails (say, out of memory), the jobs are run one by one instead.

    Parameters
    ----------
    jobs : list of Job
        The group.
    settings : RunSettings
        What every job of the run shares.
    progress : callable, optional
        Per-epoch progress callback.

    Returns
    -------
    list of JobOutcome
        One outcome per job.
    """
    from methods.stacking import fit_stacked  # loads torch: this module imports without it (the command line's)

    outcomes: list[JobOutcome] = []
    claimed = []
    try:
        for job in jobs:
            lock, outcome = claim(job, settings, blocking=False)
            if lock is None:
                outcomes.append(outcome)
            else:
                claimed.append((job, lock))
        if not claimed:
            return outcomes
        limit_threads(settings.threads_per_job)
        started = time.perf_counter()
        prepared = []  # (job, record, task, detector, epoch_aurocs)
        for job, _ in claimed:
            record = new_record(job, settings)
            try:
                task, detector = prepare(job, settings, record, progress)
            except (KeyboardInterrupt, ResultsWriteError):
                raise
            except BaseException as exc:  # noqa: BLE001 - recorded like a solo job's failure
                record_error(record, exc)
                outcomes.append(write_result(job, settings, record, None, None, time.perf_counter() - started))
                continue
            prepared.append((job, record, task, detector, []))
        if len(prepared) == 1:  # nothing left to stack with
            job, *_ = prepared[0]
            _release(claimed, [job])
            return outcomes + [run_job(job, settings, progress=progress)]
        callbacks = [auroc_tracker(task, aurocs) if settings.track_auroc else None
                     for _, _, task, _, aurocs in prepared]
        t0 = time.perf_counter()
        try:
            errors = fit_stacked([p[3] for p in prepared], [p[2].x_train for p in prepared], callbacks)
        except (KeyboardInterrupt, ResultsWriteError):
            raise
        except Exception:  # noqa: BLE001 - e.g. out of memory: the jobs run alone instead
            solo = [p[0] for p in prepared]
            _release(claimed, solo)
            return outcomes + [run_job(job, settings, progress=progress) for job in solo]
        group_seconds = time.perf_counter() - t0
        labels_of_group = [p[0].key.label() for p in prepared]
        for (job, record, task, detector, aurocs), error in zip(prepared, errors):
            record["train_seconds"] = group_seconds
            record["stack"] = {"jobs": labels_of_group, "size": len(prepared), "group_train_seconds": group_seconds,
                               "note": "trained together as one batched model; train_seconds is the group's"}
            scores = labels = extra = None
            try:
                if error is not None:
                    raise error
                scores, labels, extra = score_into(record, detector, task, settings, aurocs)
            except (KeyboardInterrupt, ResultsWriteError):
                raise
            except BaseException as exc:  # noqa: BLE001
                record_error(record, exc)
                scores = labels = extra = None
                if isinstance(exc, DivergedError):
                    record.setdefault("run_info", detector.run_info() if hasattr(detector, "device_") else {})
            outcomes.append(write_result(job, settings, record, scores, labels, time.perf_counter() - started, extra))
        return outcomes
    finally:
        for _, lock in claimed:
            lock.release()


def _release(claimed: list, jobs: list[Job]) -> None:
    """Let go of the locks of `jobs` (so run_job can take them again)."""
    keys = {job.key for job in jobs}
    for job, lock in claimed:
        if job.key in keys:
            lock.release()
    claimed[:] = [(job, lock) for job, lock in claimed if job.key not in keys]
