"""The README's worked examples run as written: the detector example through the registry and
the runner (one new file + one registry line), and both examples (a detector, a dataset with the
script making its file) applied together to a copy of the package, which stays lint-clean and
green."""
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import methods
from benchmark.records import JobKey, read_record
from benchmark.runner import Job, RunSettings, run_job

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_block(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``, as written.

    Parameters
    ----------
    first_line : str
        The block's first line, e.g. ``"# methods/mean_distance.py"``.

    Returns
    -------
    str
        The block's code.
    """
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if b.startswith(first_line))


def _readme_blocks() -> tuple[str, str]:
    return readme_block("# methods/mean_distance.py"), readme_block('register("mean_distance"').strip()


def register_readme_example(monkeypatch) -> None:
    """Add the README's detector to (a copy of) the registry, as the README says, for one test.
    test_reports.py runs every report test once more with it registered."""
    module_code, registry_line = _readme_blocks()
    module = types.ModuleType("methods.mean_distance")
    exec(compile(module_code, "methods/mean_distance.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "methods.mean_distance", module)
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
    exec(registry_line, {"register": methods.register})


def test_readme_detector_example(monkeypatch, separable_task, tmp_path):
    register_readme_example(monkeypatch)
    spec = methods.get_method("mean_distance")
    assert spec.label == "MeanDistance"
    X_train, X_test, y_test = separable_task(n_train=50)
    detector = spec.load()(**spec.settings("quick", "mnist")).fit(X_train)
    scores = detector.decision_function(X_test)
    assert scores.shape == (len(X_test),) and roc_auc_score(y_test, scores) > 0.9

    # ...and the runner accepts it like any other method.
    import benchmark.jobs as jobs

    task = types.SimpleNamespace(x_train=X_train, x_test=X_test, y_test=y_test, sample_seed=1,
                                 sizes={"n_train": len(X_train), "n_test": len(X_test)})
    monkeypatch.setattr(jobs, "_task", lambda *args: task)
    key = JobKey("mnist", 0, "mean_distance", 0, "smoke", "paper")
    settings = RunSettings(results_dir=tmp_path, data_root=None, download=False, threads_per_job=1,
                           track_auroc=False, overrides={}, provenance={})
    outcome = run_job(Job(key, "smoke", {"random_state": 0}, spec.target), settings)
    assert outcome.status == "ok", outcome.message
    record = read_record(key.json_path(tmp_path))
    assert record["metrics"]["auroc"] > 0.9 and record["hyperparameters"] == {"power": 2.0, "random_state": 0}
    assert np.isfinite(record["metrics"]["gmean"])


def _apply_readme_examples(copy: Path) -> None:
    """Copy the project to ``copy`` and apply both README examples there as the README says."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("benchmark", "methods", "tests"):
        shutil.copytree(REPO / folder, copy / folder, ignore=ignore)
    for name in ("run_all.py", "README.md", "pyproject.toml"):
        shutil.copy2(REPO / name, copy / name)
    datasets_py = copy / "benchmark" / "datasets.py"
    datasets_py.write_text(datasets_py.read_text() + "\n\n" + readme_block("# benchmark/datasets.py"))
    module_code, registry_line = _readme_blocks()
    (copy / "methods" / "mean_distance.py").write_text(module_code)
    init = copy / "methods" / "__init__.py"
    lines = init.read_text().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.startswith("register("))
    init.write_text("".join([*lines[:last + 1], registry_line + "\n", *lines[last + 1:]]))
    (copy / "make_tiny_shapes.py").write_text(readme_block("# make_tiny_shapes.py"))


def test_both_readme_examples_keep_a_copy_of_the_project_green(tmp_path, shared_data):
    """Apply the README's "Adding a detector" and "Adding a dataset" examples to a copy of the
    project, then: `ruff check` (the repository's settings) passes on every file they touch; the
    README's script writes tiny_shapes.npz; the registry tests and `test_every_profiles_entry_is_valid`
    for every detector (with tiny_shapes registered) and the contract tests of the new detector
    pass; `run_all.py --dataset tiny_shapes --methods iforest mean_distance --profile smoke` runs;
    and `run_all.py --dataset all --profile smoke --estimate` exits 0.

    The estimate is restricted with --methods to f_anogan, mem_ganomaly and dsvdd (the detectors
    whose missing budgets once broke it) and the new detector, to keep the test near a minute (its
    calibrations are most of the time): every detector resolves its settings through the same
    `MethodSpec.settings`, checked for all of them by the contract test above.
    """
    copy = tmp_path / "repo"
    _apply_readme_examples(copy)
    touched = ["benchmark/datasets.py", "methods/__init__.py", "methods/mean_distance.py", "make_tiny_shapes.py"]
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
                           str(REPO / "pyproject.toml"), *touched], cwd=copy, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    data = tmp_path / "data"  # the real datasets (linked) and the README's file
    data.mkdir()
    for entry in shared_data.iterdir():
        (data / entry.name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": str(copy), "MEMGAN_DATA": str(data), "MEMGAN_TEST_THREADS": "1",
           "MEMGAN_CALIBRATION_STEPS": "1", "MEMGAN_CALIBRATION_CACHE": str(tmp_path / "calibration.json")}

    def run(*args: str) -> None:
        done = subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"

    run("make_tiny_shapes.py")
    with np.load(data / "tiny_shapes.npz") as files:
        assert {key: (files[key].dtype, files[key].shape[1:]) for key in ("x_train", "x_test")} == {
            "x_train": (np.uint8, (1, 28, 28)), "x_test": (np.uint8, (1, 28, 28))}
    run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_registry.py", "tests/test_detector_contract.py",
        "-k", "test_registry or every_profiles_entry_is_valid or mean_distance")
    run("run_all.py", "--dataset", "tiny_shapes", "--methods", "iforest", "mean_distance", "--profile", "smoke",
        "--no-download", "--no-progress", "--results-dir", str(tmp_path / "results"),
        "--reports-dir", str(tmp_path / "reports"))
    records = sorted((tmp_path / "results").rglob("*.json"))
    assert {path.parent.name for path in records} == {"iforest", "mean_distance"} and len(records) == 4
    run("run_all.py", "--dataset", "all", "--profile", "smoke", "--estimate", "--device", "cpu",
        "--methods", "f_anogan", "mem_ganomaly", "dsvdd", "mean_distance", "--no-download",
        "--results-dir", str(tmp_path / "estimate"), "--reports-dir", str(tmp_path / "estimate_reports"))
