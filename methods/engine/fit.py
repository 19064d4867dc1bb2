"""`fit_jobs`: the public entry point of the engine. K >= 1 detectors of one class and one set of
hyperparameters (random_state apart) trained from their class's one description of its training
(`TorchDetector._stage_plans`): K = 1 as a plain solo loop, K > 1 stacked (methods/engine/loop.py).

Per job stay separate at K > 1: data and shuffling (its own generator, its own training set),
initialisation (its own `_begin_fit` seeds the global RNG with its seed before its networks are
built), BatchNorm statistics (stacked buffers, masked), optimiser state (stacked, per-job step
counts), gradient clipping, random draws (its own generator or global-RNG stream, `JobRNG`, made
outside vmap in its solo order), divergence (a diverged job stops, the others go on).

What is not bit-identical to a solo fit at K > 1: the batched kernels sum in another order (float
reassociation), and the stacked Adam evaluates its formula with per-job tensors where torch's
Adam uses Python scalars; both are rounding-level differences, which an unstable GAN can grow over
many steps (as it grows any rounding difference, e.g. another thread count).

bf16 with K > 1 (or CUDA graphs): autocast does not reach inside vmap the way it does a solo step.
Measured on torch 2.14 (CPU): with autocast around (or inside) the vmapped loss, the batched
convolutions run without it, so convolutions get fp32 weights with bf16 inputs, or bf16 weights with
fp32 inputs, and fail (MemAE, Deep SVDD, Mem_GANomaly, f-AnoGAN); GANomaly "worked" only because none
of its convolutions ran in bf16; vmap's batch norm refuses a bf16 input with fp32 statistics; and
torch.func.grad through a LayerNorm with mixed dtypes fails (f-AnoGAN's gradient penalty). So the
stacked modules do by hand what autocast does in a solo step (methods/engine/modules.py): the
weights and biases of every convolution and linear layer cast to bf16 (a differentiable cast of the
stacked fp32 parameters), their inputs cast to bf16, batch norm computed on fp32 inputs and handing
on bf16 (as the mixed-dtype batch norm of a solo step outputs), layer / group norm on fp32 inputs
(autocast's fp32 ops); autocast stays on, entered inside the vmapped function, for the other ops
(matmuls). A stacked bf16 job then scores as its solo bf16 fit within the stacked tolerance
(tests/test_engine.py).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from methods.base import DivergedError, EpochCallback, TrainOptions, resolve_device, supports_stacking
from methods.engine.jobs import JobRNG, check_stackable
from methods.engine.loop import run_stage
from methods.engine.plan import Job, Stage


def fit_jobs(detectors: Sequence[Any], Xs: Sequence[np.ndarray],
             callbacks: Optional[Sequence[Optional[EpochCallback]]] = None,
             options: TrainOptions = TrainOptions()) -> list[Optional[DivergedError]]:
    """Train K detectors of one class together; each ends up fitted as after its own fit (unless it
    diverged). K = 1 runs a solo fit's exact operations.

    Parameters
    ----------
    detectors : sequence of TorchDetector
        K unfitted detectors of one class with the same hyperparameters but random_state.
    Xs : sequence of np.ndarray
        Their training images, (N_k, C, H, W) floats in [0, 1] of one shape.
    callbacks : sequence of EpochCallback or None, optional
        Per-job epoch callbacks (as fit's epoch_callback).
    options : TrainOptions
        Precision, memory format and CUDA graphs; each fitted detector keeps them as `train_options_`.

    Returns
    -------
    list of Optional[DivergedError]
        Per job, None or its DivergedError.

    Raises
    ------
    ValueError
        If the counts differ, there is no detector, the detectors are not stackable, their class
        cannot train stacked (K > 1), the images differ in shape, or CUDA graphs are asked for off a GPU.
    """
    detectors = list(detectors)
    if len(detectors) != len(Xs) or not detectors:
        raise ValueError("fit_jobs needs one training set per detector, and at least one detector")
    check_stackable(detectors)
    first = detectors[0]
    stacked = len(detectors) > 1 or options.cuda_graphs
    if options.cuda_graphs and resolve_device(first.device).type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, but {type(first).__name__} trains on "
                         f"{resolve_device(first.device)}; leave it off (--cuda-graphs) on this machine")
    if stacked and not supports_stacking(first):
        raise ValueError(f"{type(first).__name__} cannot be trained stacked (nor with CUDA graphs)")
    callbacks = list(callbacks) if callbacks is not None else [None] * len(detectors)
    jobs: list[Job] = []
    rng: Optional[JobRNG] = None
    for k, (det, X) in enumerate(zip(detectors, Xs)):
        det.train_options_asked_ = options
        det.train_options_ = det.resolve_train_options(options)  # "auto" precision, "default" layout
        x = det._begin_fit(X)  # seeds the global RNG with the job's seed, as its solo fit
        job = Job(k, det, x, callbacks[k])
        jobs.append(job)
        if not supports_stacking(det):  # a detector with a training loop of its own (one job)
            continue
        det._build_networks(x)
        if stacked:
            rng = rng or JobRNG(det.device_)
            rng.save()  # the job's global RNG from here on (GANomaly's D re-inits, DAGMM's dropout)
            job.rng = lambda fn, k=k: rng.run(k, fn)
    if len({tuple(job.x.shape[1:]) for job in jobs}) != 1:
        raise ValueError("stacked jobs need training images of one shape")
    try:
        if supports_stacking(first):
            _train(jobs, first.train_options_, stacked)  # one class, one device: one resolution
        else:
            first._fit(jobs[0].x, jobs[0].callback)
    except DivergedError as exc:
        jobs[0].error = exc
    except BaseException:
        for job in jobs:
            job.detector.__dict__.pop("_facts_sample_", None)  # the training images are not kept
        raise
    for job in jobs:
        if job.error is None:
            job.detector._finish_fit()  # per-epoch facts into the log, eval mode
        else:
            job.detector.__dict__.pop("_facts_sample_", None)
    return [job.error for job in jobs]


def _train(jobs: list[Job], options: TrainOptions, stacked: bool) -> None:
    """Every stage of the class's plan, in order, for the jobs still alive."""
    first = jobs[0].detector
    for plan in first._stage_plans(min(len(job.x) for job in jobs)):
        alive = []
        for job in (job for job in jobs if job.error is None):
            try:
                if plan.begin is not None:
                    plan.begin(job)
            except DivergedError as exc:
                job.error = exc
                continue
            job.detector._begin_stage()
            alive.append(job)
        # Jobs that number the stage's epochs on from different epochs train in separate groups.
        starts = {job.k: job.last_epoch + 1 if plan.continue_epochs else plan.stage.first_epoch for job in alive}
        for start in sorted(set(starts.values())):
            group = [job for job in alive if starts[job.k] == start]
            stage = Stage(**{**vars(plan.stage), "first_epoch": start})
            run_stage(plan, stage, group, options, stacked)
