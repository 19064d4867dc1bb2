"""Each detector's default precision and memory format ("use what wins", issue 20): how "auto" and
"default" resolve, that records say what trained them, and that a results folder never holds one
detector in two precisions."""
from __future__ import annotations

import pandas as pd
import pytest

import methods.torch_base as torch_base
from benchmark.cli import main
from benchmark.records import iter_records
from benchmark.reports import precision_note
from fault_methods import cli_args, in_process, write_fake_mnist  # noqa: F401  (in_process is a fixture)
from methods import REGISTRY, get_method
from methods.base import MEMORY_FORMAT_NAMES, TrainOptions
from methods.torch_base import TorchDetector

TORCH_CLASSES = {name: spec.load() for name, spec in REGISTRY.items()
                 if isinstance(spec.load(), type) and issubclass(spec.load(), TorchDetector)}

# What issue 20's measurements chose (the reasons are beside each class's declaration).
CHOSEN = {"ganomaly": ("bf16", "channels_last"), "mem_ganomaly": ("bf16", "channels_last"),
          "f_anogan": ("bf16", "channels_last"), "memae": ("fp32", "channels_last"),
          "dsvdd": ("fp32", "channels_last"), "dagmm": ("fp32", "nchw")}


@pytest.mark.parametrize("name", sorted(TORCH_CLASSES))
def test_every_torch_detector_declares_a_valid_default(name):
    cls = TORCH_CLASSES[name]
    assert cls.default_precision in ("fp32", "bf16")
    assert cls.default_memory_format in MEMORY_FORMAT_NAMES and cls.default_memory_format != "default"


@pytest.mark.parametrize("name", sorted(CHOSEN))
def test_auto_resolves_to_the_measured_choice_where_bf16_is_native(name, monkeypatch):
    det = get_method(name).load()(device="cpu")
    monkeypatch.setattr(torch_base, "native_bf16", lambda device: True)
    resolved = det.resolve_train_options(TrainOptions())
    assert (resolved.precision, resolved.memory_format) == CHOSEN[name]
    # Without native bf16 kernels (emulated bf16 is slower), auto keeps fp32; the layout stays.
    monkeypatch.setattr(torch_base, "native_bf16", lambda device: False)
    resolved = det.resolve_train_options(TrainOptions())
    assert (resolved.precision, resolved.memory_format) == ("fp32", CHOSEN[name][1])


def test_explicit_options_pass_unchanged_and_graphs_keep_fp32(monkeypatch):
    monkeypatch.setattr(torch_base, "native_bf16", lambda device: True)
    det = get_method("ganomaly").load()(device="cpu")
    for precision in ("fp32", "bf16"):
        for layout in ("nchw", "channels_last"):
            options = TrainOptions(precision=precision, memory_format=layout)
            assert det.resolve_train_options(options) == options
    graphed = det.resolve_train_options(TrainOptions(cuda_graphs=True))
    assert graphed.precision == "fp32" and graphed.cuda_graphs  # graphs are captured in fp32 only


def _records(results):
    return {path.name: record for path, record, _ in iter_records(results) if record is not None}


def test_a_folder_never_holds_one_detector_in_two_precisions(capsys, tmp_path, in_process, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch_base, "native_bf16", lambda device: True)  # auto -> bf16 for GANomaly on any CPU
    data = write_fake_mnist(tmp_path / "data").parents[1]
    results, reports = tmp_path / "results", tmp_path / "reports"
    assert main(cli_args(data, results, reports, "--precision", "fp32", classes=(0,), methods=("ganomaly",))) == 0
    (first,) = _records(results).values()
    assert first["run_info"]["precision"] == "fp32" and first["run_info"]["precision_asked"] == "fp32"
    assert first["run_info"]["memory_format"] == "channels_last"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    # The default (auto) would train GANomaly in bf16 beside its fp32 record: refused, nothing touched.
    assert main(cli_args(data, results, reports, classes=(0, 1), methods=("ganomaly",))) == 2
    err = capsys.readouterr().err
    assert "two training precisions" in err and "1 record(s) trained in fp32" in err and "in bf16" in err
    assert "--precision fp32" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # With the precision the folder holds, the run goes on beside it.
    assert main(cli_args(data, results, reports, "--precision", "fp32", classes=(0, 1), methods=("ganomaly",))) == 0
    assert {r["run_info"]["precision"] for r in _records(results).values()} == {"fp32"}
    # A fresh folder at the default: GANomaly's record says bf16, what auto chose.
    fresh = tmp_path / "fresh"
    assert main(cli_args(data, fresh, reports, classes=(0,), methods=("ganomaly",))) == 0
    (record,) = _records(fresh).values()
    info = record["run_info"]
    assert (info["precision"], info["precision_asked"], info["memory_format"]) == ("bf16", "auto", "channels_last")


def test_the_tables_say_which_detectors_trained_in_bf16_and_name_a_mixed_one():
    rows = [("GANomaly", "mnist", "bf16"), ("GANomaly", "mnist", "bf16"), ("MemAE", "mnist", "fp32"),
            ("iForest", "mnist", "fp32")]
    frame = pd.DataFrame(rows, columns=["label", "dataset", "precision"])
    expected = "Training precision (each record's run_info): bf16: GANomaly; fp32: MemAE, iForest."  # sorted labels
    assert precision_note(frame) == expected
    assert precision_note(frame[frame["precision"] == "fp32"]) == ""  # all fp32: nothing to say
    mixed = pd.concat([frame, pd.DataFrame([("MemAE", "mnist", "bf16")], columns=frame.columns)])
    note = precision_note(mixed)
    assert "fp32: iForest." in note and "MIXED precisions within one detector's results: MemAE on mnist" in note
