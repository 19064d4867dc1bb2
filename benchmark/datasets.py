"""The dataset registry: one `DatasetSpec` per dataset, the only place a dataset is described.

`benchmark.data` loads through it, the command line takes its dataset names from it and the
reports take each dataset's title, paper table and reference CSV from it. Adding a dataset =
one loader function and one `register_dataset(DatasetSpec(...))` call (see README.md, "Adding a
dataset"). A loader reads the files under the data root and returns
`(train_images, train_labels, test_images, test_labels, source)`: uint8 images (N, C, H, W),
integer labels and a string naming the files read; it raises `FileNotFoundError` for a missing
file (which triggers the download, when the spec has one) and `benchmark.data.DataError` for a
bad one.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

LoaderResult = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]


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
    import difflib

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


# ---- the paper's three datasets (loaders and file checks in benchmark/data.py) -----------------
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
        from benchmark.data import load_mnist_like

        return load_mnist_like(name, root)

    files = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    return DatasetSpec(name=name, title=title, loader=loader, class_names=class_names, image_shape=(1, 28, 28),
                       table=table, reference_csv=f"table{table}_{name}_auroc.csv",
                       checksums={f"{folder}/raw/{f}": md5 for f, md5 in zip(files, md5s)},
                       download=_torchvision_download(folder))


def _cifar10(root: Path) -> LoaderResult:
    from benchmark.data import load_cifar10

    return load_cifar10(root)


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
    name="cifar10", title="CIFAR-10", loader=_cifar10,
    class_names=("Plane", "Car", "Bird", "Cat", "Deer", "Dog", "Frog", "Horse", "Ship", "Truck"),
    image_shape=(3, 32, 32), table=3, reference_csv="table3_cifar10_auroc.csv",
    # The official binary batches as published (the python batches are checked against
    # torchvision's own list in the loader).
    checksums={f"cifar-10-batches-bin/{batch}.bin": md5 for batch, md5 in (
        ("data_batch_1", "5dd7e06a14cb22eb9f671a540d1b7c25"), ("data_batch_2", "5ea93a67294ea407fff1d09f752e9692"),
        ("data_batch_3", "942cd6a4bcdd0dd3c604fbe906cb4421"), ("data_batch_4", "ae636b3ba5c66a11e91e8cb52e771fcb"),
        ("data_batch_5", "53f37980c15c3d472c316c40844f3f0d"), ("test_batch", "803d5f7f4d78ea53de84dbe85f74fb6d"))},
    download=_torchvision_download("CIFAR10")))
