"""The README's worked example of adding a detector runs as written, through the registry and
the runner (one new file + one registry line)."""
import re
import sys
import types
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import methods
from benchmark.records import JobKey, read_record
from benchmark.runner import Job, RunSettings, run_job

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_blocks() -> tuple[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    module_code = next(b for b in blocks if b.startswith("# methods/mean_distance.py"))
    registry_line = next(b for b in blocks if b.strip().startswith("register(")).strip()
    return module_code, registry_line


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
    import benchmark.runner as runner

    task = types.SimpleNamespace(x_train=X_train, x_test=X_test, y_test=y_test, sample_seed=1,
                                 sizes={"n_train": len(X_train), "n_test": len(X_test)})
    monkeypatch.setattr(runner, "_task", lambda *args: task)
    key = JobKey("mnist", 0, "mean_distance", 0, "smoke", "paper")
    settings = RunSettings(results_dir=tmp_path, data_root=None, download=False, threads_per_job=1,
                           track_auroc=False, overrides={}, provenance={})
    outcome = run_job(Job(key, "smoke", {"random_state": 0}, spec.target), settings)
    assert outcome.status == "ok", outcome.message
    record = read_record(key.json_path(tmp_path))
    assert record["metrics"]["auroc"] > 0.9 and record["hyperparameters"] == {"power": 2.0, "random_state": 0}
    assert np.isfinite(record["metrics"]["gmean"])
