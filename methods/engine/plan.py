"""How a deep detector describes its training, once, for every K: stages (`StagePlan`), each a
budget (`Stage`), the modules it uses, its steps' phases (`Phase`: a loss function and the parameter
groups it trains, `ParamGroup` with an `OptimiserSpec`) and its hooks. The engine
(methods/engine/loop.py) runs the description for one job or K jobs in lockstep."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from methods.engine.optimisers import OptimiserSpec


@dataclass(frozen=True)
class Stage:
    """The budget of one training stage.

    Shuffled minibatches of `batch_size` for `epochs` epochs (None: until `max_steps`), at most
    `max_steps` optimiser steps in all (None: no cap). A stage's samples are its training images,
    or with `copies` > 1 (image, copy) pairs: sample s is copy s % copies of image s // copies (GEOM:
    an image and one of its 72 transformations), and an epoch is one pass over the n * copies pairs.

    Attributes
    ----------
    name : str
        The stage's name ("train", or e.g. "pretrain" / "svdd", "gan" / "encoder").
    batch_size : int
        Minibatch size.
    epochs : int or None
        Number of epochs (None: until `max_steps`).
    max_steps : int or None
        Cap on the optimiser steps of the whole stage (None: no cap).
    drop_last : bool
        Drop the last incomplete batch of every epoch.
    epoch_callback : bool
        Run the fit's epoch callback after this stage's epochs (a diagnostic; off for stages whose
        model cannot score yet).
    max_steps_param, epochs_param : str or None
        The constructor arguments that set this stage's step cap and its epochs (None: none), so
        calibration and speed runs set budgets without guessing.
    first_epoch : int
        Number of the stage's first epoch (stages may number epochs continuously).
    period : int
        The steps' cost repeats with this period (f-AnoGAN: a generator update every n_critic
        critic steps), so timing runs cover whole periods.
    copies : int
        Samples per training image (1: the images themselves). With more, minibatches are drawn
        from the n * copies (image, copy) pairs, steps and epochs counted on them, and each phase's
        loss receives the pairs' images and their copy indices (`LossFn`). Every method here
        still takes the number of images n.
    """

    name: str
    batch_size: int
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    drop_last: bool = True
    epoch_callback: bool = True
    max_steps_param: str = "max_steps"
    epochs_param: Optional[str] = "epochs"
    first_epoch: int = 1
    period: int = 1
    copies: int = 1

    def samples(self, n: int) -> int:
        """The stage's samples on n training images: n * copies.

        Parameters
        ----------
        n : int
            Number of training images.

        Returns
        -------
        int
        """
        return n * self.copies

    def steps_per_epoch(self, n: int) -> int:
        """Optimiser steps in one full epoch over the samples of n images (as `iterate_minibatches`
        draws them from n * copies samples).

        Parameters
        ----------
        n : int
            Number of training images.

        Returns
        -------
        int
        """
        samples = self.samples(n)
        if self.drop_last and samples >= self.batch_size:
            return samples // self.batch_size
        return math.ceil(samples / self.batch_size)

    def planned_steps(self, n: int) -> int:
        """Optimiser steps this stage runs on n training images.

        Parameters
        ----------
        n : int
            Number of training images.

        Returns
        -------
        int

        Raises
        ------
        ValueError
            If the stage has neither epochs nor max_steps.
        """
        per_epoch = self.steps_per_epoch(n)
        total = per_epoch * self.epochs if self.epochs is not None else None
        if self.max_steps is not None:
            total = self.max_steps if total is None else min(total, self.max_steps)
        if total is None:
            raise ValueError(f"stage {self.name!r} has neither epochs nor max_steps")
        return total

    def planned_epochs(self, n: int) -> int:
        """Epochs (the last possibly partial) this stage runs on n training images.

        Parameters
        ----------
        n : int
            Number of training images.

        Returns
        -------
        int
        """
        return math.ceil(self.planned_steps(n) / self.steps_per_epoch(n))


@dataclass
class StageResult:
    """What one stage ran for one job.

    Attributes
    ----------
    history : dict of str to list of float
        Per-epoch means of the logged values, by name.
    epochs : int
        Epochs run.
    steps : int
        Optimiser steps run.
    last_epoch : int
        Number of the last epoch run.
    seconds : float
        Wall-clock time of the stage.
    """
    history: dict[str, list[float]] = field(default_factory=dict)
    epochs: int = 0
    steps: int = 0
    last_epoch: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ParamGroup:
    """The parameters one loss trains, and their optimiser.

    Attributes
    ----------
    modules : tuple of str
        The detector attributes (modules of the stage) whose parameters the group holds, in order.
    optimiser : OptimiserSpec
        The group's optimiser.
    clip_grad_norm : float or None
        Clip the group's total gradient norm (per job) to this before the step (None: no clipping).
    """

    modules: tuple[str, ...]
    optimiser: OptimiserSpec
    clip_grad_norm: Optional[float] = None


# loss(view, x, *draws) -> (losses, logged, extras): `view` is the detector (K = 1) or a copy of it
# whose module attributes are the vmapped templates (K > 1); x one job's minibatch; draws that job's
# random draws (`Phase.draws`). In a stage with `Stage.copies` > 1 it is loss(view, x, copy, *draws):
# x the images of the minibatch's (image, copy) pairs, copy their copy indices (long, one per row).
# losses: one scalar per parameter group; logged: name -> scalar, the values the epoch means and the
# divergence check see; extras: further tensors for `after_step`.
LossFn = Callable[..., tuple[list[torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]]


@dataclass(frozen=True)
class Phase:
    """One forward / backward / update of a training step (most steps have one; f-AnoGAN's has a
    critic phase and, every n_critic steps, a generator phase).

    Attributes
    ----------
    loss : LossFn
        The phase's loss (see `LossFn`): a function of the modules' parameters and buffers, the
        batch and the draws, so it runs alone or vmapped over jobs unchanged.
    groups : tuple of ParamGroup
        One per loss, in the order of the losses: each loss's gradient goes to its group only
        (`backward(inputs=...)`; the losses may share a forward pass).
    draws : callable or None
        draws(detector, batch rows) -> tuple of tensors, the job's random draws for this phase,
        made outside vmap from the job's own generator or global-RNG stream, in its solo order.
    every : int
        The phase runs on the job's steps whose 1-based number is a multiple of `every`.
    names : tuple of str
        The names of the logged values (needed when `every` > 1: a step without the phase logs 0).
    label : str
        Suffix of the phase's CUDA-graph statistics key ("" for the first phase).
    """

    loss: LossFn
    groups: tuple[ParamGroup, ...]
    draws: Optional[Callable[[Any, int], tuple]] = None
    every: int = 1
    names: tuple[str, ...] = ()
    label: str = ""


@dataclass
class StepEvent:
    """What `StagePlan.after_step` sees after each step, for all K jobs at once.

    Attributes
    ----------
    active : np.ndarray
        (K,) bool, the jobs that stepped.
    active_t : torch.Tensor
        The same mask on the device.
    steps : np.ndarray
        (K,) each job's step count in the stage, this step included.
    epoch : int
        The epoch.
    outputs : list of torch.Tensor
        The first phase's losses then its extras, detached, each (K, ...).
    jobs : list of Job
        The jobs.
    modules : SoloModules or StackedModules
        The stage's modules (`buffer(module, key)` gives a (K, ...) buffer to update in place).
    """

    active: np.ndarray
    active_t: torch.Tensor
    steps: np.ndarray
    epoch: int
    outputs: list[torch.Tensor]
    jobs: list["Job"]
    modules: Any


@dataclass
class StagePlan:
    """One training stage, described once for every K.

    Attributes
    ----------
    stage : Stage
        The budget.
    modules : tuple of str
        The detector attributes holding every module the stage's losses use (trained or frozen).
    phases : tuple of Phase
        The step's phases, in order.
    begin : callable or None
        begin(job), per job before the stage (logs started, networks copied, frozen parameters);
        a DivergedError it raises ends that job.
    lr_factor : callable or None
        lr_factor(epoch) -> the factor on every group's lr for that epoch (an lr schedule).
    after_step : callable or None
        after_step(StepEvent), after each step (GANomaly's D re-initialisation, Deep SVDD's radius).
    end_epoch : callable or None
        end_epoch(job, StageResult so far), per job after each epoch, before its callback (logs).
    epoch_means : callable or None
        epoch_means(sums (V,), counts (V,)) -> the epoch's means (default sums / counts, each
        value's count the steps its phase ran, at least 1).
    end : callable or None
        end(job, StageResult), per job after the stage; a DivergedError it raises ends that job.
    continue_epochs : bool
        Number the stage's epochs on from the job's previous stage (f-AnoGAN's stage 2).
    step : callable or None
        A detector's own step function (step(indices, step number) -> logged values), instead of
        `phases`: such a stage trains one job only, as `TorchDetector._train_stage` runs it.
    names : tuple of str
        The logged values' names for a custom `step`.
    """

    stage: Stage
    modules: tuple[str, ...] = ()
    phases: tuple[Phase, ...] = ()
    begin: Optional[Callable[["Job"], None]] = None
    lr_factor: Optional[Callable[[int], float]] = None
    after_step: Optional[Callable[[StepEvent], None]] = None
    end_epoch: Optional[Callable[["Job", StageResult], None]] = None
    epoch_means: Optional[Callable[[torch.Tensor, torch.Tensor], list[float]]] = None
    end: Optional[Callable[["Job", StageResult], None]] = None
    continue_epochs: bool = False
    step: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None
    names: tuple[str, ...] = ()


@dataclass
class Job:
    """One job of a fit: its detector, preprocessed training set, epoch callback and state.

    Attributes
    ----------
    k : int
        The job's index among the fit's jobs.
    detector : TorchDetector
        Its detector.
    x : torch.Tensor
        Its preprocessed training set, on the device.
    callback : EpochCallback or None
        Its epoch callback.
    last_epoch : int
        The last epoch it ran (over all stages so far).
    error : DivergedError or None
        Set when the job diverged (it trains no further).
    rng : callable
        rng(fn) runs fn() with the global RNG in the job's own stream (set by the engine).
    """

    k: int
    detector: Any
    x: torch.Tensor
    callback: Any = None
    last_epoch: int = 0
    error: Any = None
    rng: Callable[[Callable[[], Any]], Any] = field(default=lambda fn: fn())

    def with_own_rng(self, fn: Callable[[], Any]) -> Any:
        """fn() with the global RNG in this job's stream (GANomaly's D re-initialisation draws there)."""
        return self.rng(fn)


def default_epoch_means(sums: torch.Tensor, counts: torch.Tensor) -> list[float]:
    """Each logged value's epoch mean: its sum over the steps its phase ran, over that count.

    Parameters
    ----------
    sums : torch.Tensor
        (V,) the values summed over the epoch's steps.
    counts : torch.Tensor
        (V,) how many steps ran each value's phase (at least 1).

    Returns
    -------
    list of float
    """
    return (sums / counts.to(sums.dtype)).tolist()
