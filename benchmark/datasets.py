"""The dataset registry: one `DatasetSpec` per dataset, the only place a dataset is described,
with the loaders and file checks of the paper's three datasets (MNIST, Fashion-MNIST, CIFAR-10).

`benchmark.data` loads through it, the command line takes its dataset names from it and the
reports take each dataset's title, paper table and reference CSV from it. Adding a dataset =
one loader function and one `register_dataset(DatasetSpec(...))` call (see README.md, "Adding a
dataset"). A loader reads the files under the data root and returns
`(train_images, train_labels, test_images, test_labels, source)`: uint8 images (N, C, H, W),
integer labels and a string naming the files read; it raises `FileNotFoundError` for a missing
file (which triggers the download, when the spec has one) and `DataError` (also importable from
`benchmark.data`) for a bad one.

Layouts the paper's loaders read under the data root:
- MNIST / Fashion-MNIST: torchvision's `MNIST/raw/` and `FashionMNIST/raw/` IDX files
  (uncompressed, or the .gz files next to them);
- CIFAR-10: the python version `cifar-10-batches-py/` (what torchvision's download writes) or
  the official binary version `cifar-10-batches-bin/`.
"""
from __future__ import annotations

import difflib
import gzip
import hashlib
import pickle
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

LoaderResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]


class DataError(Exception):
    """A data file is missing, corrupt or of the wrong kind. The message names the file, what was
    expected, and how to get a good copy."""


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a loaded dataset is cached per spec
class DatasetSpec:
    """Everything the benchmark knows about one dataset.

    Parameters
    ----------
    name : str
        The command-line name, e.g. ``"mnist"``; also the results folder name.
    title : str
        The display title in reports, e.g. ``"Fashion-MNIST"``.
    loader : callable
        ``loader(root: Path) -> (train_images, train_labels, test_images, test_labels, source)``;
        see the module docstring.
    class_names : tuple of str
        One name per class, in label order (the command line accepts them for ``--classes``).
    image_shape : tuple of int
        ``(C, H, W)`` of every image; `benchmark.data.load_dataset` checks the loader's output
        against it.
    table : int or None
        The paper's table number for this dataset's AUROC (1-3), or None when the paper has none
        (then the reports make no table for it).
    reference_csv : str or None
        The paper's numbers, a file name in ``benchmark/reference/`` (None when ``table`` is None).
    checksums : mapping of str to str
        File checks: MD5 of the official files, by path relative to the data root. A file of
        exactly its official size is checked against it before use.
    download : callable or None
        ``download(root: Path) -> None`` fetches missing files into ``root``; None = no
        download (a missing file is a data error).
    """

    name: str
    title: str
    loader: Callable[[Path], LoaderResult]
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    table: Optional[int] = None
    reference_csv: Optional[str] = None
    checksums: Mapping[str, str] = field(default_factory=dict)
    download: Optional[Callable[[Path], None]] = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"dataset name must be an identifier (it names folders), got {self.name!r}")
        if len(self.image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in self.image_shape):
            raise ValueError(f"{self.name}: image_shape must be (C, H, W) of positive integers, "
                             f"got {self.image_shape!r}")
        if len(self.class_names) < 2:
            raise ValueError(f"{self.name}: a one-class task needs at least two classes, got {self.class_names!r}")
        if (self.table is None) != (self.reference_csv is None):
            raise ValueError(f"{self.name}: give both table and reference_csv, or neither")


