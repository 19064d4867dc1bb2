"""Loading the registered datasets (benchmark/datasets.py: their specs, loaders and file checks)
as uint8 arrays, every file checked before use, each dataset read once per process.

Data root: `--data-root`, else the environment variable MEMGAN_DATA, else ./data. Missing files
are downloaded (through the spec's `download`, torchvision's for the paper's datasets) unless
`download=False`. The registry's names used across the benchmark (`DataError`, the paper's
loaders and file checks) are importable from here too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

# The names imported `as` themselves are defined beside the specs (benchmark/datasets.py) and re-exported:
# the benchmark and its users import them from here.
from benchmark.datasets import CIFAR_BIN_SIZE as CIFAR_BIN_SIZE
from benchmark.datasets import CLASS_NAMES as _CLASS_NAMES
from benchmark.datasets import IDX_IMAGES_MAGIC as IDX_IMAGES_MAGIC
from benchmark.datasets import IDX_LABELS_MAGIC as IDX_LABELS_MAGIC
from benchmark.datasets import OFFICIAL_SIZES as OFFICIAL_SIZES
from benchmark.datasets import DataError as DataError
from benchmark.datasets import DatasetNames, DatasetSpec, check_labels, get_dataset, how_to_fix
from benchmark.datasets import known_md5 as known_md5
from benchmark.datasets import load_cifar10 as load_cifar10
from benchmark.datasets import load_mnist_like as load_mnist_like
from benchmark.datasets import read_idx as read_idx

# Live views of the dataset registry (benchmark/datasets.py): every registered dataset, in order.
DATASETS: Sequence[str] = DatasetNames()
CLASS_NAMES: Mapping[str, list[str]] = _CLASS_NAMES


@dataclass(frozen=True)
class Dataset:
    """One loaded dataset.

    Parameters
    ----------
    name : str
        The registry name.
    train_images, test_images : ndarray
        uint8 images (N, C, H, W) of the original training and test splits.
    train_labels, test_labels : ndarray
        int64 class labels (N,).
    class_names : tuple of str
        One name per class, in label order.
    source : str
        The files or folder the arrays were read from.
    """

    name: str
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple
    source: str               # the layout the files were read from


def resolve_data_root(data_root: Union[str, Path, None] = None) -> Path:
    """The data root: `data_root` (``--data-root``), else ``$MEMGAN_DATA``, else ``./data``.

    Parameters
    ----------
    data_root : str or Path, optional
        An explicit data root.

    Returns
    -------
    Path
    """
    if data_root is not None:
        return Path(data_root)
    return Path(os.environ.get("MEMGAN_DATA") or "data")


def _remove_empty_dirs(created: list[Path]) -> None:
    """Remove what a failed download created and left without a file: the empty folders under the
    data root, then the folders in `created` (deepest first) that are empty."""
    if created and created[0].is_dir():
        for directory, _, _ in sorted(os.walk(created[0]), key=lambda entry: -len(entry[0])):
            try:
                Path(directory).rmdir()  # only succeeds on an empty folder
            except OSError:
                pass
    for directory in created:
        try:
            if directory.is_dir():
                directory.rmdir()
        except OSError:  # not empty: it and the folders above it stay
            break


def _download(name: str, root: Path) -> None:
    spec = get_dataset(name)
    created = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        spec.download(root)
    except Exception as exc:
        _remove_empty_dirs(created)  # partial files, if any, are kept
        raise DataError(f"could not download {name} into {root}: {exc}. Without internet, copy the official files "
                        f"into a folder in torchvision's layout (see README.md, 'Data'), point --data-root or the "
                        f"MEMGAN_DATA environment variable at it, and pass --no-download.") from exc


def load_dataset(name: str, data_root: Union[str, Path, None] = None, download: bool = True) -> Dataset:
    """Load one registered dataset, every file checked (cached: read once per process).

    Parameters
    ----------
    name : str
        A dataset name from `benchmark.datasets` (``mnist``, ``fashion_mnist``, ``cifar10``, ...).
    data_root : str or Path, optional
        The data root; default `resolve_data_root` (``$MEMGAN_DATA``, else ``./data``).
    download : bool, default True
        Fetch missing files when the dataset has a download.

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        For an unknown dataset name.
    DataError
        For a missing, corrupt or malformed file (the message names the file and the fix).
    """
    return _load_cached(get_dataset(name), resolve_data_root(data_root).resolve(), download)


def _as_dataset(name: str, arrays: tuple, root: Path) -> Dataset:
    """Check a loader's arrays against the dataset's spec and wrap them."""
    spec = get_dataset(name)
    train_images, train_labels, test_images, test_labels, source = arrays
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.shape[1:] != spec.image_shape or len(images) != len(labels) \
                or labels.ndim != 1 or len(images) == 0:
            raise DataError(f"{source}: the {split} split of {name} holds images {images.shape} ({images.dtype}) and "
                            f"labels {labels.shape}; expected uint8 (N, {', '.join(map(str, spec.image_shape))}) "
                            f"images with N > 0 and N labels. {how_to_fix(name, root)}")
        check_labels(labels, Path(source), root, name)
    return Dataset(name, np.asarray(train_images), np.asarray(train_labels, dtype=np.int64), np.asarray(test_images),
                   np.asarray(test_labels, dtype=np.int64), tuple(spec.class_names), str(source))


@lru_cache(maxsize=None)
def _load_cached(spec: DatasetSpec, root: Path, download: bool) -> Dataset:
    name = spec.name
    try:
        return _as_dataset(name, spec.loader(root), root)
    except FileNotFoundError as missing:
        if not download or spec.download is None:
            how = "Run without --no-download to fetch them, or pass" if spec.download is not None else "Pass"
            raise DataError(f"{missing.filename or missing.args[0]}: file not found; expected the {name} files under "
                            f"{root} (see README.md, 'Data'). {how} --data-root, or set the MEMGAN_DATA environment "
                            f"variable, to a folder that has them.") from None
    _download(name, root)
    try:
        return _as_dataset(name, spec.loader(root), root)
    except FileNotFoundError as missing:
        raise DataError(f"{missing.filename or missing.args[0]}: still missing after the download into "
                        f"{root}.") from None
