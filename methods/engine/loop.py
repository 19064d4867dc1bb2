"""The engine's loop: one `StagePlan` trained for one job or K jobs in lockstep.

K = 1 (and no CUDA graphs): the job's own modules are called directly and updated by torch.optim
optimisers, every step under the job's autocast: the operations of a plain PyTorch training loop,
so a solo fit's scores are bit-identical to those of a hand-written loop. K > 1: the modules are
stacked and every phase's loss is vmapped (methods/engine/modules.py), updated by the stacked
optimisers with per-job masks (methods/engine/optimisers.py); jobs with fewer steps in an epoch
sit its last steps out (parameters, optimiser state and BatchNorm buffers unchanged). Both run
the same loop: per epoch the jobs' shuffled minibatches (`LockstepBatches`, a solo fit's draws,
of images or, with `Stage.copies` > 1, of (image, copy) pairs: `minibatch`),
per step each phase that is due (`Phase.every`) with its draws (`Phase.draws`, per job outside
vmap), the logged values summed on the device and watched per job (`JobMonitor`, one host sync
per epoch), `after_step`; per epoch and job the means, `end_epoch`, the progress callback and
the detector's `_end_epoch` (its epoch callback).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from methods.base import DivergedError, TrainOptions
from methods.engine.graphs import GraphedStep
from methods.engine.jobs import JobMonitor, LockstepBatches, job_draws, minibatch
from methods.engine.modules import SoloModules, StackedModules
from methods.engine.optimisers import clip_grad_norm_per_job
from methods.engine.plan import Job, Phase, Stage, StagePlan, StageResult, StepEvent, default_epoch_means


def autocast(options: TrainOptions, device: torch.device) -> Any:
    """The training step's precision context: autocast to bfloat16, or nothing.

    A captured CUDA graph must not depend on autocast's cache of cast weights (torch.cuda.graphs
    docs), so the cache is off with `cuda_graphs`.

    Parameters
    ----------
    options : TrainOptions
        The fit's options.
    device : torch.device
        The training device.

    Returns
    -------
    context manager
    """
    if options.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not options.cuda_graphs)


class _PhaseRunner:
    """One phase's forward, backward, clipping and optimiser steps, as one function of device
    tensors (captured in a CUDA graph with `cuda_graphs`)."""

    def __init__(self, phase: Phase, modules: Any, stacked: bool, options: TrainOptions,
                 device: torch.device, graph_key: str, detectors: list[Any]) -> None:
        self.phase, self.modules, self.stacked = phase, modules, stacked
        self.options, self.device = options, device
        self.optimisers = [group.optimiser.build([p for name in group.modules for p in modules.group_params(name)],
                                                 stacked) for group in phase.groups]
        self.names: Optional[list[str]] = list(phase.names) or None
        self.weight_dtype = torch.bfloat16 if stacked and options.precision == "bf16" else None
        self.fn: Callable[..., Any] = self._step
        if options.cuda_graphs:
            graphed = GraphedStep(self._step, device)
            for det in detectors:
                det.graph_stats_ = {**getattr(det, "graph_stats_", {}), graph_key: graphed.stats}
            self.fn = graphed

    def _step(self, x: torch.Tensor, mask_t: torch.Tensor, *inputs: torch.Tensor) -> tuple[list, torch.Tensor]:
        """One update; `inputs` are the loss's further inputs (copy indices with `Stage.copies` > 1,
        then the phase's draws)."""
        phase, optimisers = self.phase, self.optimisers
        with autocast(self.options, self.device):
            if self.stacked:
                view = self.modules.view
                losses, logged, extras = self.modules.call(lambda xk, *dk: phase.loss(view, xk, *dk), x, *inputs,
                                                           context=lambda: autocast(self.options, self.device),
                                                           weight_dtype=self.weight_dtype)
            else:
                losses, logged, extras = phase.loss(self.modules.view, x, *inputs)
            for optimiser in optimisers:
                optimiser.zero_grad()
            for i, (loss, optimiser) in enumerate(zip(losses, optimisers)):
                # Each loss's gradient into its own group only; the losses may share a forward pass.
                (loss.sum() if self.stacked else loss).backward(inputs=optimiser.params,
                                                                retain_graph=i < len(optimisers) - 1)
            for group, optimiser in zip(phase.groups, optimisers):
                if group.clip_grad_norm is not None:
                    if self.stacked:
                        clip_grad_norm_per_job(optimiser.params, group.clip_grad_norm)
                    else:
                        torch.nn.utils.clip_grad_norm_(optimiser.params, group.clip_grad_norm)
            for optimiser in optimisers:
                optimiser.step(mask_t)
        if self.names is None:
            self.names = list(logged)
        values = torch.stack([v.detach() for v in logged.values()], dim=-1)
        outputs = [t.detach() for t in (*losses, *extras)]
        if not self.stacked:  # a leading job axis of 1 (views), as K > 1 has
            return [t.unsqueeze(0) for t in outputs], values.unsqueeze(0)
        return outputs, values

    def set_lr_factor(self, factor: float) -> None:
        for group, optimiser in zip(self.phase.groups, self.optimisers):
            optimiser.lr = group.optimiser.lr * factor


