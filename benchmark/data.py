"""Loading MNIST, Fashion-MNIST and CIFAR-10 as uint8 arrays, from official file layouts, with
every file checked before use.

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
from typing import Optional, Union

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "cifar10")

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    # Tables 2 and 3 use these labels.
    "fashion_mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["Plane", "Car", "Bird", "Cat", "Deer", "Dog", "Frog", "Horse", "Ship", "Truck"],
}

# MD5 of the official files (uncompressed IDX files; the CIFAR-10 binary batches as published).
# A file of exactly the official size is checked against them (a corrupt download keeps its
# size); files of other sizes fail the structural checks instead.
KNOWN_MD5 = {
    "MNIST/raw/t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "MNIST/raw/t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    "MNIST/raw/train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "MNIST/raw/train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "FashionMNIST/raw/t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "FashionMNIST/raw/t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    "FashionMNIST/raw/train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "FashionMNIST/raw/train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "cifar-10-batches-bin/data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "cifar-10-batches-bin/data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "cifar-10-batches-bin/data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "cifar-10-batches-bin/data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "cifar-10-batches-bin/data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "cifar-10-batches-bin/test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
OFFICIAL_SIZES = {"t10k-images-idx3-ubyte": 7840016, "t10k-labels-idx1-ubyte": 10008,
                  "train-images-idx3-ubyte": 47040016, "train-labels-idx1-ubyte": 60008}
CIFAR_BIN_SIZE = 10000 * 3073

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_MNIST_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


class DataError(Exception):
    """A data file is missing, corrupt or of the wrong kind. The message names the file, what was
    expected, and how to get a good copy."""


@dataclass(frozen=True)
class Dataset:
    name: str
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple
    source: str               # the layout the files were read from


def resolve_data_root(data_root: Union[str, Path, None] = None) -> Path:
    """--data-root, else $MEMGAN_DATA, else ./data."""
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
    expected = KNOWN_MD5.get(key or "")
    size = len(data) if data is not None else path.stat().st_size
    official_size = CIFAR_BIN_SIZE if key and key.endswith(".bin") else OFFICIAL_SIZES.get(path.name.removesuffix(".gz"))
    if expected and official_size == size and (_md5(path) if data is None else hashlib.md5(data).hexdigest()) != expected:
        raise DataError(f"{path}: checksum mismatch (MD5{' of its decompressed content' if data is not None else ''} differs "
                        f"from the official file's {expected}); the file is corrupt. {_how_to_fix(name, root)}")


def _read_bytes(path: Path, root: Path, name: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated / corrupt .gz
        raise DataError(f"{path}: cannot read ({exc}). {_how_to_fix(name, root)}") from exc


def read_idx(path: Path, expected_magic: int, root: Optional[Path] = None, name: str = "the dataset") -> np.ndarray:
    """Read an IDX file (images: magic 2051, (N, rows, cols); labels: magic 2049, (N,))."""
    root = root or path.parent
    raw = _read_bytes(path, root, name)
    if path.suffix == ".gz":
        _check_known_checksum(path, root, name, raw)
    kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 8:
        raise DataError(f"{path}: truncated IDX {kind} file ({len(raw)} bytes, expected a header of at least 8). {_how_to_fix(name, root)}")
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
    if labels.size and labels.max() > 9:
        raise DataError(f"{path}: label {int(labels.max())} out of range; expected labels 0-9. {_how_to_fix(name, root)}")
    return labels.astype(np.int64)


def _find(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_mnist_like(name: str, root: Path) -> Dataset:
    directory = root / _MNIST_DIRS[name] / "raw"
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        paths = {kind: _find(directory, f"{prefix}-{kind}-idx{dims}-ubyte") for kind, dims in (("images", 3), ("labels", 1))}
        for kind, path in paths.items():
            if path is None:
                raise FileNotFoundError(directory / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte")
            _check_known_checksum(path, root, name)
        images = read_idx(paths["images"], IDX_IMAGES_MAGIC, root, name)
        labels = _check_labels(read_idx(paths["labels"], IDX_LABELS_MAGIC, root, name), paths["labels"], root, name)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
            raise DataError(f"{paths['images']}: expected (N, 28, 28) images and (N,) labels, got {images.shape} and {labels.shape}. {_how_to_fix(name, root)}")
        if len(images) != len(labels):
            raise DataError(f"{paths['images']} holds {len(images)} images but {paths['labels']} holds {len(labels)} labels; "
                            f"expected the same count. {_how_to_fix(name, root)}")
        arrays[split] = (images[:, None, :, :], labels)
    return Dataset(name, *arrays["train"], *arrays["test"], tuple(CLASS_NAMES[name]), str(directory))


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
                raise DataError(f"{path}: wrong size {size} bytes; expected records of 1 label byte + 3,072 pixel bytes "
                                f"(10,000 records = {CIFAR_BIN_SIZE} bytes). {_how_to_fix('cifar10', root)}")
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
                raise DataError(f"{path}: checksum mismatch (expected MD5 {md5}); the file is corrupt. {_how_to_fix('cifar10', root)}")
            try:
                with open(path, "rb") as handle:
                    entry = pickle.load(handle, encoding="latin1")
                data = np.asarray(entry["data"], dtype=np.uint8)
                batch_labels = np.asarray(entry.get("labels", entry.get("fine_labels")))
            except Exception as exc:  # unpicklable or missing keys
                raise DataError(f"{path}: not a CIFAR-10 python batch ({exc}). {_how_to_fix('cifar10', root)}") from exc
            if data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != len(data):
                raise DataError(f"{path}: expected 'data' of shape (N, 3072) and N labels, got {data.shape} and {len(batch_labels)}. "
                                f"{_how_to_fix('cifar10', root)}")
            labels.append(_check_labels(batch_labels, path, root, "cifar10"))
            images.append(data.reshape(-1, 3, 32, 32))
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits["train"] + splits["test"]


def _load_cifar10(root: Path) -> Dataset:
    py_dir, bin_dir = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    if py_dir.is_dir():
        arrays, source = _load_cifar_py(root, py_dir), py_dir
    elif bin_dir.is_dir():
        arrays, source = _load_cifar_bin(root, bin_dir), bin_dir
    else:
        raise FileNotFoundError(py_dir)
    return Dataset("cifar10", *arrays, tuple(CLASS_NAMES["cifar10"]), str(source))


def _download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(tvd, _TORCHVISION_CLASS[name])(str(root), train=True, download=True)
        getattr(tvd, _TORCHVISION_CLASS[name])(str(root), train=False, download=True)
    except Exception as exc:
        raise DataError(f"could not download {name} into {root}: {exc}. Without internet, copy the official files "
                        f"into {root} in torchvision's layout (see README.md, 'Data') and pass --no-download.") from exc


def load_dataset(name: str, data_root: Union[str, Path, None] = None, download: bool = True) -> Dataset:
    """Load one dataset (cached: each dataset is read from disk once per process)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    return _load_cached(name, resolve_data_root(data_root).resolve(), download)


@lru_cache(maxsize=None)
def _load_cached(name: str, root: Path, download: bool) -> Dataset:
    loader = _load_cifar10 if name == "cifar10" else (lambda r: _load_mnist_like(name, r))
    try:
        return loader(root)
    except FileNotFoundError as missing:
        if not download:
            raise DataError(f"{missing.filename or missing.args[0]}: file not found; expected the {name} files under {root} in torchvision's "
                            f"layout (see README.md, 'Data'). Run without --no-download to fetch them, or pass --data-root "
                            f"pointing at a folder that has them.") from None
    _download(name, root)
    try:
        return loader(root)
    except FileNotFoundError as missing:
        raise DataError(f"{missing.filename or missing.args[0]}: still missing after the download into {root}.") from None
