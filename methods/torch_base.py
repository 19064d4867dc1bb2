"""Shared machinery of the PyTorch detectors: device choice (`resolve_device`, defined in methods/base.py),
seeding, data on the device once, the sklearn-style `fit` (one job through the training engine,
methods/engine/) and batched scoring under inference mode."""
from __future__ import annotations

import abc
import dataclasses
import time
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from methods.base import (
    Detector,
    EpochCallback,
    TrainOptions,
    check_images,
    check_positive_int,
    check_random_state,
    resolve_device,
)
from methods.engine import Job, Stage, StagePlan, StageResult, fit_jobs
from methods.engine.loop import run_stage

__all__ = ["Stage", "StagePlan", "StageResult", "TorchDetector", "init_dcgan_weights", "seed_everything"]


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


# A resolved TrainOptions.memory_format -> the torch layout ("default" is resolved per detector first).
MEMORY_FORMATS: dict[str, torch.memory_format] = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively, so that bf16 autocast can be faster than fp32: a GPU
    that supports bf16 (Ampere or newer), or a CPU whose oneDNN has bf16 kernels (AVX512-BF16 or AMX).
    On other CPUs bf16 is emulated and slower, and "auto" keeps fp32.

    Parameters
    ----------
    device : torch.device
        The training device.

    Returns
    -------
    bool
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without oneDNN
            return False
    return False


