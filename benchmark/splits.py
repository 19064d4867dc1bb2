"""One-class tasks (docs/method.md, 'Split protocol'): one class is normal, the other nine anomalous.

- protocol "paper" (default, the paper's section 4.1): train = the normal class's images of the
  original training split; test = the anomalous images of the training split + the whole test split.
- protocol "standard" (Deep SVDD / GANomaly papers): same train; test = the test split only.
Labels: 1 = anomaly, 0 = normal. Images: float32 (N, C, H, W) in [0, 1] at native size.
A validation split (`val_fraction` of the normal training images, never fitted on) is held out
to set a detection threshold without test labels; drawn with the task's sample seed, so it is the
same for every method and seed.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from benchmark.data import Dataset

PROTOCOLS = ("paper", "standard")


@dataclass(frozen=True)
class Subsample:
    """Caps on a task's images, used by the cheaper profiles (benchmark/profiles.py).

    Every cap draws with a seed fixed by (dataset, class, protocol) alone, so every method and
    every seed sees the same images.

    Parameters
    ----------
    max_train : int, optional
        At most this many training images (None: all).
    max_test_normal, max_test_anomalous : int, optional
        At most this many normal / anomalous test images (None: all).
    """
    max_train: Optional[int] = None
    max_test_normal: Optional[int] = None
    max_test_anomalous: Optional[int] = None


@dataclass(frozen=True)
class Task:
    """One one-class task.

    Parameters
    ----------
    dataset : str
        The dataset's name.
    normal_class : int
        The normal class.
    protocol : str
        ``"paper"`` or ``"standard"`` (module docstring).
    x_train : ndarray
        float32 (N, C, H, W) normal training images in [0, 1].
    x_test : ndarray
        float32 test images, normal ones first.
    y_test : ndarray
        int8 labels of the test images, 1 = anomaly.
    sample_seed : int
        The seed the caps drew with.
    """

    dataset: str
    normal_class: int
    protocol: str
    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sample_seed: int
    x_val: Optional[np.ndarray] = None  # held-out normal training images (None: no validation split)

    @property
    def sizes(self) -> dict:
        """Image counts: n_train, n_test, n_test_normal, n_test_anomalous."""
        n_anomalous = int(self.y_test.sum())
        sizes = {"n_train": int(len(self.x_train)), "n_test": int(len(self.y_test)),
                 "n_test_normal": int(len(self.y_test) - n_anomalous), "n_test_anomalous": n_anomalous}
        return sizes if self.x_val is None else {**sizes, "n_val": int(len(self.x_val))}


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]."""
    return images.astype(np.float32) / np.float32(255.0)


def _cap(indices: np.ndarray, cap: Optional[int], rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(indices) <= cap:
        return indices
    return np.sort(rng.choice(indices, size=cap, replace=False))


def make_task(data: Dataset, normal_class: int, protocol: str = "paper",
              subsample: Subsample = Subsample(), val_fraction: float = 0.0) -> Task:
    """Build the task in which `normal_class` is normal and every other class anomalous.

    Parameters
    ----------
    data : Dataset
        The loaded dataset.
    normal_class : int
        The normal class, in ``range(len(data.class_names))``.
    protocol : {"paper", "standard"}
        The split protocol (module docstring; docs/method.md, 'Split protocol').
    subsample : Subsample
        Caps on the images (the profile's).
    val_fraction : float
        Share in [0, 1) of the (capped) normal training images held out as ``x_val``, drawn from
        its own generator so that the test sample does not change.

    Returns
    -------
    Task

    Raises
    ------
    ValueError
        For an unknown protocol or a class out of range.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    if not 0 <= normal_class < len(data.class_names):
        raise ValueError(f"normal class {normal_class} out of range 0-{len(data.class_names) - 1}")
    sample_seed = zlib.crc32(f"{data.name}/{normal_class}/{protocol}".encode())
    rng = np.random.default_rng(sample_seed)

    train_idx = _cap(np.flatnonzero(data.train_labels == normal_class), subsample.max_train, rng)
    val_idx = np.array([], dtype=np.int64)
    if val_fraction > 0:
        n_val = max(1, int(round(val_fraction * len(train_idx))))
        held = np.random.default_rng([sample_seed, 1]).permutation(len(train_idx))[:n_val]
        val_idx, train_idx = train_idx[np.sort(held)], np.delete(train_idx, held)
    test_normal = np.flatnonzero(data.test_labels == normal_class)
    test_anomalous = np.flatnonzero(data.test_labels != normal_class)
    pool = [(data.test_images, test_normal, test_anomalous)]
    if protocol == "paper":
        train_anomalous = np.flatnonzero(data.train_labels != normal_class)
        pool.append((data.train_images, np.array([], dtype=np.int64), train_anomalous))

    # Caps apply to the pooled normal / anomalous test images (the test split first, then train).
    normal_parts = [(images, idx) for images, idx, _ in pool]
    anomalous_parts = [(images, idx) for images, _, idx in pool]
    x_normal = _take(normal_parts, subsample.max_test_normal, rng)
    x_anomalous = _take(anomalous_parts, subsample.max_test_anomalous, rng)
    x_test = np.concatenate([x_normal, x_anomalous])
    y_test = np.concatenate([np.zeros(len(x_normal), np.int8), np.ones(len(x_anomalous), np.int8)])
    return Task(data.name, normal_class, protocol, to_float(data.train_images[train_idx]), to_float(x_test),
                y_test, sample_seed, to_float(data.train_images[val_idx]) if val_fraction > 0 else None)


def _take(parts: list, cap: Optional[int], rng: np.random.Generator) -> np.ndarray:
    sizes = [len(idx) for _, idx in parts]
    chosen = _cap(np.arange(sum(sizes)), cap, rng)
    offsets = np.cumsum([0] + sizes)
    pieces = []
    for (images, idx), lo, hi in zip(parts, offsets[:-1], offsets[1:]):
        local = chosen[(chosen >= lo) & (chosen < hi)] - lo
        pieces.append(images[idx[local]])
    return np.concatenate(pieces)
