"""What a user meets first: --version, one program name, "did you mean" for unknown names, and
nothing on disk after a usage or data error (not even an empty results/ or ./data)."""
from __future__ import annotations

import dataclasses

import pytest

import benchmark.datasets as datasets
from benchmark import __version__
from benchmark.cli import main, package_version, prog_name
from benchmark.data import DataError, load_dataset

pytestmark = pytest.mark.usefixtures("in_process")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"{prog_name()} {package_version()}"
    assert package_version().split(".")[0] == __version__.split(".")[0]


@pytest.mark.parametrize("extra, suggestion", [
    (["--dataset", "minst"], "did you mean 'mnist'?"),
    (["--dataset", "mnist", "--methods", "memgan"], "did you mean 'memae'?"),
    (["--dataset", "mnist", "--methods", "mem_gan0maly"], "did you mean 'mem_ganomaly'?"),
    (["--dataset", "mnist", "--profile", "quik"], "did you mean 'quick'?"),
    (["--dataset", "mnist", "--protocol", "standrad"], "did you mean 'standard'?"),
])
def test_unknown_names_get_a_close_match(tmp_path, capsys, extra, suggestion):
    assert main([*extra, "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog_name()}: error: unknown ") and suggestion in err
    assert not (tmp_path / "results").exists()


def test_no_suggestion_when_nothing_is_close(tmp_path, capsys):
    assert main(["--dataset", "svhn", "--results-dir", str(tmp_path / "results")]) == 2
    assert "did you mean" not in capsys.readouterr().err


@pytest.fixture
def failing_download(monkeypatch):
    def download(root):
        (root / "MNIST" / "raw").mkdir(parents=True)  # what a download starts with, before failing
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets, "DATASET_REGISTRY", dict(datasets.DATASET_REGISTRY))
    datasets.register_dataset(dataclasses.replace(datasets.get_dataset("mnist"), download=download))


@pytest.mark.usefixtures("failing_download")
def test_failed_download_leaves_no_empty_data_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEMGAN_DATA", raising=False)
    assert main(["--dataset", "mnist", "--methods", "iforest", "--profile", "smoke", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog_name()}: data error: could not download mnist")
    assert "--data-root" in err and "MEMGAN_DATA" in err
    assert sorted(tmp_path.iterdir()) == []  # neither ./data nor ./results


@pytest.mark.usefixtures("failing_download")
def test_failed_download_keeps_an_existing_data_root(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError):
        load_dataset("mnist", tmp_path / "mine" / "sub" / "data")
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "sub").exists()


def test_missing_files_error_names_both_ways_to_set_the_data_root(tmp_path, capsys):
    assert main(["--dataset", "mnist", "--methods", "iforest", "--no-download", "--data-root", str(tmp_path / "none"),
                 "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "--data-root" in err and "MEMGAN_DATA" in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "none").exists()