class TorchDetector(Detector, abc.ABC):
    """Base class of the PyTorch detectors: device handling, `fit` through the training engine and
    batched scoring.

    Subclasses store `random_state`, `device` and `score_batch_size` (constructor arguments) and
    implement `_preprocess`, `_build_networks`, `_stage_plans` (their training, described once for
    every number of jobs: methods/engine/), `_stages`, `_score_batch` and `_networks`. A subclass
    may instead train with a loop of its own (`_fit`): it then trains alone, never stacked.

    Attributes
    ----------
    progress_callback : callable or None
        Not a hyperparameter; None by default. Called as (stage name, epochs done, epochs planned)
        after every epoch, for progress displays.
    step_clock : list or None
        Not a hyperparameter; None by default. A list makes the engine append (stage name, seconds)
        for every optimiser step, the step alone (synchronised on a GPU): the estimate's calibration
        reads it (benchmark/estimate.py). Timing never changes what is computed.
    train_options_ : TrainOptions
        Fitted: the options it was trained with (precision, memory format, CUDA graphs: `fit_jobs`'s
        `options` resolved by `resolve_train_options`); scoring uses its memory format, `run_info`
        records them and what was asked for (`train_options_asked_`, e.g. precision "auto").
    """

    progress_callback: Optional[Callable[[str, int, int], None]] = None
    step_clock: Optional[list] = None
    #: The precision "auto" trains in where the device computes bf16 natively (`native_bf16`): "bf16"
    #: only for a detector whose bf16 AUROC was measured within seed noise of fp32 and whose bf16
    #: training was measured faster (README, "Precision and memory format"); fp32 otherwise.
    default_precision: ClassVar[str] = "fp32"
    #: The layout of the networks' 4-D weights and the image batches when the options say "default":
    #: "channels_last" where it was measured faster (benchmark/speed.py), else "nchw".
    default_memory_format: ClassVar[str] = "nchw"
    # None for a subclass with a training loop of its own (`_fit`): see __init_subclass__.
    _stage_plans: ClassVar[Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_fit" in cls.__dict__:  # its own loop: the class (and its subclasses) cannot train stacked
            cls._stage_plans = None

    def resolve_train_options(self, options: TrainOptions) -> TrainOptions:
        """The options with "auto" and "default" replaced by what this detector trains with on its device.

        Precision "auto" is the class's `default_precision` where the device computes bf16 natively
        (`native_bf16`) and the steps are not captured in CUDA graphs (fp32 only), else "fp32";
        memory format "default" is the class's `default_memory_format`. Explicit values pass unchanged.

        Parameters
        ----------
        options : TrainOptions
            The options asked for (the runner's --precision; the defaults).

        Returns
        -------
        TrainOptions
            The same options with a concrete precision ("fp32" or "bf16") and memory format.
        """
        precision, layout = options.precision, options.memory_format
        if precision == "auto":
            device = resolve_device(self.device)
            bf16 = self.default_precision == "bf16" and native_bf16(device) and not options.cuda_graphs
            precision = "bf16" if bf16 else "fp32"
        if layout == "default":
            layout = self.default_memory_format
        return dataclasses.replace(options, precision=precision, memory_format=layout)

    def _options(self) -> TrainOptions:
        """The resolved options of the fit (`resolve_train_options` of the defaults before any fit)."""
        options = getattr(self, "train_options_", None)
        return options if options is not None else self.resolve_train_options(TrainOptions())

    def _in_memory_format(self, item: Any) -> Any:
        """The one place the memory format acts: a module's 4-D weights, or a 4-D batch, in that layout.

        The networks are converted as each training stage starts (`_begin_stage`); the training set
        once it is preprocessed (`_begin_fit`), so every minibatch indexed from it keeps the layout;
        each scoring chunk once it is preprocessed (`decision_function`). The layout is the resolved
        one (`resolve_train_options`: "default" is the detector's `default_memory_format`).

        Parameters
        ----------
        item : nn.Module or torch.Tensor
            A network (converted in place) or a batch.

        Returns
        -------
        nn.Module or torch.Tensor
            The module, or the batch in the layout (other ranks unchanged).
        """
        layout = MEMORY_FORMATS[self._options().memory_format]
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
    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly scores (higher = more anomalous) of one preprocessed batch, shape (B,)."""

    @abc.abstractmethod
    def _networks(self) -> Iterable[nn.Module]:
        """The modules to switch between train and eval mode."""

    def _stages(self, n_train: int) -> list[Stage]:
        """The training stages' budgets on n_train images, in order (no training needed). Every
        detector of this suite lists its stages (its `_stage_plans` use them); the default (none) is
        for a detector with a loop of its own, which the estimate then times as a whole
        (`benchmark/estimate.py`)."""
        return []

    def _build_networks(self, x_train: torch.Tensor) -> None:
        """Build the networks (initialised from the global RNG, seeded by `_begin_fit`) on the device;
        `fit_jobs` calls it for every job right after `_begin_fit`."""

    # ---- budgets, and a training loop of its own -----------------------------------------
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

    def _train_stage(self, stage: Stage, n_train: int, step: Callable[[torch.Tensor, int], torch.Tensor],
                     names: Sequence[str], epoch_callback: Optional[EpochCallback],
                     end_epoch: Optional[Callable[[int, StageResult], None]] = None) -> StageResult:
        """One stage of a detector with a training loop of its own (`_fit`) through the engine's loop:
        `step(indices of the minibatch, 1-based step number)` does the forward, backward and update
        and returns the 1-D tensor of values to log.

        Parameters
        ----------
        stage : Stage
            The budget.
        n_train : int
            Number of training images (the step indexes them).
        step : callable
            The step function.
        names : sequence of str
            Names of the logged values, in order.
        epoch_callback : EpochCallback or None
            The fit's callback.
        end_epoch : callable, optional
            end_epoch(epoch, result so far) after each epoch, before the epoch callback (e.g. per-epoch
            centres from the epoch's features).

        Returns
        -------
        StageResult
            What the stage ran.

        Raises
        ------
        DivergedError
            If a logged value was non-finite in an epoch.
        """
        results: list[StageResult] = []
        job = Job(0, self, torch.empty(n_train, 0, device=self.device_), epoch_callback)
        def stage_end_epoch(job: Job, result: StageResult) -> None:
            results.append(result)
            if end_epoch is not None:
                end_epoch(result.last_epoch, result)

        plan = StagePlan(stage, step=step, names=tuple(names), end_epoch=stage_end_epoch)
        self._begin_stage()
        run_stage(plan, stage, [job], self._options(), stacked=False)
        if job.error is not None:
            raise job.error
        return results[-1] if results else StageResult()

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
        (error,) = fit_jobs([self], [X], [epoch_callback])
        if error is not None:
            raise error
        return self

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

    def _begin_stage(self) -> None:
        """What the engine does for each job as a stage starts: its networks in train mode (a detector's
        `_set_mode` may keep some in eval mode) and every network it holds in the fit's memory format."""
        self._set_mode(train=True)
        for net in [value for value in vars(self).values() if isinstance(value, nn.Module)]:
            self._in_memory_format(net)  # every network the detector holds (Deep SVDD's autoencoder too)

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
            "precision": self._options().precision,
            "cuda_graphs": self._options().cuda_graphs,
            "memory_format": self._options().memory_format,
            # What the run asked for: "auto" / "default" resolve per detector (resolve_train_options).
            "precision_asked": getattr(self, "train_options_asked_", self._options()).precision,
            "memory_format_asked": getattr(self, "train_options_asked_", self._options()).memory_format,
            "determinism": ("bit-identical on CPU for the same seed, torch version and thread count"
                            if device.type == "cpu"
                            else "GPU kernels (cuDNN autotuning, atomics) may differ run to run"),
        }
        if device.type == "cuda":
            info["gpu_name"] = torch.cuda.get_device_name(device)
        if getattr(self, "graph_stats_", None):
            info["graph_steps"] = {stage: dict(stats) for stage, stats in self.graph_stats_.items()}
        return info