def run_stage(plan: StagePlan, stage: Stage, jobs: list[Job], options: TrainOptions, stacked: bool) -> None:
    """Train one stage for the jobs (all starting it at `stage.first_epoch`); sets each job's
    `last_epoch`, and its `error` when it diverges (it then stops, the others go on).

    Parameters
    ----------
    plan : StagePlan
        The stage's description.
    stage : Stage
        Its budget, numbered for these jobs.
    jobs : list of Job
        The jobs (networks built, `plan.begin` run).
    options : TrainOptions
        The fit's options.
    stacked : bool
        Train stacked (vmap, stacked optimisers): K > 1 or CUDA graphs.
    """
    dets = [job.detector for job in jobs]
    k_jobs, device, xs = len(jobs), dets[0].device_, [job.x for job in jobs]
    modules = StackedModules(dets, plan.modules) if stacked else SoloModules(dets[0], plan.modules)
    runners = [_PhaseRunner(phase, modules, stacked, options, device,
                            stage.name + (f"_{phase.label}" if phase.label else ""), dets) for phase in plan.phases]
    results = [StageResult() for _ in jobs]
    alive = np.ones(k_jobs, dtype=bool)
    steps = np.zeros(k_jobs, dtype=np.int64)  # on the host, for the loop's decisions ...
    steps_t = torch.zeros(k_jobs, dtype=torch.long, device=device)  # ... and on the device, for the monitor
    monitor = JobMonitor(k_jobs, device)
    cap = stage.max_steps if stage.max_steps is not None else np.iinfo(np.int64).max
    clocks = [det.step_clock for det in dets if det.step_clock is not None]
    started = time.perf_counter()
    epoch, epochs_run = stage.first_epoch - 1, 0
    while (stage.epochs is None or epochs_run < stage.epochs) and alive.any():
        epoch, epochs_run = epoch + 1, epochs_run + 1
        if plan.lr_factor is not None:
            for runner in runners:
                runner.set_lr_factor(plan.lr_factor(epoch))
        batches = LockstepBatches([stage.samples(len(x)) for x in xs], stage.batch_size, stage.drop_last,
                                  [det.generator_ for det in dets], device)
        in_epoch = alive.copy()
        sums: Optional[torch.Tensor] = None
        phase_runs = np.zeros((max(len(runners), 1), k_jobs), dtype=np.int64)
        s = 0
        while True:
            idx, real = batches.indices(s)
            active = in_epoch & real & (steps < cap)
            if not active.any():
                break
            active_t = torch.from_numpy(active).to(device)
            step_started = dets[0]._clock_now() if clocks else 0.0
            number = steps + active  # each job's 1-based step number in the stage
            if plan.step is not None:  # a detector's own step function (one job)
                with autocast(options, device):
                    values = plan.step(idx[0], int(number[0])).detach().unsqueeze(0)
                outputs: list[torch.Tensor] = []
                phase_runs[0] += active
            else:
                if stacked:
                    inputs = [torch.stack(part) for part in
                              zip(*(minibatch(xs[k], idx[k], stage.copies) for k in range(k_jobs)))]
                else:
                    inputs = list(minibatch(xs[0], idx[0], stage.copies))
                outputs, values = _run_phases(runners, jobs, inputs, active, number, phase_runs, stacked, device)
            if clocks:
                seconds = dets[0]._clock_now() - step_started
                for clock in clocks:
                    clock.append((stage.name, seconds))
            steps += active
            steps_t += active_t
            monitor.update(steps_t, values, active_t)
            sums = torch.where(active_t[:, None], values, torch.zeros_like(values)) if sums is None else \
                torch.where(active_t[:, None], sums + values, sums)
            if plan.after_step is not None:
                plan.after_step(StepEvent(active, active_t, steps, epoch, outputs, jobs, modules))
            s += 1
        names = plan.names if plan.step is not None else [n for r in runners for n in (r.names or [])]
        counts = _value_counts(runners, phase_runs, plan.step is not None, len(names))
        epoch_errors = monitor.errors(epoch)
        for k in np.flatnonzero(in_epoch):
            job, det, result = jobs[k], dets[k], results[k]
            if epoch_errors[k] is not None:
                job.error, alive[k] = epoch_errors[k], False
                continue
            result.epochs, result.steps, result.last_epoch = epochs_run, int(steps[k]), epoch
            job.last_epoch = epoch
            job_counts = torch.from_numpy(np.maximum(counts[:, k], 1)).to(device)
            means = (plan.epoch_means or default_epoch_means)(sums[k], job_counts)
            for name, value in zip(names, means):
                result.history.setdefault(name, []).append(value)
            modules.unstack_into(k)
            try:
                if plan.end_epoch is not None:
                    plan.end_epoch(job, result)
            except DivergedError as exc:
                job.error, alive[k] = exc, False
                continue
            if det.progress_callback is not None:  # the runner's progress display; never changes training
                det.progress_callback(stage.name, epochs_run, stage.planned_epochs(len(xs[k])))
            det._end_epoch(epoch, job.callback if stage.epoch_callback else None)
            if steps[k] >= cap:
                alive[k] = False
    seconds = time.perf_counter() - started
    for job, result in zip(jobs, results):
        job.detector.stage_seconds_[stage.name] = result.seconds = seconds
        if job.error is None and plan.end is not None:
            try:
                plan.end(job, result)
            except DivergedError as exc:
                job.error = exc


