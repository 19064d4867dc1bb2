"""The README's worked example of adding a dataset runs as written: one loader and one registry
entry make it loadable, checked, selectable on the command line and runnable end to end."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import benchmark.datasets as datasets
from benchmark.cli import main
from benchmark.data import CLASS_NAMES, DATASETS, DataError, load_dataset
from benchmark.records import iter_records

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if b.startswith("# benchmark/datasets.py"))


@pytest.fixture
def tiny_shapes(monkeypatch):
    """Register the README's dataset (in a copy of the registry, dropped after the test)."""
    monkeypatch.setattr(datasets, "DATASET_REGISTRY", dict(datasets.DATASET_REGISTRY))
    exec(compile(_readme_block(), "benchmark/datasets.py", "exec"), vars(datasets) | {"np": np})
    yield datasets.DATASET_REGISTRY["tiny_shapes"]


def _write_files(root: Path, n: int = 200, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    square = np.zeros((8, 8), np.uint8)
    square[2:6, 2:6] = 220
    cross = np.zeros((8, 8), np.uint8)
    cross[3:5, :] = cross[:, 3:5] = 220

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(count) % 2
        images = np.where(labels[:, None, None] == 0, square, cross)[:, None]
        noise = rng.integers(0, 20, images.shape)
        return (images + noise).astype(np.uint8), labels.astype(np.int64)

    x_train, y_train = split(n)
    x_test, y_test = split(n // 2)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "tiny_shapes.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def test_one_entry_makes_the_dataset_known_everywhere(tiny_shapes, tmp_path):
    assert tiny_shapes.name in DATASETS and CLASS_NAMES["tiny_shapes"] == ["square", "cross"]
    _write_files(tmp_path)
    data = load_dataset("tiny_shapes", tmp_path, download=False)
    assert data.train_images.shape == (200, 1, 8, 8) and data.class_names == ("square", "cross")
    with pytest.raises(DataError, match="--data-root.*MEMGAN_DATA"):
        load_dataset("tiny_shapes", tmp_path / "elsewhere", download=False)


def test_loaded_arrays_are_checked_against_the_entry(tiny_shapes, tmp_path):
    _write_files(tmp_path)
    with np.load(tmp_path / "tiny_shapes.npz") as files:
        arrays = dict(files)
    arrays["y_test"] = arrays["y_test"] + 1  # label 2 of a two-class dataset
    np.savez(tmp_path / "tiny_shapes.npz", **arrays)
    with pytest.raises(DataError, match="label 2 out of range; expected labels 0-1"):
        load_dataset("tiny_shapes", tmp_path, download=False)


@pytest.mark.usefixtures("in_process")
def test_run_end_to_end_from_the_command_line(tiny_shapes, tmp_path, capsys):
    _write_files(tmp_path / "data")
    common = ["--dataset", "tiny_shapes", "--data-root", str(tmp_path / "data"), "--no-download", "--no-progress",
              "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports")]
    assert main([*common, "--methods", "iforest", "--profile", "smoke", "--classes", "square"]) == 0
    records = [record for _, record, _ in iter_records(tmp_path / "results" / "smoke")]
    assert len(records) == 1 and records[0]["dataset"] == "tiny_shapes" and records[0]["normal_class"] == 0
    assert records[0]["status"] == "ok" and records[0]["metrics"]["auroc"] > 0.9
    assert "tiny_shapes" in (tmp_path / "reports" / "smoke" / "records.csv").read_text()
    # A method whose PROFILES names each dataset has no budget for the new one: a usage error
    # naming it, not the paper's full budget.
    capsys.readouterr()
    other_results = ["--results-dir", str(tmp_path / "r2")]
    assert main([*common, "--methods", "mem_ganomaly", "--profile", "quick", *other_results]) == 2
    assert "'mem_ganomaly' has no settings for dataset 'tiny_shapes' under profile 'quick'" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
