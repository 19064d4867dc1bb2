"""Issue 6, reliability, on bad input: a bad command line or a corrupt / mismatched data file
ends with exit code 2 and a message naming the valid choices or the file, before any training
(no record written). Also the good path of every data layout the loader reads."""
from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmark.cli import main, prog_name
from benchmark.data import CIFAR_BIN_SIZE, DATASETS, DataError, load_dataset
from fault_methods import (
    cifar_arrays,
    cli_args,
    fake_images,
    idx_bytes,
    write_fake_cifar_bin,
    write_fake_cifar_py,
    write_fake_mnist,
)

pytestmark = pytest.mark.usefixtures("in_process")  # from fault_methods, through conftest.py
DATASET_CHOICES = f"{', '.join(DATASETS)}, all"  # the registry's, so a new dataset changes no test
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake_mnist(tmp_path_factory.mktemp("data")).parents[1]


def _nothing_written(results: Path) -> bool:
    return not results.exists()  # not even an empty folder


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "svhn"], f"unknown dataset 'svhn'; valid choices: {DATASET_CHOICES}"),
    (["--methods", "slow", "nope"], "unknown method 'nope'"),
    (["--methods", "pyod:no_such_model"], "unknown method 'pyod:no_such_model'"),
    (["--classes", "10"], "unknown class '10'; valid choices: 0-9 or 0, 1, 2"),
    (["--classes", "Cat"], "unknown class 'Cat'; valid choices: 0-9"),
    (["--profile", "fast"], "unknown profile 'fast'; valid choices: paper, quick, smoke"),
    (["--protocol", "mine"], "unknown protocol 'mine'; valid choices: paper, standard"),
    (["--set", "epochs=0"], "bad hyperparameters for slow on mnist: epochs must be a positive integer, got 0"),
    (["--set", "slow.epochs=-3"], "epochs must be a positive integer, got -3"),
    (["--set", "epochs=1.5"], "epochs must be a positive integer, got 1.5"),
    (["--set", "epochs=many"], "epochs must be a positive integer, got 'many'"),
    (["--set", "batch_size=0"], "batch_size must be a positive integer, got 0"),
    (["--set", "memory_size=-1"], "memory_size must be a positive integer, got -1"),
    (["--set", "slow.lr=0.1"], "slow has no hyperparameter 'lr'; valid: batch_size, epochs, memory_size, random_state"),
    (["--set", "epochs"], "--set expects [METHOD.]PARAM=VALUE, got 'epochs'"),
    (["--seeds", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
    (["--seeds", "4294967296"], "seed must be an integer in [0, 4294967295], got 4294967296"),
    (["--seeds", "one"], "seed must be an integer in [0, 4294967295], got 'one'"),
    (["--jobs", "0"], "--jobs must be an integer in [1, 512], got 0"),
    (["--device", "cuda:7"], "'cuda:7'"),
    (["--device", "tpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
])
def test_usage_errors_exit_2_with_the_valid_choices_before_any_work(data, tmp_path, capsys, extra, message):
    results = tmp_path / "results"
    args = cli_args(data, results, tmp_path / "reports")
    # later options win: --dataset / --methods / --classes / ... given again replace the defaults
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog_name()}: error: ") and message in err
    assert _nothing_written(results)


def test_missing_dataset_option_lists_the_datasets(tmp_path, capsys):
    assert main(["--results-dir", str(tmp_path / "results")]) == 2
    assert f"--dataset is required; valid choices: {DATASET_CHOICES}" in capsys.readouterr().err


# ---- data files ------------------------------------------------------------------------------
def _mnist_file(root: Path, name: str) -> Path:
    return root / "MNIST" / "raw" / name


def _set_magic(root: Path) -> Path:
    path = _mnist_file(root, "train-images-idx3-ubyte")
    path.write_bytes((2049).to_bytes(4, "big") + path.read_bytes()[4:])
    return path


def _truncate(root: Path) -> Path:
    path = _mnist_file(root, "t10k-images-idx3-ubyte")
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _bad_label(root: Path) -> Path:
    path = _mnist_file(root, "t10k-labels-idx1-ubyte")
    raw = bytearray(path.read_bytes())
    raw[-1] = 12
    path.write_bytes(bytes(raw))
    return path


def _label_count(root: Path) -> Path:
    path = _mnist_file(root, "t10k-labels-idx1-ubyte")
    path.write_bytes(idx_bytes(np.zeros(99, np.uint8)))
    return _mnist_file(root, "t10k-images-idx3-ubyte")


def _cifar_sized_images(root: Path) -> Path:
    path = _mnist_file(root, "train-images-idx3-ubyte")
    path.write_bytes(idx_bytes(fake_images(np.repeat(np.arange(10), 30), 1, 32, 0)[:, 0]))
    return path


def _missing(root: Path) -> Path:
    path = _mnist_file(root, "train-labels-idx1-ubyte")
    path.unlink()
    return path


def _official_size_flipped(root: Path) -> Path:
    """The official t10k images with one byte flipped (a copy of the real file when there is one,
    else a file of the official size and header): the known MD5 must catch it."""
    path = _mnist_file(root, "t10k-images-idx3-ubyte")
    real = SHARED_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    if real.is_file():
        shutil.copy(real, path)
    else:
        path.write_bytes(idx_bytes(np.zeros((10000, 28, 28), np.uint8)))
    raw = bytearray(path.read_bytes())
    raw[5000] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def _official_size_flipped_gz(root: Path) -> Path:
    plain = _official_size_flipped(root)
    with gzip.open(f"{plain}.gz", "wb", compresslevel=1) as handle:
        handle.write(plain.read_bytes())
    plain.unlink()
    return Path(f"{plain}.gz")


def _truncated_gz(root: Path) -> Path:
    plain = _mnist_file(root, "train-images-idx3-ubyte")
    packed = gzip.compress(plain.read_bytes())
    Path(f"{plain}.gz").write_bytes(packed[: len(packed) // 2])
    plain.unlink()
    return Path(f"{plain}.gz")


def _cifar_bin_wrong_size(root: Path) -> Path:
    path = root / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes() + b"\0" * 5)
    return path


def _cifar_bin_official_size_corrupt(root: Path) -> Path:
    path = root / "cifar-10-batches-bin" / "test_batch.bin"
    with open(path, "wb") as handle:  # official size, all zeros (sparse: no disk used)
        handle.truncate(CIFAR_BIN_SIZE)
    return path


def _cifar_py_not_official(root: Path) -> Path:
    return root / "cifar-10-batches-py" / "data_batch_1"


@pytest.mark.parametrize("dataset, corrupt, message", [
    ("mnist", _set_magic, "wrong IDX magic number 2049 (0x00000801); expected 2051"),
    ("mnist", _truncate, "wrong size 78316 bytes; its header (100, 28, 28) needs exactly 78416 bytes"),
    ("mnist", _bad_label, "label 12 out of range; expected labels 0-9"),
    ("mnist", _label_count, "holds 100 images but"),
    ("mnist", _cifar_sized_images, "expected (N, 28, 28) images and (N,) labels, got (300, 32, 32)"),
    ("mnist", _missing, "file not found"),
    ("mnist", _official_size_flipped,
     "checksum mismatch (MD5 differs from the official file's 2646ac647ad5339dbf082846283269ea)"),
    ("mnist", _official_size_flipped_gz, "checksum mismatch (MD5 of its decompressed content differs"),
    ("mnist", _truncated_gz, "cannot read"),
    ("cifar10", _cifar_bin_wrong_size, "wrong size 61465 bytes; expected records of 1 label byte + 3,072 pixel bytes"),
    ("cifar10", _cifar_bin_official_size_corrupt,
     "checksum mismatch (MD5 differs from the official file's 803d5f7f4d78ea53de84dbe85f74fb6d)"),
    # The python batches are fixed published files (torchvision checks the same MD5s), so
    # anything else in cifar-10-batches-py is refused, even a well-formed pickle.
    ("cifar10", _cifar_py_not_official, "checksum mismatch (expected MD5 c99cafc152244af753f735de768cd75f)"),
])
def test_corrupt_data_exit_2_naming_the_file_before_training(tmp_path, capsys, dataset, corrupt, message):
    root = tmp_path / "data"
    if corrupt is _cifar_py_not_official:
        write_fake_cifar_py(root)
    elif dataset == "cifar10":
        write_fake_cifar_bin(root)
    else:
        write_fake_mnist(root)
    path = corrupt(root)
    results = tmp_path / "results"
    assert main(cli_args(root, results, tmp_path / "reports", dataset=dataset, classes=(0,))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog_name()}: data error: {path}")
    assert message in err
    assert _nothing_written(results)


def test_cifar_python_batch_that_is_no_pickle(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    md5s = write_fake_cifar_py(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(b"not a pickle")
    md5s["data_batch_2"] = hashlib.md5(bad.read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5s["test_batch"]]])
    with pytest.raises(DataError, match=f"{bad}: not a CIFAR-10 python batch"):
        load_dataset("cifar10", tmp_path, download=False)


# ---- good paths -----------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_raw_and_gz(tmp_path, gz):
    write_fake_mnist(tmp_path, folder="FashionMNIST", gz=gz)
    data = load_dataset("fashion_mnist", tmp_path, download=False)
    assert data.train_images.shape == (300, 1, 28, 28) and data.test_images.shape == (100, 1, 28, 28)
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int64
    np.testing.assert_array_equal(data.train_labels, np.repeat(np.arange(10), 30))
    np.testing.assert_array_equal(data.test_images[:, 0], fake_images(np.repeat(np.arange(10), 10), 1, 28, 1)[:, 0])
    assert data.source.endswith("FashionMNIST/raw") and data.class_names[9] == "Ankle boot"


def _check_cifar(data) -> None:
    images, labels = cifar_arrays(3, 5)  # the test batch (seed 5 of write_fake_cifar_*)
    assert data.train_images.shape == (100, 3, 32, 32) and data.test_images.shape == (30, 3, 32, 32)
    np.testing.assert_array_equal(data.test_images, images)
    np.testing.assert_array_equal(data.test_labels, labels)
    np.testing.assert_array_equal(np.bincount(data.train_labels), [10] * 10)


def test_cifar_binary_batches(tmp_path, capsys):
    write_fake_cifar_bin(tmp_path / "data")
    _check_cifar(load_dataset("cifar10", tmp_path / "data", download=False))
    # and end to end through the CLI, on 3-channel images
    results = tmp_path / "results"
    assert main(cli_args(tmp_path / "data", results, tmp_path / "reports", dataset="cifar10", classes=(0,))) == 0
    assert (results / "smoke" / "paper" / "cifar10" / "slow" / "class0_seed0.json").is_file()


def test_cifar_python_batches_with_their_checksums(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    md5s = write_fake_cifar_py(tmp_path)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5s["test_batch"]]])
    data = load_dataset("cifar10", tmp_path, download=False)
    _check_cifar(data)
    assert data.source.endswith("cifar-10-batches-py")
