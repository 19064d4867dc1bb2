"""The README's worked example of adding a dataset runs as written: one loader and one registry
entry make it loadable, checked, selectable on the command line and runnable end to end."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import benchmark.datasets as datasets
import methods.mem_ganomaly as mem_ganomaly
from benchmark.cli import build_jobs, main, parse_config
from benchmark.data import CLASS_NAMES, DATASETS, DataError, load_dataset
from benchmark.profiles import PROFILE_NAMES
from benchmark.records import iter_records
from methods import DEFAULT

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


def _write_files(root: Path) -> None:
    """Write tiny_shapes.npz into `root` with the README's own script (`# make_tiny_shapes.py`)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    script = next(b for b in blocks if b.startswith("# make_tiny_shapes.py"))
    previous = os.environ.get("MEMGAN_DATA")
    os.environ["MEMGAN_DATA"] = str(root)
    try:
        exec(compile(script, "make_tiny_shapes.py", "exec"), {"__name__": "__main__"})
    finally:
        if previous is None:
            del os.environ["MEMGAN_DATA"]
        else:
            os.environ["MEMGAN_DATA"] = previous


def test_one_entry_makes_the_dataset_known_everywhere(tiny_shapes, tmp_path):
    assert tiny_shapes.name in DATASETS and CLASS_NAMES["tiny_shapes"] == ["square", "cross"]
    _write_files(tmp_path)
    data = load_dataset("tiny_shapes", tmp_path, download=False)
    assert data.train_images.shape == (200, 1, 28, 28) and data.class_names == ("square", "cross")
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
def test_run_end_to_end_from_the_command_line(tiny_shapes, tmp_path):
    _write_files(tmp_path / "data")
    common = ["--dataset", "tiny_shapes", "--data-root", str(tmp_path / "data"), "--no-download", "--no-progress",
              "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports")]
    assert main([*common, "--methods", "iforest", "--profile", "smoke", "--classes", "square"]) == 0
    records = [record for _, record, _ in iter_records(tmp_path / "results" / "smoke")]
    assert len(records) == 1 and records[0]["dataset"] == "tiny_shapes" and records[0]["normal_class"] == 0
    assert records[0]["status"] == "ok" and records[0]["metrics"]["auroc"] > 0.9
    assert "tiny_shapes" in (tmp_path / "reports" / "smoke" / "records.csv").read_text()

    # A method whose PROFILES names each paper dataset gives the new one its declared default
    # ("*"), under every profile: never a usage error, never the paper's full budget by accident.
    for profile in PROFILE_NAMES:
        args = parse_config([*common, "--methods", "mem_ganomaly", "--profile", profile])
        jobs = build_jobs(args)
        expected = mem_ganomaly.PROFILES[profile][DEFAULT]
        assert jobs and all({k: job.params[k] for k in expected} == expected for job in jobs)
