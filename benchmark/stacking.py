"""Which jobs train together (`run_all.py --stack K`): pending jobs that share method, dataset,
profile, protocol and hyperparameters (they differ in class and/or seed) form groups of up to K,
each trained as one batched model (methods/engine/) in one process; each job still writes its
own record and scores, and its record's `stack` field names the jobs that trained together and how
long the group's training took.

This module only decides: the run's stack size (`stack_size`) and the groups (`group_jobs`). Every
group, of one job or more, then runs through `benchmark.jobs.run_jobs`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from benchmark.jobs import Job, build_detector
from methods.base import TrainOptions, resolve_device, supports_stacking


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


def stack_size(requested: Optional[int], device: str, options: TrainOptions) -> tuple[int, str]:
    """The run's stack size: `requested` (None: `auto_stack`).

    Every precision stacks: the engine casts the stacked weights as autocast does (methods/engine/), so
    `--precision bf16 --stack K` trains K jobs as one batched bf16 model (tests/test_engine.py checks it
    against solo bf16 fits).

    Parameters
    ----------
    requested : int or None
        --stack K, or None for --stack auto.
    device : str
        The run's --device.
    options : methods.base.TrainOptions
        The run's training options.

    Returns
    -------
    stack : int
        The largest group size.
    note : str
        Why the stack is 1 although more was asked for or allowed, else "".
    """
    stack = requested if requested is not None else auto_stack(device)
    return stack, ""


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
