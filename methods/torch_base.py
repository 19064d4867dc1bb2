"""Shared machinery of the PyTorch detectors: device choice (`resolve_device`, defined in methods/base.py),
seeding, data on the device once, divergence detection without per-step host syncs, and batched scoring
under inference mode."""
from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from methods.base import (
    Detector,
    DivergedError,
    EpochCallback,
    check_images,
    check_positive_int,
    check_random_state,
    iterate_minibatches,
    resolve_device,
    supports_stacking,
)
from methods.stacking import fit_stacked


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU) and numpy's legacy global generator.

    Parameters
    ----------
    seed : int
        The seed (taken modulo 2**32 for numpy).
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def init_dcgan_weights(module: nn.Module) -> None:
    """Apply the DCGAN initialisation (GANomaly's weights_init) to one module, in place.

    Conv weights N(0, 0.02) (bias 0); BatchNorm weight N(1, 0.02), bias 0. Use with `nn.Module.apply`.

    Parameters
    ----------
    module : nn.Module
        The module; other kinds are left unchanged.
    """
    name = module.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif "BatchNorm" in name and getattr(module, "weight", None) is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DivergenceMonitor:
    """Remember, on the device, the first step whose loss was non-finite.

    The step loop never syncs with the host; `check(epoch)` syncs once (end of epoch) and raises
    DivergedError.

    Parameters
    ----------
    device : torch.device
        The training device.
    """

    def __init__(self, device: torch.device) -> None:
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, *losses: torch.Tensor) -> None:
        """Record `step` as the first bad step if any loss is non-finite (no host sync).

        Parameters
        ----------
        step : int
            The step number.
        *losses : torch.Tensor
            Scalar losses of that step.
        """
        finite = torch.stack([loss.detach().float().reshape(()) for loss in losses]).isfinite().all()
        newly_bad = (~finite) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def update_values(self, step: int, values: torch.Tensor) -> None:
        """As `update`, for the 1-D tensor of one step's logged values.

        Parameters
        ----------
        step : int
            The step number.
        values : torch.Tensor
            1-D tensor of the step's logged values.
        """
        newly_bad = (~values.detach().isfinite().all()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def check(self, epoch: int) -> None:
        """Sync once and raise if a non-finite value was seen.

        Parameters
        ----------
        epoch : int
            The epoch, reported in the error.

        Raises
        ------
        DivergedError
            If some step had a non-finite value.
        """
        step = int(self.first_bad_step)
        if step >= 0:
            raise DivergedError(epoch=epoch, step=step)


@dataclass(frozen=True)
class Stage:
    """The budget of one training stage.

    Shuffled minibatches of `batch_size` for `epochs` epochs (None: until `max_steps`), at most
    `max_steps` optimiser steps in all (None: no cap).

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

    def steps_per_epoch(self, n: int) -> int:
        """Optimiser steps in one full epoch over n images (as `iterate_minibatches` draws them).

        Parameters
        ----------
        n : int
            Number of training images.

        Returns
        -------
        int
        """
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

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
    """What `TorchDetector._train_stage` ran.

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


# step(indices of the minibatch on the device, 1-based step number of the stage) -> the 1-D
# tensor of values to log (losses first); it does the forward pass, backward and optimiser update.
StepFn = Callable[[torch.Tensor, int], torch.Tensor]

# TorchDetector.memory_format's values -> the torch layout (None: the detector's own, nothing converted).
MEMORY_FORMATS: dict[str, Optional[torch.memory_format]] = {
    "default": None, "nchw": torch.contiguous_format, "channels_last": torch.channels_last}


class TorchDetector(Detector, abc.ABC):
    """Base class of the PyTorch detectors: the training engine, device handling and batched scoring.

    Subclasses store `random_state`, `device` and `score_batch_size` (constructor arguments)
    and implement `_preprocess`, `_fit`, `_score_batch`, `_networks` and `_stages`; `_fit`
    trains each stage through `_train_stage` with the detector's own step function.

    Attributes
    ----------
    progress_callback : callable or None
        Not a hyperparameter; None by default. Called as (stage name, epochs done, epochs planned)
        after every epoch, for progress displays.
    precision : str
        "fp32" (default) or "bf16": training steps under torch.autocast(bfloat16) (the runner's
        --precision; not a hyperparameter, recorded in run_info). Scoring stays fp32.
    cuda_graphs : bool
        False by default (the runner's --cuda-graphs; not a hyperparameter, recorded in run_info):
        on a CUDA device, train through the stacked engine (a stack of one job when fitted alone)
        with each training step captured in a CUDA graph (methods/graphs.py).
    memory_format : str
        "default" (default: the detector's own layout, nothing converted; GANomaly and Mem_GANomaly
        choose channels_last on the CPU, the others NCHW), "nchw" or "channels_last": the layout of
        the networks' 4-D weights and of the 4-D image batches, trained and scored (a speed lever,
        benchmark/speed.py; not a hyperparameter, recorded in run_info). The stacked engine
        (methods/stacking.py) lays out only the batches this way, not its stacked weights.
    """

    progress_callback: Optional[Callable[[str, int, int], None]] = None
    # Not a hyperparameter; None by default. A list makes `_train_stage` append (stage name, seconds)
    # for every optimiser step, the step call alone (synchronised on a GPU): the estimate's
    # calibration reads it (benchmark/estimate.py). Timing never changes what is computed.
    step_clock: Optional[list] = None
    # "fp32" (default) or "bf16": training steps under torch.autocast(bfloat16) (the runner's
    # --precision; not a hyperparameter, recorded in run_info). Scoring stays fp32.
    precision: str = "fp32"
    cuda_graphs: bool = False
    # "default" (the detector's own layout), "nchw" or "channels_last"; see the class docstring.
    memory_format: str = "default"

    def _autocast(self) -> Any:
        """The training step's precision context (autocast to bfloat16, or nothing)."""
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        # A captured graph must not depend on autocast's cache of cast weights (torch.cuda.graphs docs).
        return torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=self.precision == "bf16",
                              cache_enabled=not self.cuda_graphs)

    def _in_memory_format(self, item: Any) -> Any:
        """The one place `memory_format` acts: a module's 4-D weights, or a 4-D batch, in that layout.

        The networks are converted as each training stage starts (`_train_stage`); the training set
        once it is preprocessed (`_begin_fit`), so every minibatch indexed from it keeps the layout;
        each scoring chunk once it is preprocessed (`decision_function`). "default" returns `item`
        untouched, so the default path is today's, bit for bit.

        Parameters
        ----------
        item : nn.Module or torch.Tensor
            A network (converted in place) or a batch.

        Returns
        -------
        nn.Module or torch.Tensor
            The module, or the batch in the layout (other ranks unchanged).

        Raises
        ------
        ValueError
            If `memory_format` is not one of MEMORY_FORMATS.
        """
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {sorted(MEMORY_FORMATS)}, got {self.memory_format!r}")
        layout = MEMORY_FORMATS[self.memory_format]
        if layout is None:
            return item
        if isinstance(item, nn.Module):
            return item.to(memory_format=layout)  # only 4-D parameters and buffers change
        return item.contiguous(memory_format=layout) if item.dim() == 4 else item

    random_state: int
    device: str
    score_batch_size: int
    # Training images kept (the first ones, preprocessed) for `_epoch_facts`; 0 = none. Detectors
    # that measure something per epoch on a fixed sample (the memory's health) raise it.
    _epoch_facts_sample_size: int = 0

    # ---- to implement -------------------------------------------------------------------
    @abc.abstractmethod
    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images already on the device -> network input (resize, scale, flatten)."""

    @abc.abstractmethod
    def _fit(self, x_train: torch.Tensor, epoch_callback: Optional[EpochCallback]) -> None:
        """Train on the preprocessed training set (already on the device)."""

    @abc.abstractmethod
    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly scores (higher = more anomalous) of one preprocessed batch, shape (B,)."""

    @abc.abstractmethod
    def _networks(self) -> Iterable[nn.Module]:
        """The modules to switch between train and eval mode."""

    def _stages(self, n_train: int) -> list[Stage]:
        """The training stages' budgets on n_train images, in order (no training needed). Every
        detector of this suite trains through `_train_stage` and lists its stages; the default
        (none) is for a detector with a loop of its own, which the estimate then times as a
        whole (`benchmark/estimate.py`)."""
        return []

    # ---- the training engine ----------------------------------------------------------------
    def planned_steps(self, n_train: int) -> dict[str, int]:
        """Optimiser steps per stage that fit() runs on n_train images, computed without training.

        Parameters
        ----------
        n_train : int
            Number of training images.

        Returns
        -------
        dict of str to int
            Planned steps by stage name.
        """
        return {stage.name: stage.planned_steps(n_train) for stage in self._stages(n_train)}

    def _train_stage(self, stage: Stage, n_train: int, step: StepFn, names: Sequence[str],
                     epoch_callback: Optional[EpochCallback],
                     begin_epoch: Optional[Callable[[int], None]] = None,
                     end_epoch: Optional[Callable[[int, StageResult], None]] = None,
                     epoch_means: Optional[Callable[[torch.Tensor, int], list[float]]] = None) -> StageResult:
        """The one training loop of every deep detector.

        Per epoch: `begin_epoch(epoch)`; shuffled minibatch indices drawn on the device from
        `self.generator_`; `step(idx, step_number)` per batch, its logged values summed on the
        device and watched by a DivergenceMonitor (one host sync per epoch); the stage stops at
        `stage.max_steps`. After the epoch: DivergedError if a value was non-finite, the means
        (`epoch_means(sums, steps)`, default sums / steps) appended to the history under `names`,
        `end_epoch(epoch, result)`, then `self._end_epoch` (callback only if the stage has one).

        Parameters
        ----------
        stage : Stage
            The budget.
        n_train : int
            Number of training images (the step indexes them).
        step : StepFn
            Does one optimiser step and returns the 1-D tensor of values to log.
        names : sequence of str
            Names of the logged values, in order.
        epoch_callback : EpochCallback or None
            The fit's callback.
        begin_epoch, end_epoch, epoch_means : callable or None
            Optional hooks (lr schedules, logs, custom means).

        Returns
        -------
        StageResult
            What the stage ran.

        Raises
        ------
        DivergedError
            If a logged value was non-finite in an epoch.
        """
        for net in [value for value in vars(self).values() if isinstance(value, nn.Module)]:
            self._in_memory_format(net)  # every network the detector holds (Deep SVDD's autoencoder too)
        monitor = DivergenceMonitor(self.device_)
        result = StageResult()
        started = time.perf_counter()
        epoch = stage.first_epoch - 1
        while stage.epochs is None or result.epochs < stage.epochs:
            epoch += 1
            if begin_epoch is not None:
                begin_epoch(epoch)
            sums, n_steps = None, 0
            capped = False
            for idx in iterate_minibatches(n_train, stage.batch_size, stage.drop_last, self.generator_, self.device_):
                result.steps += 1
                n_steps += 1
                clock = self.step_clock
                if clock is not None:
                    step_started = self._clock_now()
                with self._autocast():
                    values = step(idx, result.steps).detach()
                if clock is not None:
                    clock.append((stage.name, self._clock_now() - step_started))
                monitor.update_values(result.steps, values)
                sums = values if sums is None else sums + values
                if stage.max_steps is not None and result.steps >= stage.max_steps:
                    capped = True
                    break
            monitor.check(epoch)
            result.epochs += 1
            result.last_epoch = epoch
            means = epoch_means(sums, n_steps) if epoch_means is not None else (sums / n_steps).tolist()
            for name, value in zip(names, means):  # `names` may be filled by the first step
                result.history.setdefault(name, []).append(value)
            if end_epoch is not None:
                end_epoch(epoch, result)
            progress = getattr(self, "progress_callback", None)
            if progress is not None:  # the runner's progress display; never changes training
                progress(stage.name, result.epochs, stage.planned_epochs(n_train))
            self._end_epoch(epoch, epoch_callback if stage.epoch_callback else None)
            if capped:
                break
        result.seconds = time.perf_counter() - started
        self.stage_seconds_[stage.name] = result.seconds
        return result

    def _clock_now(self) -> float:
        """perf_counter() after the device has finished its queued work (a step's time on a GPU)."""
        if self.device_.type == "cuda":
            torch.cuda.synchronize(self.device_)
        return time.perf_counter()

    # ---- shared ---------------------------------------------------------------------------
    def _check_torch_params(self) -> None:
        check_positive_int("score_batch_size", self.score_batch_size)
        check_random_state(self.random_state)
        resolve_device(self.device)
        self._in_memory_format(torch.empty(0))  # rejects an unknown memory_format

    def check_params(self) -> "TorchDetector":
        """Validate the hyperparameters (shared torch ones, then the detector's own).

        Returns
        -------
        TorchDetector
            self.

        Raises
        ------
        ValueError
            If a hyperparameter is invalid or the device is unavailable.
        """
        self._check_torch_params()
        self._check_params()
        return self

    def fit(self, X: np.ndarray, epoch_callback: Optional[EpochCallback] = None) -> "TorchDetector":
        """Train on normal images.

        Parameters
        ----------
        X : np.ndarray
            float32 images (N, C, H, W) in [0, 1].
        epoch_callback : EpochCallback, optional
            Called as (epoch, self) after each epoch (a diagnostic; never changes training).

        Returns
        -------
        TorchDetector
            self, fitted.

        Raises
        ------
        ValueError
            On invalid hyperparameters or images.
        DivergedError
            If training produced a non-finite loss.
        """
        if self._graphed():
            (error,) = fit_stacked([self], [X], [epoch_callback])
            if error is not None:
                raise error
            return self
        x_train = self._begin_fit(X)
        try:
            self._fit(x_train, epoch_callback)
        finally:
            self.__dict__.pop("_facts_sample_", None)
        self._finish_fit()
        return self

    def _graphed(self) -> bool:
        """Whether fit() runs through the CUDA-graph path: `cuda_graphs` on a CUDA device, for a detector
        that trains stacked (the graph path is the stacked engine's).

        Raises
        ------
        ValueError
            If `cuda_graphs` is set and the device is not a GPU, or the detector cannot train stacked.
        """
        if not self.cuda_graphs:
            return False
        device = resolve_device(self.device)
        if device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, but {type(self).__name__} trains on {device}; "
                             "leave it off (--cuda-graphs) on this machine")
        if not supports_stacking(self):
            raise ValueError(f"{type(self).__name__} has no CUDA-graph path (it does not train stacked)")
        return True

    def _begin_fit(self, X: np.ndarray) -> torch.Tensor:
        """What every fit does before training (also each job of a stacked fit): checks, device,
        seeds, the shuffling generator; returns the preprocessed training set on the device."""
        self.check_params()
        X = check_images(X)
        self.device_ = resolve_device(self.device)
        seed_everything(int(self.random_state))
        # Shuffling draws from a generator on the training device, so no index copies per step.
        self.generator_ = torch.Generator(device=self.device_)
        self.generator_.manual_seed(int(self.random_state))
        self.input_shape_ = tuple(X.shape[1:])
        self.training_log_ = {}
        self.stage_seconds_: dict[str, float] = {}
        self.per_epoch_facts_: dict[str, list[float]] = {}
        self.__dict__.pop("graph_stats_", None)
        x_train = self._in_memory_format(self._preprocess(torch.from_numpy(np.ascontiguousarray(X)).to(self.device_)))
        self._facts_sample_ = x_train[:self._epoch_facts_sample_size]  # a view, dropped after training
        return x_train

    def _finish_fit(self) -> None:
        """What every fit does after training: the per-epoch facts into the log, eval mode."""
        self.__dict__.pop("_facts_sample_", None)  # the training images are not kept after fit
        if self.per_epoch_facts_:
            self.training_log_["per_epoch"] = self.per_epoch_facts_
        self._set_mode(train=False)

    def _set_mode(self, train: bool) -> None:
        for net in self._networks():
            net.train(train)

    def _epoch_facts(self) -> dict[str, float]:
        """Measurements of the model at the end of an epoch, appended to
        `training_log_["per_epoch"][name]` (default: none). An implementation must leave training
        unchanged: no_grad, no random draws, no parameter or BatchNorm-statistics change, and the
        networks back in train mode. `self._facts_sample_` holds the first
        `_epoch_facts_sample_size` preprocessed training images."""
        return {}

    def _end_epoch(self, epoch: int, epoch_callback: Optional[EpochCallback]) -> None:
        """Call at the end of each epoch (every training loop does, callback or not): records
        `_epoch_facts()`, then runs the (diagnostic) callback, whose scoring switches the networks
        to eval mode, then puts them back in train mode."""
        for name, value in self._epoch_facts().items():
            self.per_epoch_facts_.setdefault(name, []).append(float(value))
        if self.per_epoch_facts_ and isinstance(self.training_log_, dict):
            self.training_log_["per_epoch"] = self.per_epoch_facts_  # visible to the callback too
        if epoch_callback is not None:
            epoch_callback(epoch, self)
            self._set_mode(train=True)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Anomaly scores of a fitted model (higher = more anomalous), in eval mode and score batches.

        Parameters
        ----------
        X : np.ndarray
            float32 images (N, C, H, W) in [0, 1], of the training images' shape.

        Returns
        -------
        np.ndarray
            (N,) float64 scores.

        Raises
        ------
        ValueError
            If the images are invalid or their shape differs from the training images' (or not fitted).
        """
        X = check_images(X)
        if tuple(X.shape[1:]) != getattr(self, "input_shape_", None):
            raise ValueError(f"images of shape {X.shape[1:]} do not match the training images "
                             f"{getattr(self, 'input_shape_', None)}; call fit first")
        self._set_mode(train=False)  # BatchNorm in inference mode: a score never depends on its batch
        scores = []
        with torch.inference_mode():
            for start in range(0, len(X), self.score_batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(X[start:start + self.score_batch_size]))
                batch = self._in_memory_format(self._preprocess(chunk.to(self.device_)))
                scores.append(self._score_batch(batch).float())
        return torch.cat(scores).cpu().numpy().astype(np.float64)

    def run_info(self) -> dict:
        """Facts about the run's environment for the job record.

        Returns
        -------
        dict
            Device, torch thread count, deterministic-algorithms flag, precision, memory format, a
            determinism note and, on a GPU, its name.
        """
        device = getattr(self, "device_", resolve_device(self.device))
        info = {
            "device": str(device),
            "torch_num_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "precision": self.precision,
            "cuda_graphs": self.cuda_graphs,
            "memory_format": self.memory_format,
            "determinism": ("bit-identical on CPU for the same seed, torch version and thread count"
                            if device.type == "cpu"
                            else "GPU kernels (cuDNN autotuning, atomics) may differ run to run"),
        }
        if device.type == "cuda":
            info["gpu_name"] = torch.cuda.get_device_name(device)
        if getattr(self, "graph_stats_", None):
            info["graph_steps"] = {stage: dict(stats) for stage, stats in self.graph_stats_.items()}
        return info