DATASET_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add (or replace) a dataset.

    Parameters
    ----------
    spec : DatasetSpec
        The dataset's description.

    Returns
    -------
    DatasetSpec
        ``spec``, unchanged.
    """
    DATASET_REGISTRY[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """Look a dataset up by name.

    Parameters
    ----------
    name : str
        A registered dataset name.

    Returns
    -------
    DatasetSpec

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones and a close match if there is one.
    """
    try:
        return DATASET_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASET_REGISTRY)}"
                         f"{did_you_mean(name, DATASET_REGISTRY)}") from None


def dataset_names() -> tuple[str, ...]:
    """The registered dataset names, in registration order (the paper's order first)."""
    return tuple(DATASET_REGISTRY)


def did_you_mean(name: str, choices: Sequence[str] | Mapping[str, object]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` (difflib), else ``""``.

    Parameters
    ----------
    name : str
        What the user typed.
    choices : sequence or mapping of str
        The valid names.

    Returns
    -------
    str
        A suffix for an error message.
    """
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Read-only views of the registry that follow later registrations, so a dataset registered after
# `benchmark.data` was imported is still seen through `DATASETS` / `CLASS_NAMES`.
class DatasetNames(Sequence):
    """The registered names as a read-only sequence (``benchmark.data.DATASETS``)."""

    def __getitem__(self, index):  # type: ignore[override]
        return dataset_names()[index]

    def __len__(self) -> int:
        return len(DATASET_REGISTRY)

    def __repr__(self) -> str:
        return repr(dataset_names())


class _SpecMapping(Mapping):
    def __init__(self, value: Callable[[DatasetSpec], object], keep: Callable[[DatasetSpec], bool] = lambda s: True):
        self._value, self._keep = value, keep

    def _specs(self) -> dict[str, DatasetSpec]:
        return {name: spec for name, spec in DATASET_REGISTRY.items() if self._keep(spec)}

    def __getitem__(self, name: str) -> object:
        return self._value(self._specs()[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs())

    def __len__(self) -> int:
        return len(self._specs())

    def __repr__(self) -> str:
        return repr(dict(self))


#: name -> list of class names (``benchmark.data.CLASS_NAMES``).
CLASS_NAMES: Mapping[str, list[str]] = _SpecMapping(lambda spec: list(spec.class_names))
#: name -> display title (``benchmark.reports.TITLES``).
TITLES: Mapping[str, str] = _SpecMapping(lambda spec: spec.title)
#: name -> ("table<k>", reference CSV), for the datasets the paper has a table for.
PAPER_TABLES: Mapping[str, tuple[str, str]] = _SpecMapping(lambda spec: (f"table{spec.table}", spec.reference_csv),
                                                           keep=lambda spec: spec.table is not None)


# ---- file checks and loaders of the paper's three datasets -------------------------------------
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


def how_to_fix(name: str, root: Path) -> str:
    """How to get a good copy of `name`'s files into `root`: the last sentence of a bad file's data error."""
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
                        f"the file is corrupt. {how_to_fix(name, root)}")


def _read_bytes(path: Path, root: Path, name: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, or a truncated / corrupt .gz
        raise DataError(f"{path}: cannot read ({exc}). {how_to_fix(name, root)}") from exc


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
                        f"{how_to_fix(name, root)}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: wrong IDX magic number {magic} (0x{magic:08x}); expected {expected_magic} "
                        f"(0x{expected_magic:08x}) for an {kind} file. {how_to_fix(name, root)}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header. {how_to_fix(name, root)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header + int(np.prod(shape))
    if len(raw) != expected_size:
        raise DataError(f"{path}: wrong size {len(raw)} bytes; its header {shape} needs exactly {expected_size} "
                        f"bytes (file truncated or corrupt). {how_to_fix(name, root)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def check_labels(labels: np.ndarray, path: Path, root: Path, name: str) -> np.ndarray:
    """The labels as int64, after checking each is a class of dataset `name` (else a `DataError` naming `path`)."""
    labels = np.asarray(labels)
    n_classes = len(get_dataset(name).class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = int(labels.max()) if labels.max() >= n_classes else int(labels.min())
        raise DataError(f"{path}: label {bad} out of range; expected labels 0-{n_classes - 1}. "
                        f"{how_to_fix(name, root)}")
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
        labels = check_labels(read_idx(paths["labels"], IDX_LABELS_MAGIC, root, name), paths["labels"], root, name)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
            raise DataError(f"{paths['images']}: expected (N, 28, 28) images and (N,) labels, got {images.shape} "
                            f"and {labels.shape}. {how_to_fix(name, root)}")
        if len(images) != len(labels):
            raise DataError(f"{paths['images']} holds {len(images)} images but {paths['labels']} holds "
                            f"{len(labels)} labels; expected the same count. {how_to_fix(name, root)}")
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
                                f"{how_to_fix('cifar10', root)}")
            _check_known_checksum(path, root, "cifar10")
            records = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
            labels.append(check_labels(records[:, 0], path, root, "cifar10"))
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
                                f"{how_to_fix('cifar10', root)}")
            try:
                with open(path, "rb") as handle:
                    entry = pickle.load(handle, encoding="latin1")
                data = np.asarray(entry["data"], dtype=np.uint8)
                batch_labels = np.asarray(entry.get("labels", entry.get("fine_labels")))
            except Exception as exc:  # unpicklable or missing keys
                raise DataError(f"{path}: not a CIFAR-10 python batch ({exc}). {how_to_fix('cifar10', root)}") from exc
            if data.ndim != 2 or data.shape[1] != 3072 or len(batch_labels) != len(data):
                raise DataError(f"{path}: expected 'data' of shape (N, 3072) and N labels, got {data.shape} and "
                                f"{len(batch_labels)}. {how_to_fix('cifar10', root)}")
            labels.append(check_labels(batch_labels, path, root, "cifar10"))
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


# ---- the paper's three datasets ---------------------------------------------------------------
def _torchvision_download(class_name: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, class_name)(str(root), train=True, download=True)
        getattr(tvd, class_name)(str(root), train=False, download=True)

    return download


def _mnist_like(name: str, title: str, folder: str, class_names: tuple[str, ...], table: int,
                md5s: tuple[str, str, str, str]) -> DatasetSpec:
    """MNIST and Fashion-MNIST: torchvision's ``<folder>/raw/`` IDX files, 1 x 28 x 28."""
    def loader(root: Path) -> LoaderResult:
        return load_mnist_like(name, root)

    files = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    return DatasetSpec(name=name, title=title, loader=loader, class_names=class_names, image_shape=(1, 28, 28),
                       table=table, reference_csv=f"table{table}_{name}_auroc.csv",
                       checksums={f"{folder}/raw/{f}": md5 for f, md5 in zip(files, md5s)},
                       download=_torchvision_download(folder))


register_dataset(_mnist_like("mnist", "MNIST", "MNIST", tuple(str(i) for i in range(10)), 1,
                             ("2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637",
                              "6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624")))
# Tables 2 and 3 use these class names.
register_dataset(_mnist_like("fashion_mnist", "Fashion-MNIST", "FashionMNIST",
                             ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                              "Ankle boot"), 2,
                             ("8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965",
                              "f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9")))
register_dataset(DatasetSpec(
    name="cifar10", title="CIFAR-10", loader=load_cifar10,
    class_names=("Plane", "Car", "Bird", "Cat", "Deer", "Dog", "Frog", "Horse", "Ship", "Truck"),
    image_shape=(3, 32, 32), table=3, reference_csv="table3_cifar10_auroc.csv",
    # The official binary batches as published (the python batches are checked against
    # torchvision's own list in the loader).
    checksums={f"cifar-10-batches-bin/{batch}.bin": md5 for batch, md5 in (
        ("data_batch_1", "5dd7e06a14cb22eb9f671a540d1b7c25"), ("data_batch_2", "5ea93a67294ea407fff1d09f752e9692"),
        ("data_batch_3", "942cd6a4bcdd0dd3c604fbe906cb4421"), ("data_batch_4", "ae636b3ba5c66a11e91e8cb52e771fcb"),
        ("data_batch_5", "53f37980c15c3d472c316c40844f3f0d"), ("test_batch", "803d5f7f4d78ea53de84dbe85f74fb6d"))},
    download=_torchvision_download("CIFAR10")))