def _run_phases(runners: list[_PhaseRunner], jobs: list[Job], inputs: list[torch.Tensor], active: np.ndarray,
                number: np.ndarray, phase_runs: np.ndarray, stacked: bool,
                device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One step on the minibatch `inputs` (`minibatch`'s tensors; (K, ...) when stacked): each phase
    due for some active job, its draws made per job, its update masked to those jobs (their
    BatchNorm buffers alone move). Returns the first phase's outputs and the step's logged values
    (K, V), 0 for a phase a job did not run."""
    parts, first_outputs = [], []
    x = inputs[0]
    rows = x.shape[1] if stacked else x.shape[0]
    for p, runner in enumerate(runners):
        phase = runner.phase
        mask = active & (number % phase.every == 0)
        if not mask.any():
            parts.append(None)
            continue
        draws: Any = ()
        if phase.draws is not None:
            if stacked:
                draws = job_draws(mask, lambda k: jobs[k].with_own_rng(lambda: phase.draws(jobs[k].detector, rows)))
            else:
                draws = phase.draws(jobs[0].detector, rows)
        mask_t = torch.from_numpy(mask).to(device)
        snapshot = runner.modules.buffers_snapshot() if stacked and not mask.all() else None
        outputs, values = runner.fn(x, mask_t, *inputs[1:], *draws)
        if snapshot is not None:
            runner.modules.restore_buffers(snapshot, mask_t)
            values = torch.where(mask_t[:, None], values, torch.zeros_like(values))
        phase_runs[p] += mask
        parts.append(values)
        if p == 0:
            first_outputs = outputs
    like = next(v for v in parts if v is not None)
    filled = [v if v is not None else like.new_zeros((like.shape[0], len(r.phase.names)))
              for v, r in zip(parts, runners)]
    return first_outputs, filled[0] if len(filled) == 1 else torch.cat(filled, dim=1)


def _value_counts(runners: list[_PhaseRunner], phase_runs: np.ndarray, custom: bool, n_values: int) -> np.ndarray:
    """(V, K): per logged value and job, the steps of the epoch that ran the value's phase."""
    if custom:
        return np.repeat(phase_runs[:1], n_values, axis=0)
    return np.concatenate([np.repeat(phase_runs[p:p + 1], len(r.names or ()), axis=0)
                           for p, r in enumerate(runners)])

