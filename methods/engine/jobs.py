"""Per-job randomness and data of K jobs trained in lockstep: each job's global-RNG stream
(`JobRNG`), its random draws made outside vmap (`job_draws`), its shuffled minibatches
(`LockstepBatches`, drawn as a solo fit draws them, and `minibatch`, what a phase's loss gets of
them), its divergence monitor (`JobMonitor`), and
the check that K detectors can train together (`check_stackable`)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from methods.base import DivergedError


def job_draws(active: np.ndarray, draw: Callable[[int], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-job random inputs for a vmapped step, drawn outside vmap (which runs with randomness="error").

    Parameters
    ----------
    active : np.ndarray
        (K,) bool; `draw(k)` is called for the active jobs only, in job order (each draws from its
        own generator or RNG stream, as its solo step would), the others get zeros.
    draw : callable
        draw(k) -> job k's tensors, the same shapes for every job.

    Returns
    -------
    list of torch.Tensor
        Each draw stacked over the jobs, (K, ...).
    """
    drawn = {k: list(draw(k)) for k in np.flatnonzero(active)}
    like = next(iter(drawn.values()))
    return [torch.stack([drawn[k][i] if k in drawn else torch.zeros_like(like[i]) for k in range(len(active))])
            for i in range(len(like))]


class JobRNG:
    """Job k's global RNG streams (CPU, and the device's when it is a GPU) kept apart.

    For the random draws a solo fit makes from the global RNG after building its networks.

    Parameters
    ----------
    device : torch.device
        The training device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.states: list[tuple] = []

    def save(self) -> None:
        """Append the current global RNG state as the next job's state."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.states.append((torch.get_rng_state(), cuda))

    def run(self, k: int, fn: Callable[[], Any]) -> Any:
        """fn() with the global RNG in job k's state; job k's state advances, the others' do not.

        Parameters
        ----------
        k : int
            The job.
        fn : callable
            Called without arguments; the outer global RNG state is restored afterwards.

        Returns
        -------
        Any
            What fn returns.
        """
        outer = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        cpu, cuda = self.states[k]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        try:
            result = fn()
            self.states[k] = (torch.get_rng_state(),
                              torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        finally:
            torch.set_rng_state(outer[0])
            if outer[1] is not None:
                torch.cuda.set_rng_state(outer[1], self.device)
        return result


class LockstepBatches:
    """Per-job shuffled minibatch indices for one epoch, served step by step for all jobs at once.

    Drawn as `iterate_minibatches` draws them (one randperm per job from its own generator).

    Parameters
    ----------
    sizes : sequence of int
        Each job's number of training images.
    batch_size : int
        Minibatch size.
    drop_last : bool
        Drop the last incomplete batch of every epoch.
    generators : sequence of torch.Generator
        Each job's shuffling generator.
    device : torch.device
        Where the indices go.

    Raises
    ------
    ValueError
        If the last incomplete batch is kept and the sizes differ (unless divisible by the batch size).
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, drop_last: bool, generators: Sequence[torch.Generator],
                 device: torch.device) -> None:
        self.batch_size = batch_size
        self.perms = [torch.randperm(n, generator=g, device=g.device).to(device) for n, g in zip(sizes, generators)]
        self.steps = [(n // batch_size if (drop_last and n >= batch_size) else -(-n // batch_size)) for n in sizes]
        if not drop_last and len(set(sizes)) > 1 and any(n % batch_size for n in sizes):
            # A last, smaller batch would fall on different steps for different jobs.
            raise ValueError("stacked jobs of a detector that keeps the last incomplete batch need training sets "
                             "of one size (or sizes divisible by the batch size)")
        if drop_last and len(set(sizes)) > 1 and any(n < batch_size for n in sizes):
            # A training set smaller than one batch is one smaller batch, of another size than the others'.
            raise ValueError("stacked jobs need training sets of at least one batch each, or of one size")

    def indices(self, step: int) -> tuple[list[torch.Tensor], np.ndarray]:
        """The jobs' minibatch indices at one step.

        Parameters
        ----------
        step : int
            0-based step of the epoch.

        Returns
        -------
        (indices, real) : tuple of (list of torch.Tensor, np.ndarray)
            Per-job indices (a placeholder batch for a job past its epoch end), and per job
            whether it has a real batch at this step.
        """
        out, real = [], np.zeros(len(self.perms), dtype=bool)
        for k, (perm, n_steps) in enumerate(zip(self.perms, self.steps)):
            s = step if step < n_steps else 0  # a job past its epoch end gets a placeholder batch
            real[k] = step < n_steps
            out.append(perm[s * self.batch_size:(s + 1) * self.batch_size])
        return out, real


def minibatch(x: torch.Tensor, indices: torch.Tensor, copies: int = 1) -> tuple[torch.Tensor, ...]:
    """One job's minibatch as a phase's loss receives it, from its sample indices.

    Parameters
    ----------
    x : torch.Tensor
        The job's (preprocessed) training images, (N, ...).
    indices : torch.Tensor
        Sample indices into the stage's N * copies samples (`Stage.copies`): sample s is copy
        s % copies of image s // copies.
    copies : int
        Samples per image.

    Returns
    -------
    tuple of torch.Tensor
        (images,) when copies is 1; else (images, copy indices), one row per sample.
    """
    if copies == 1:
        return (x[indices],)
    return x[indices // copies], indices % copies


class JobMonitor:
    """A DivergenceMonitor per job: the first step with a non-finite logged value, on the device.

    Parameters
    ----------
    k : int
        Number of jobs.
    device : torch.device
        The training device.
    """

    def __init__(self, k: int, device: torch.device) -> None:
        self.first_bad = torch.full((k,), -1, dtype=torch.long, device=device)

    def update(self, steps: torch.Tensor, values: torch.Tensor, active: torch.Tensor) -> None:
        """Record the current step of each active job whose values are non-finite (first time only).

        Parameters
        ----------
        steps : torch.Tensor
            (K,) each job's step count.
        values : torch.Tensor
            (K, V) the logged values.
        active : torch.Tensor
            (K,) bool, the jobs that stepped.
        """
        bad = ~values.detach().isfinite().all(dim=1) & active & (self.first_bad < 0)
        self.first_bad = torch.where(bad, steps, self.first_bad)

    def errors(self, epoch: int) -> list[Optional[DivergedError]]:
        """Per job, None or a DivergedError at `epoch` (syncs once).

        Parameters
        ----------
        epoch : int
            The epoch, reported in the errors.

        Returns
        -------
        list of Optional[DivergedError]
        """
        return [DivergedError(epoch=epoch, step=int(s)) if s >= 0 else None for s in self.first_bad.tolist()]


def check_stackable(detectors: Sequence[Any]) -> None:
    """Check that the detectors share their class and every hyperparameter but random_state.

    Parameters
    ----------
    detectors : sequence of Detector
        The jobs' detectors.

    Raises
    ------
    ValueError
        If the classes or hyperparameters differ.
    """
    first = detectors[0]
    ref = {k: v for k, v in first.get_params().items() if k != "random_state"}
    for det in detectors[1:]:
        if type(det) is not type(first):
            raise ValueError(f"stacked jobs must share a detector class, got {type(first).__name__} "
                             f"and {type(det).__name__}")
        params = {k: v for k, v in det.get_params().items() if k != "random_state"}
        if params != ref:
            raise ValueError("stacked jobs must share every hyperparameter but random_state")


