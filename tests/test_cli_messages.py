"""Command-line messages a user reads: an unknown name said once, and a results folder whose records
were trained on another training set (the old 10% held-out default) refused before anything runs."""
from __future__ import annotations

import json

from benchmark.cli import main
from benchmark.records import iter_records
from fault_methods import cli_args, in_process, write_fake_mnist  # noqa: F401  (in_process is a fixture)


def test_an_unknown_method_is_named_once(capsys, tmp_path):
    code = main(["--dataset", "mnist", "--methods", "ganomly", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown method 'ganomly';" in err and err.count("ganomly") == 1
    assert "did you mean" in err.lower() and "ganomaly" in err


def test_records_of_another_training_set_are_refused_not_mixed(capsys, tmp_path, in_process):  # noqa: F811
    data = write_fake_mnist(tmp_path / "data").parents[1]
    results, reports = tmp_path / "results", tmp_path / "reports"
    assert main(cli_args(data, results, reports, "--val-fraction", "0.1", classes=(0,))) == 0
    ((held_path, held, _),) = list(iter_records(results))
    assert held_path.parts[-5] == "smoke+val0.1" and held["sampling"]["val_fraction"] == 0.1
    # A folder of the default profile holding records made with the old default (10% held out):
    (results / "smoke+val0.1").rename(results / "smoke")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(cli_args(data, results, reports, classes=(0, 1))) == 2
    err = capsys.readouterr().err
    assert "--val-fraction 0.1" in err and "mix two training sets" in err and "mv " in err
    # Nothing trained, nothing lost, no report written.
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # Moved where the message says, the default run trains on every normal image beside them.
    (results / "smoke").rename(results / "smoke+val0.1")
    assert main(cli_args(data, results, reports, classes=(0,))) == 0
    default = json.loads((results / "smoke" / "paper" / "mnist" / "slow" / "class0_seed0.json").read_text())
    assert default["sampling"]["val_fraction"] == 0.0 and "n_val" not in default["sizes"]
    assert default["sizes"]["n_train"] == held["sizes"]["n_train"] + held["sizes"]["n_val"]
