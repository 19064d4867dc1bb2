"""Sensitivity sweeps (benchmark/sweeps.py, `run_all.py --sweep`): spec parsing and usage
errors (benchmark/cli.py), the fixed directory naming, the table's numbers, and an end-to-end resumable run."""
from __future__ import annotations

import pytest

from benchmark.cli import UsageError, main, parse_config, parse_sweep, sweep_variants
from benchmark.sweeps import SweepSpec, load_sweep, sensitivity_table, write_sensitivity
from fault_methods import write_fake_mnist
from record_factory import write_fake_record


def test_parse_sweep_and_directory_names():
    spec = parse_sweep("mem_ganomaly.lr=2e-3, 1e-3,5e-4", "quick")
    assert spec == SweepSpec("mem_ganomaly", "lr", ("2e-3", "1e-3", "5e-4"), (0.002, 0.001, 0.0005), "Mem_GANomaly")
    assert spec.parsed_values() == [0.002, 0.001, 0.0005]
    assert spec.profile_values["mnist"] == 0.002  # the quick profile's lr, for the tables' footers
    assert SweepSpec("iforest", "n_estimators", ("5", "7")).parsed_values() == ["5", "7"]  # unparsed: as written
    assert spec.profile_dir("quick", "2e-3") == "quick+sweep-mem_ganomaly.lr=2e-3"
    memory = parse_sweep("mem_ganomaly.memory_size=50,500")
    assert memory.profile_dir("quick", "500", "epochs=3") == "quick+sweep-mem_ganomaly.memory_size=500+epochs=3"


@pytest.mark.parametrize("text, message", [
    ("nope.lr=1,2", "unknown method 'nope'"),
    ("mem_ganomaly.nope=1,2", "no hyperparameter 'nope'"),
    ("mem_ganomaly.lr=", "empty value"),
    ("mem_ganomaly.lr=1e-3,,2e-3", "empty value"),
    ("lr=1e-3", "METHOD.PARAM=v1,v2"),
    ("mem_ganomaly.random_state=1,2", "--seeds"),
    ("mem_ganomaly.lr=1e-3,1e-3", "repeated"),
])
def test_bad_sweep_specs(text, message):
    with pytest.raises(UsageError, match=message):
        parse_sweep(text)


def test_cli_variants_carry_the_set_tag_and_overrides():
    args = parse_config(["--dataset", "cifar10", "--profile", "quick", "--sweep", "mem_ganomaly.memory_size=50,500",
                         "--set", "mem_ganomaly.epochs=3"])
    assert args.methods == ["mem_ganomaly"]
    variants = sweep_variants(args)
    assert [v.profile_dir for v in variants] == ["quick+sweep-mem_ganomaly.memory_size=50+epochs=3",
                                                 "quick+sweep-mem_ganomaly.memory_size=500+epochs=3"]
    assert variants[1].override_map == {"mem_ganomaly": {"epochs": 3, "memory_size": 500}}


@pytest.mark.parametrize("extra", [
    ["--sweep", "nope.lr=1"],
    ["--sweep", "iforest.n_estimators=5", "--sweep", "iforest.max_features=0.5"],   # one sweep per run
    ["--sweep", "iforest.n_estimators=5", "--methods", "dagmm"],
    ["--sweep", "iforest.n_estimators=5,-1"],                                        # a bad value: no job runs
    ["--sweep", "iforest.n_estimators=5", "--set", "iforest.n_estimators=7"],
])
def test_cli_usage_errors_exit_2_and_write_nothing(extra, tmp_path, capsys):
    results, reports = tmp_path / "results", tmp_path / "reports"
    code = main(["--dataset", "mnist", "--profile", "smoke", "--results-dir", str(results),
                 "--reports-dir", str(reports),
                 "--data-root", str(tmp_path / "nodata"), "--no-download", *extra])
    assert code == 2
    assert ": error:" in capsys.readouterr().err
    assert not results.exists() and not reports.exists()


def test_sensitivity_table_numbers(tmp_path):
    spec = SweepSpec("mem_ganomaly", "lr", ("2e-3", "2e-4"), (2e-3, 2e-4), "Mem_GANomaly", {"mnist": 0.002})
    aurocs = {("2e-3", 0): (0.4, 0.6), ("2e-3", 2): (0.3, 0.5), ("2e-4", 0): (0.9, 0.9), ("2e-4", 2): (0.8,)}
    for (value, c), values in aurocs.items():
        for seed, auroc in enumerate(values):
            write_fake_record(tmp_path, "mnist", c, "mem_ganomaly", auroc, seed=seed,
                              profile=spec.profile_dir("quick", value))
    table, footer = sensitivity_table(load_sweep(tmp_path, "quick", spec), spec, "mnist")
    # 2e-3: class 0 0.5 ± 0.1414; class 2 0.4 ± 0.1414; per seed (0.35, 0.55) -> 0.45 ± 0.1414
    assert table.loc["2e-3"].tolist() == ["0.5000 ± 0.1414", "0.4000 ± 0.1414", "0.4500 ± 0.1414"]
    # 2e-4: class 2 has one seed; only seed 0 has both classes -> (0.9 + 0.8) / 2 on one seed
    assert table.loc["2e-4"].tolist() == ["0.9000 ± 0.0000", "0.8000 (n=1)", "0.8500 (n=1)"]
    assert "`0.002`" in footer  # the quick profile's lr


def test_end_to_end_sweep_resumes_and_rebuilds_from_records(tmp_path, capsys, monkeypatch):
    tables = []  # the per-value standard reports (tested in test_reports): only their folders here
    monkeypatch.setattr("benchmark.cli.write_reports",
                        lambda results, reports, profile, protocol: tables.append(profile) or [])
    data = tmp_path / "data"
    write_fake_mnist(data)
    results, reports = tmp_path / "results", tmp_path / "reports"
    args = ["--dataset", "mnist", "--classes", "0", "1", "--profile", "smoke", "--data-root", str(data),
            "--no-download", "--no-progress", "--results-dir", str(results), "--reports-dir", str(reports),
            "--sweep", "iforest.n_estimators=3,10"]
    assert main(args) == 0
    for value in (3, 10):
        record = (results / f"smoke+sweep-iforest.n_estimators={value}" / "paper" / "mnist" / "iforest"
                  / "class1_seed0.json")
        assert f'"n_estimators": {value}' in record.read_text()
    md = reports / "smoke" / "sensitivity_iforest.n_estimators_mnist.md"
    png = md.with_suffix(".png")
    assert png.stat().st_size > 1000 and "| 3 " in md.read_text() and "| 10 " in md.read_text()
    assert tables == ["smoke+sweep-iforest.n_estimators=3", "smoke+sweep-iforest.n_estimators=10"]
    capsys.readouterr()
    assert main(args) == 0                                       # resumable: nothing to run again
    assert "2 jobs: 2 already recorded, 0 to run" in capsys.readouterr().out
    md.unlink()
    assert main([*args, "--report-only"]) == 0
    assert md.exists()
    assert write_sensitivity(results, reports, "smoke", SweepSpec("iforest", "n_estimators", ("99",))) == []
