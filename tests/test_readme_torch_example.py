"""The README's PyTorch detector example ("Adding a detector") runs as written: registered, lint-clean,
trained alone and as four stacked jobs (`fit_jobs`), the stacked jobs scoring as their solo fits
within the stacked tolerance (RTOL, tests/test_stacking.py)."""
import subprocess
import sys
import types

import numpy as np
from sklearn.metrics import roc_auc_score

import methods
from methods.base import supports_stacking
from methods.engine import fit_jobs
from test_readme_example import REPO, readme_block
from test_stacking import RTOL, rel_diff

FIRST_LINE = "# methods/conv_ae.py"


def test_readme_torch_example_is_lint_clean(tmp_path):
    path = tmp_path / "conv_ae.py"
    path.write_text(readme_block(FIRST_LINE))
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
                           str(REPO / "pyproject.toml"), str(path)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_readme_torch_example_trains_alone_and_stacked(monkeypatch, separable_task):
    module = types.ModuleType("methods.conv_ae")
    exec(compile(readme_block(FIRST_LINE), "methods/conv_ae.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "methods.conv_ae", module)
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
    methods.register("conv_ae", "ConvAE", "methods.conv_ae:ConvAE")  # the README's registry line
    spec = methods.get_method("conv_ae")
    X, X_test, y_test = separable_task(n_train=48)

    def build(seed: int):
        return spec.load()(**{**spec.settings("smoke", "mnist"), "max_steps": 12}, random_state=seed, device="cpu")

    solo = [build(seed).fit(X) for seed in range(4)]
    stacked = [build(seed) for seed in range(4)]
    assert supports_stacking(stacked[0])
    assert fit_jobs(stacked, [X] * 4) == [None] * 4
    for seed in range(4):
        expected = solo[seed].decision_function(X_test)
        assert rel_diff(stacked[seed].decision_function(X_test), expected) <= RTOL
        assert stacked[seed].training_log_.keys() == solo[seed].training_log_.keys() == {"loss"}
    assert not np.array_equal(solo[0].decision_function(X_test), solo[1].decision_function(X_test))
    assert roc_auc_score(y_test, solo[0].decision_function(X_test)) > 0.5
