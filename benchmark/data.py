"""Loading the registered datasets (benchmark/datasets.py) as uint8 arrays, every file checked
before use; the loaders and file checks of MNIST, Fashion-MNIST and CIFAR-10.

Data root: `--data-root`, else the environment variable MEMGAN_DATA, else ./data. Layouts read:
- MNIST / Fashion-MNIST: torchvision's `MNIST/raw/` and `FashionMNIST/raw/` IDX files
  (uncompressed, or the .gz files next to them);
- CIFAR-10: the python version `cifar-10-batches-py/` (what torchvision's download writes) or
  the official binary version `cifar-10-batches-bin/`.
Missing files are downloaded through torchvision unless `download=False`.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from benchmark.datasets import CLASS_NAMES as _CLASS_NAMES
from benchmark.datasets import DATASET_REGISTRY, DatasetNames, DatasetSpec, get_dataset

# Live views of the dataset registry (benchmark/datasets.py): every registered dataset, in order.
DATASETS: Sequence[str] = DatasetNames()
CLASS_NAMES: Mapping[str, list[str]] = _CLASS_NAMES

OFFICIAL_SIZES = {"t10k-images-idx3-ubyte": 7840016, "t10k-labels-idx1-ubyte": 10008,
                  "train-images-idx3-ubyte": 47040016, "train-labels-idx1-ubyte": 60008}
CIFAR_BIN_SIZE = 10000 * 3073

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_MNIST_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def known_md5() -> dict[str, str]:
    """MD5 of the official files of every registered dataset, by path relative to the data root.

    Returns
    -------
    dict of str to str
    """
    return {path: md5 for spec in DATASET_REGISTRY.values() for path, md5 in spec.checksums.items()}


class DataError(Exception):
    """A data file is missing, corrupt or of the wrong kind. The message names the file, what was
    expected, and how to get a good copy."""


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


def _how_to_fix(name: str, root: Path) -> str:
    return (f"Delete the bad file and run again without --no-download to fetch {name} through torchvision into "
            f"{root}, or point --data-root / MEMGAN_DATA at a folder holding the official files "
            f"(see README.md, 'Data').")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_known_checksum(path: Path, root: Path, name: str, data: Optional[bytes] = None) -> None:
    """`data`: a .gz file's decompressed bytes, checked against the uncompressed file's MD5."""
    key = path.relative_to(root).as_posix() if path.is_relative_to(root) else None
    if key and data is not None:
        key = key.removesuffix(".gz")
    expected = known_md5().get(key or "")
    size = len(data) if data is not None else path.stat().st_size
    is_cifar_bin = bool(key and key.endswith(".bin"))
    official_size = CIFAR_BIN_SIZE if is_cifar_bin else OFFICIAL_SIZES.get(path.name.removesuffix(".gz"))
    if expected and official_size == size and (_md5(path) if data is None
                                               else hashlib.md5(data).hexdigest()) != expected:
        of_content = " of its decompressed content" if data is not None else ""
        raise DataError(f"{path}: checksum mismatch (MD5{of_content} differs from the official file's {expected}); "
                        f"the file is corrupt. {_how_to_fix(name, root)}")


def _read_bytes(path: Path, root: Path, name: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated / corrupt .gz
        raise DataError(f"{path}: cannot read ({exc}). {_how_to_fix(name, root)}") from exc


def read_idx(path: Path, expected_magic: int, root: Optional[Path] = None, name: str = "the dataset") -> np.ndarray:
    """Read and check an IDX file.

    Parameters
    ----------
    path : Path
        The file (``.gz`` is decompressed).
    expected_magic : int
        `IDX_IMAGES_MAGIC` (2051, (N, rows, cols)) or `IDX_LABELS_MAGIC` (2049, (N,)).
    root : Path, optional
        The data root, for checksum look-up and error messages (default: the file's folder).
    name : str
        The dataset, for error messages.

    Returns
    -------
    ndarray
        uint8, of the shape the header gives.
    """
    root = root or path.parent
    raw = _read_bytes(path, root, name)
    if path.suffix == ".gz":
        _check_known_checksum(path, root, name, raw)
    kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 8:
        raise DataError(f"{path}: truncated IDX {kind} file ({len(raw)} bytes, expected a header of at least 8). "
                        f"{_how_to_fix(name, root)}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: wrong IDX magic number {magic} (0x{magic:08x}); expected {expected_magic} "
                        f"(0x{expected_magic:08x}) for an {kind} file. {_how_to_fix(name, root)}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header. {_how_to_fix(name, root)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header + int(np.prod(shape))
    if len(raw) != expected_size:
        raise DataError(f"{path}: wrong size {len(raw)} bytes; its header {shape} needs exactly {expected_size} "
                        f"bytes (file truncated or corrupt). {_how_to_fix(name, root)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _check_labels(labels: np.ndarray, path: Path, root: Path, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    n_classes = len(get_dataset(name).class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = int(labels.max()) if labels.max() >= n_classes else int(labels.min())
        raise DataError(f"{path}: label {bad} out of range; expected labels 0-{n_classes - 1}. "
                        f"{_how_to_fix(name, root)}")
    return labels.astype(np.int64)


def _find(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_like(name: str, root: Path) -> tuple:
    """Loader of MNIST and Fashion-MNIST (torchvision's ``<Name>/raw/`` IDX files, or their .gz).

    Parameters
    ----------
    name : str
        ``"mnist"`` or ``"fashion_mnist"``.
    root : Path
        The data root.

    Returns
    -------
    tuple
        ``(train_images, train_labels, test_images, test_labels, source)`` as a `DatasetSpec`
        loader returns them.
    """
    directory = root / _MNIST_DIRS[name] / "raw"
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        paths = {kind: _find(directory, f"{prefix}-{kind}-idx{dims}-ubyte")
                 for kind, dims in (("images", 3), ("labels", 1))}
        for kind, path in paths.items():
            if path is None:
                raise FileNotFoundError(directory / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte")
            _check_known_checksum(path, root, name)
        images = read_idx(paths["images"], IDX_IMAGES_MAGIC, root, name)
        labels = _check_labels(read_idx(paths["labels"], IDX_LABELS_MAGIC, root, name), paths["labels"], root, name)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
            raise DataError(f"{paths['images']}: expected (N, 28, 28) images and (N,) labels, got {images.shape} "
                            f"and {labels.shape}. {_how_to_fix(name, root)}")
        if len(images) != len(labels):
            raise DataError(f"{paths['images']} holds {len(images)} images but {paths['labels']} holds "
                            f"{len(labels)} labels; expected the same count. {_how_to_fix(name, root)}")
        arrays[split] = (images[:, None, :, :], labels)
    return (*arrays["train"], *arrays["test"], str(directory))


def _load_cifar_bin(root: Path, directory: Path) -> tuple:
    splits = {}
    for split, files in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        images, labels = [], []
        for filename in files:
            path = directory / filename
            if not path.is_file():
                raise FileNotFoundError(path)
            size = path.stat().st_size
            if size == 0 or size % 3073:
                raise DataError(f"{path}: wrong size {size} bytes; expected records of 1 label byte "
                                f"+ 3,072 pixel bytes (10,000 records = {CIFAR_BIN_SIZE} bytes). "
                                f"{_how_to_fix('cifar10', root)}")
            _check_known_checksum(path, root, "cifar10")
            records = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
            labels.append(_check_labels(records[:, 0], path, root, "cifar10"))
            images.append(records[:, 1:].reshape(-1, 3, 32, 32))
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits["train"] + splits["test"]


def _load_cifar_py(root: Path, directory: Path) -> tuple:
    from torchvision.datasets import CIFAR10

    splits = {}
    for split, entries in (("train", CIFAR10.train_list), ("test", CIFAR10.test_list)):
        images, labels = [], []
        for filename, md5 in entries:
            path = directory / filename
            if not path.is_file():
                raise FileNotFoundError(path)
            if _md5(path) != md5:
                raise DataError(f"{path}: checksum mismatch (expected MD5 {md5}); the file is corrupt. "
                                f"{_how_to_fix('cifar10', root)}")
            try:
                with open(path, "rb") as handle:
                    entry = pickle.load(handle, encoding="latin1")
                data = np.asarray(entry["data"], dtype=np.uint8)
                batch_labels = np.asarray(entry.get("labels", entry.get("fine_labels")))
            except Exception as exc:  # unpicklable or missing keys
                raise DataError(f"{path}: not a CIFAR-10 python batch ({exc}). {_how_to_fix('cifar10', root)}") from exc
            if data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != len(data):
                raise DataError(f"{path}: expected 'data' of shape (N, 3072) and N labels, got {data.shape} and "
                                f"{len(batch_labels)}. {_how_to_fix('cifar10', root)}")
            labels.append(_check_labels(batch_labels, path, root, "cifar10"))
            images.append(data.reshape(-1, 3, 32, 32))
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits["train"] + splits["test"]


def load_cifar10(root: Path) -> tuple:
    """Loader of CIFAR-10: the python batches (``cifar-10-batches-py/``) or the binary ones.

    Parameters
    ----------
    root : Path
        The data root.

    Returns
    -------
    tuple
        ``(train_images, train_labels, test_images, test_labels, source)``.
    """
    py_dir, bin_dir = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    if py_dir.is_dir():
        arrays, source = _load_cifar_py(root, py_dir), py_dir
    elif bin_dir.is_dir():
        arrays, source = _load_cifar_bin(root, bin_dir), bin_dir
    else:
        raise FileNotFoundError(py_dir)
    return (*arrays, str(source))


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
                            f"images with N > 0 and N labels. {_how_to_fix(name, root)}")
        _check_labels(labels, Path(source), root, name)
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
