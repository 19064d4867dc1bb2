"""Shared machinery of the PyTorch detectors: device choice, seeding, data on the device once,
divergence detection without per-step host syncs, and batched scoring under inference mode."""
from __future__ import annotations

import abc
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from methods.base import Detector, DivergedError, EpochCallback, check_images, check_positive_int, check_random_state


def resolve_device(device: str) -> torch.device:
    """'auto' -> the first GPU when there is one, else the CPU; 'cpu'; 'cuda' or 'cuda:N'.
    An unavailable device is a ValueError (a usage error for the CLI)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu or auto")
    index = resolved.index or 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return resolved


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and every GPU) and numpy's legacy global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN init (GANomaly's weights_init): conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    name = module.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif "BatchNorm" in name and getattr(module, "weight", None) is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DivergenceMonitor:
    """Remembers the first step whose loss was non-finite, on the device, so the step loop never
    syncs; `check(epoch)` syncs once (end of epoch) and raises DivergedError."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, *losses: torch.Tensor) -> None:
        finite = torch.stack([loss.detach().float().reshape(()) for loss in losses]).isfinite().all()
        newly_bad = (~finite) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def check(self, epoch: int) -> None:
        step = int(self.first_bad_step)
        if step >= 0:
            raise DivergedError(epoch=epoch, step=step)


class TorchDetector(Detector, abc.ABC):
    """Subclasses store `random_state`, `device` and `score_batch_size` (constructor arguments)
    and implement `_preprocess`, `_fit`, `_score_batch` and `_networks`."""

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

    # ---- shared ---------------------------------------------------------------------------
    def _check_torch_params(self) -> None:
        check_positive_int("score_batch_size", self.score_batch_size)
        check_random_state(self.random_state)
        resolve_device(self.device)

    def check_params(self) -> "TorchDetector":
        self._check_torch_params()
        self._check_params()
        return self

    def fit(self, X: np.ndarray, epoch_callback: Optional[EpochCallback] = None) -> "TorchDetector":
        self.check_params()
        X = check_images(X)
        self.device_ = resolve_device(self.device)
        seed_everything(int(self.random_state))
        # Shuffling draws from a generator on the training device, so no index copies per step.
        self.generator_ = torch.Generator(device=self.device_)
        self.generator_.manual_seed(int(self.random_state))
        self.input_shape_ = tuple(X.shape[1:])
        self.training_log_ = {}
        self.per_epoch_facts_: dict[str, list[float]] = {}
        x_train = self._preprocess(torch.from_numpy(np.ascontiguousarray(X)).to(self.device_))
        self._facts_sample_ = x_train[:self._epoch_facts_sample_size]  # a view, dropped after training
        try:
            self._fit(x_train, epoch_callback)
        finally:
            del self._facts_sample_
        if self.per_epoch_facts_:
            self.training_log_["per_epoch"] = self.per_epoch_facts_
        self._set_mode(train=False)
        return self

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
        X = check_images(X)
        if tuple(X.shape[1:]) != getattr(self, "input_shape_", None):
            raise ValueError(f"images of shape {X.shape[1:]} do not match the training images "
                             f"{getattr(self, 'input_shape_', None)}; call fit first")
        self._set_mode(train=False)  # BatchNorm in inference mode: a score never depends on its batch
        scores = []
        with torch.inference_mode():
            for start in range(0, len(X), self.score_batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(X[start:start + self.score_batch_size]))
                scores.append(self._score_batch(self._preprocess(chunk.to(self.device_))).float())
        return torch.cat(scores).cpu().numpy().astype(np.float64)

    def run_info(self) -> dict:
        device = getattr(self, "device_", resolve_device(self.device))
        info = {
            "device": str(device),
            "torch_num_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "determinism": ("bit-identical on CPU for the same seed, torch version and thread count"
                            if device.type == "cpu"
                            else "GPU kernels (cuDNN autotuning, atomics) may differ run to run"),
        }
        if device.type == "cuda":
            info["gpu_name"] = torch.cuda.get_device_name(device)
        return info
