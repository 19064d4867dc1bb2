"""The `Detector` interface every method implements, in the scikit-learn / pyod style.

* Hyperparameters are constructor arguments (with defaults) stored unchanged as attributes,
  so `get_params()` (from scikit-learn's `BaseEstimator`) lists them for the job record.
* `fit(X)` learns from normal training images only.
* `decision_function(X)` returns one float per image; higher = more anomalous.

Input images are float32 arrays of shape (N, C, H, W) scaled to [0, 1] at native size;
each detector does its own further preprocessing through `methods.preprocess`.

This module imports without torch (the registry and the command line import it): its helpers that
need torch (`iterate_minibatches`, `resolve_device`) import it when called.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

import numpy as np
from sklearn.base import BaseEstimator

#: The training precisions: "auto" (each detector's `default_precision` where the device computes bf16
#: natively, else fp32), "fp32", or "bf16" (training steps under torch.autocast(bfloat16); scoring stays fp32).
PRECISIONS = ("auto", "fp32", "bf16")
#: The memory formats: "default" (the detector's own layout, its `default_memory_format`), "nchw" or
#: "channels_last".
MEMORY_FORMAT_NAMES = ("default", "nchw", "channels_last")


@dataclass(frozen=True)
class TrainOptions:
    """How the runner asks for jobs to be trained, beside the hyperparameters: options that change
    speed, not what a detector is, so they are not constructor arguments. The engine receives them
    in this one object (never as attributes set on a detector) and the job record states them
    (run_info).

    Parameters
    ----------
    precision : str
        One of `PRECISIONS` (the runner's --precision; default "auto": what each detector declares).
    memory_format : str
        One of `MEMORY_FORMAT_NAMES` (a speed lever, benchmark/speed.py; default: the detector's own).
    cuda_graphs : bool
        Capture each training step in a CUDA graph (the runner's --cuda-graphs; CUDA only).
    """

    precision: str = "auto"
    memory_format: str = "default"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.memory_format not in MEMORY_FORMAT_NAMES:
            raise ValueError(f"memory_format must be one of {list(MEMORY_FORMAT_NAMES)}, got {self.memory_format!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")


# Called after every training epoch as callback(epoch_index_from_1, detector). The runner uses
# it only for the optional per-epoch AUROC diagnostic; it never changes what is trained.
EpochCallback = Callable[[int, "Detector"], None]


class DivergedError(RuntimeError):
    """Training produced a non-finite loss. The runner records the job as `diverged`."""

    def __init__(self, epoch: int, step: int, detail: str = "non-finite loss") -> None:
        self.epoch = epoch
        self.step = step
        self.detail = detail
        super().__init__(f"{detail} at epoch {epoch}, step {step}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise a ValueError naming `name` and `value` unless `value` is a positive integer (not a bool).

    Parameters
    ----------
    name : str
        The hyperparameter, e.g. ``epochs``.
    value : object
        Its value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_float(name: str, value: Any) -> None:
    """Raise a ValueError naming `name` and `value` unless `value` is a positive finite number.

    Parameters
    ----------
    name : str
        The hyperparameter, e.g. ``lr``.
    value : object
        Its value.
    """
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value)
            or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_nonneg_float(name: str, value: Any) -> None:
    """Raise a ValueError naming `name` and `value` unless `value` is a finite number >= 0.

    Parameters
    ----------
    name : str
        The hyperparameter, e.g. ``weight_decay``.
    value : object
        Its value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_random_state(value: Any) -> None:
    """Check a seed: an integer in [0, 2**32).

    Parameters
    ----------
    value : object
        The ``random_state``.

    Raises
    ------
    ValueError
        Naming ``random_state``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
        raise ValueError(f"random_state must be an integer in [0, 2**32), got {value!r}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Check that a hyperparameter is one of `choices`.

    Parameters
    ----------
    name : str
        The hyperparameter's name.
    value : object
        Its value.
    choices : tuple
        The allowed values.

    Raises
    ------
    ValueError
        Naming the hyperparameter and listing the choices.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_images(X: Any) -> np.ndarray:
    """Validate the (N, C, H, W) input every detector receives.

    Parameters
    ----------
    X : array-like
        Images, (N, C, H, W) with N > 0.

    Returns
    -------
    ndarray
        float32 (no copy when it already is).

    Raises
    ------
    ValueError
        For another number of dimensions or an empty array.
    """
    X = np.asarray(X)
    if X.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got shape {X.shape}")
    if X.shape[0] == 0:
        raise ValueError("expected at least one image, got an empty array")
    return X.astype(np.float32, copy=False)


class Detector(BaseEstimator, abc.ABC):
    """Base class of every detector (module docstring).

    Subclasses take their hyperparameters as constructor arguments (stored unchanged) and
    implement `_check_params`, `fit` and `decision_function`; `fit(X, epoch_callback=None)`
    returns the detector, `decision_function(X)` one float64 score per image, higher = more
    anomalous.
    """

    #: seconds-free, JSON-serialisable facts about training (losses, D re-inits, ...), set by fit.
    training_log_: dict

    #: The constructor argument that sets the size (number of slots) of the detector's memory module,
    #: or None for a detector without one. The verdict asks this to find the memory detectors.
    memory_size_param: ClassVar[Optional[str]] = None

    def check_params(self) -> "Detector":
        """Raise ValueError naming the bad hyperparameter. The runner calls this for every job
        before any work starts, so a bad value is a usage error, not a failed job."""
        self._check_params()
        return self

    def _check_params(self) -> None:  # pragma: no cover - default: nothing to check
        pass

    @abc.abstractmethod
    def fit(self, X: np.ndarray, epoch_callback: Optional[EpochCallback] = None) -> "Detector":
        ...

    @abc.abstractmethod
    def decision_function(self, X: np.ndarray) -> np.ndarray:
        ...

    def run_info(self) -> dict:
        """Facts for the job record besides the hyperparameters (device, determinism, ...)."""
        return {}


def iterate_minibatches(n: int, batch_size: int, drop_last: bool, generator: Any, device: Any) -> Iterator[Any]:
    """Shuffled minibatch indices for one epoch.

    Parameters
    ----------
    n : int
        The number of samples.
    batch_size : int
        Indices per batch.
    drop_last : bool
        Drop the last incomplete batch (unless there is only one).
    generator : torch.Generator
        The source of the permutation (`torch.randperm`).
    device : torch.device
        Where the index tensors go.

    Yields
    ------
    Tensor
        One batch of indices.
    """
    import torch

    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    for start in range(0, stop, batch_size):
        yield perm[start:start + batch_size]


def resolve_device(device: str) -> Any:
    """Resolve a device name to a torch device (torch is imported on the first call: the command line
    checks --device without loading it before a job needs it).

    Parameters
    ----------
    device : str
        'auto' (the first GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'.

    Returns
    -------
    torch.device
        The resolved device.

    Raises
    ------
    ValueError
        If the name is not one of the above or the device is unavailable (a usage error for the CLI).
    """
    import torch

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


def trains_through_engine(detector: Any) -> bool:
    """Whether the detector trains through the torch engine (`methods.engine.fit_jobs`, which takes the
    run's `TrainOptions`): every `TorchDetector`, told apart without importing torch by its `_begin_fit`.

    Parameters
    ----------
    detector : Detector
        The detector.

    Returns
    -------
    bool
    """
    return callable(getattr(type(detector), "_begin_fit", None))


def supports_stacking(detector: Any) -> bool:
    """Whether the detector's class can train stacked: it describes its training to the engine
    (`_stage_plans`, methods/engine/) rather than running a loop of its own.

    Parameters
    ----------
    detector : Detector
        The detector.

    Returns
    -------
    bool
    """
    return callable(getattr(type(detector), "_stage_plans", None))
