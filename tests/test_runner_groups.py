"""The runner's one path (benchmark/jobs.py): a job is a group of one, and every group, of one job or
more, runs claim -> prepare -> train (through the one seam, `train_jobs`) -> score -> write. Also the
decisions around it: which jobs stack (benchmark/stacking.py), the fp32-only rule, the backends by name.

The detectors here score an image by its mean brightness, so every score is known in advance; the stacked
engine is replaced by a recording stand-in (methods/engine/ has its own tests), so these tests check
what the runner does with a group, not the batched arithmetic.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import benchmark.jobs as jobs
import methods.engine
from benchmark.backends import BACKENDS
from benchmark.data import Dataset
from benchmark.jobs import Job, RunSettings, prepare, run_job, run_jobs, train_jobs
from benchmark.records import JobKey, JobLock, read_record, read_scores
from benchmark.stacking import group_jobs, stack_size
from methods.base import Detector, DivergedError, TrainOptions, check_images

ROOT = Path(__file__).resolve().parents[1]


class Brightness(Detector):
    """Score = mean pixel value + random_state / 1000: known in advance for any image and seed."""

    def __init__(self, random_state: int = 0, diverge: bool = False) -> None:
        self.random_state = random_state
        self.diverge = diverge

    def fit(self, X, epoch_callback=None):
        check_images(X)
        if self.diverge:
            raise DivergedError(epoch=1, step=3)
        self.training_log_ = {"trained": "alone"}
        if epoch_callback is not None:
            epoch_callback(1, self)
        return self

    def decision_function(self, X):
        X = check_images(X)
        return X.reshape(len(X), -1).mean(axis=1).astype(np.float64) + self.random_state / 1000


class StackableBrightness(Brightness):
    """Brightness with the run options a torch detector has, and a stacked path (the stand-in trains it)."""
    precision = "fp32"
    memory_format = "default"
    cuda_graphs = False
    progress_callback = None

    def _begin_fit(self, X):  # pragma: no cover - fit_jobs is replaced here
        raise AssertionError("the stand-in for methods.engine.fit_jobs trains these")

    def _stage_plans(self, n_train):  # pragma: no cover - fit_jobs is replaced here
        raise AssertionError("the stand-in for methods.engine.fit_jobs trains these")


def _dark_and_bright(n: int = 30) -> Dataset:
    """Class 0 dark images, classes 1-9 bright ones: with class 0 normal, every anomaly is brighter."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    images = (np.where(labels[:, None, None, None] == 0, 20, 200) + rng.integers(0, 10, (n, 1, 4, 4))).astype(np.uint8)
    return Dataset("mnist", images, labels, images.copy(), labels.copy(), tuple(map(str, range(10))), "fake")


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(jobs, "load_dataset", lambda *args, **kwargs: _dark_and_bright())
    jobs._task.cache_clear()
    yield
    jobs._task.cache_clear()


@pytest.fixture
def stacked_calls(monkeypatch):
    """Replace the stacked engine by a stand-in that fits each detector alone and records the groups."""
    calls: list[list[int]] = []

    def fake_fit_jobs(detectors, Xs, callbacks=None, options=None):
        assert isinstance(options, TrainOptions)
        calls.append([det.random_state for det in detectors])
        errors = []
        for det, X, callback in zip(detectors, Xs, callbacks):
            try:
                det.fit(X, epoch_callback=callback)
                if len(detectors) > 1:
                    det.training_log_ = {"trained": "stacked"}
                errors.append(None)
            except DivergedError as exc:
                errors.append(exc)
        return errors

    monkeypatch.setattr(methods.engine, "fit_jobs", fake_fit_jobs)
    return calls


def _job(seed: int, normal_class: int = 0, cls: str = "StackableBrightness", **params) -> Job:
    key = JobKey("mnist", normal_class, "brightness", seed, "smoke", "paper")
    return Job(key, "smoke", {"random_state": seed, **params}, f"{__name__}:{cls}")


def _settings(tmp_path: Path, **extra) -> RunSettings:
    return RunSettings(results_dir=tmp_path, data_root=None, download=False, threads_per_job=1, track_auroc=False,
                       overrides={}, provenance={}, **extra)


def _expected_scores(seed: int) -> np.ndarray:
    """The test scores of class 0 normal: mean brightness of each test image in [0, 1], plus seed / 1000."""
    task = jobs._task("mnist", None, False, 0, "paper", "smoke", 0.0)
    return task.x_test.reshape(len(task.x_test), -1).mean(axis=1).astype(np.float64) + seed / 1000


# ---- the one path ---------------------------------------------------------------------------------
def test_a_job_is_a_group_of_one(fake_data, stacked_calls, tmp_path):
    outcomes = run_jobs([_job(0)], _settings(tmp_path))
    assert [(o.status, o.auroc) for o in outcomes] == [("ok", 1.0)]
    assert stacked_calls == [[0]]  # one job is a group of one through the same engine
    record = read_record(_job(0).key.json_path(tmp_path))
    assert "stack" not in record and record["training_log"] == {"trained": "alone"}
    assert record["train_seconds"] >= 0
    scores, _ = read_scores(_job(0).key.scores_path(tmp_path))
    np.testing.assert_array_equal(scores, _expected_scores(0))
    # run_job is that group of one
    other = tmp_path / "other"
    assert run_job(_job(0), _settings(other)).status == "ok"
    np.testing.assert_array_equal(read_scores(_job(0).key.scores_path(other))[0], scores)


def test_a_group_trains_once_through_the_stacked_engine_and_each_job_names_it(fake_data, stacked_calls, tmp_path):
    group = [_job(0), _job(1)]
    outcomes = run_jobs(group, _settings(tmp_path))
    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert stacked_calls == [[0, 1]]
    for seed, job in enumerate(group):
        record = read_record(job.key.json_path(tmp_path))
        assert record["stack"]["jobs"] == ["mnist/brightness/class0/seed0", "mnist/brightness/class0/seed1"]
        assert record["stack"]["size"] == 2
        assert record["train_seconds"] == record["stack"]["group_train_seconds"]
        assert record["training_log"] == {"trained": "stacked"}
        np.testing.assert_array_equal(read_scores(job.key.scores_path(tmp_path))[0], _expected_scores(seed))


def test_a_failed_stacked_training_trains_the_jobs_alone(fake_data, monkeypatch, tmp_path):
    def out_of_memory(detectors, Xs, callbacks=None, options=None):
        if len(detectors) == 1:  # the jobs retried alone
            detectors[0].fit(Xs[0], epoch_callback=callbacks[0])
            return [None]
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(methods.engine, "fit_jobs", out_of_memory)
    outcomes = run_jobs([_job(0), _job(1)], _settings(tmp_path))
    assert [o.status for o in outcomes] == ["ok", "ok"]
    for job in (_job(0), _job(1)):
        record = read_record(job.key.json_path(tmp_path))
        assert "stack" not in record and record["training_log"] == {"trained": "alone"}


def test_a_job_that_cannot_be_built_is_recorded_and_the_others_still_stack(fake_data, stacked_calls, tmp_path):
    group = [_job(0), _job(1, no_such_parameter=1), _job(2)]
    outcomes = {o.key.seed: o for o in run_jobs(group, _settings(tmp_path))}
    assert outcomes[1].status == "failed" and "no_such_parameter" in outcomes[1].message
    assert read_record(group[1].key.json_path(tmp_path))["error"]["type"] == "TypeError"
    assert outcomes[0].status == outcomes[2].status == "ok"
    assert stacked_calls == [[0, 2]]
    assert read_record(group[2].key.json_path(tmp_path))["stack"]["size"] == 2


def test_a_diverging_job_is_recorded_and_its_group_goes_on(fake_data, stacked_calls, tmp_path):
    group = [_job(0), _job(1, diverge=True)]
    outcomes = run_jobs(group, _settings(tmp_path))
    assert [o.status for o in outcomes] == ["ok", "diverged"]
    record = read_record(group[1].key.json_path(tmp_path))
    assert record["divergence"] == {"epoch": 1, "step": 3, "detail": "non-finite loss"}
    assert record["stack"]["size"] == 2  # it trained with the group until it diverged
    assert not group[1].key.scores_path(tmp_path).exists()
    # alone: the same record status and divergence
    alone = tmp_path / "alone"
    assert run_jobs([group[1]], _settings(alone))[0].status == "diverged"
    assert read_record(group[1].key.json_path(alone))["divergence"] == record["divergence"]


def test_a_job_another_runner_holds_is_left_out_and_the_rest_train(fake_data, stacked_calls, tmp_path):
    held = JobLock(_job(1).key.lock_path(tmp_path))
    assert held.acquire(blocking=False)
    try:
        outcomes = run_jobs([_job(0), _job(1)], _settings(tmp_path))
    finally:
        held.release()
    assert [(o.key.seed, o.status) for o in outcomes] == [(1, "claimed"), (0, "ok")]
    assert stacked_calls == [[0]]  # one job left: a group of one
    assert "stack" not in read_record(_job(0).key.json_path(tmp_path))
    assert not _job(1).key.json_path(tmp_path).exists()


# ---- the seam -------------------------------------------------------------------------------------
def test_run_options_reach_the_engine_as_one_object_never_as_detector_attributes(fake_data, stacked_calls,
                                                                                tmp_path, monkeypatch):
    options = TrainOptions(precision="bf16", memory_format="channels_last")
    seen = []
    monkeypatch.setattr(methods.engine, "fit_jobs", lambda dets, Xs, cbs=None, opts=None: seen.append(opts) or
                        [None] * len(dets))
    settings = _settings(tmp_path, train_options=options)
    stackable, plain = (prepare(_job(0, cls=cls), settings, {})[1] for cls in ("StackableBrightness", "Brightness"))
    before = dict(vars(stackable))
    X = np.zeros((2, 1, 4, 4), dtype=np.float32)
    assert train_jobs([stackable], [X], [None], options) == [None]
    assert seen == [options] and vars(stackable) == before  # nothing set on the detector
    assert train_jobs([plain], [X], [None], options) == [None]
    assert seen == [options]  # a detector outside the engine trains through its own fit
    assert not hasattr(plain, "precision") and not hasattr(plain, "cuda_graphs")


def test_train_jobs_returns_a_solo_jobs_divergence_and_calls_its_hooks(tmp_path):
    X = np.zeros((2, 1, 4, 4), dtype=np.float32)
    errors = train_jobs([Brightness(diverge=True)], [X], [None], TrainOptions())
    assert len(errors) == 1 and isinstance(errors[0], DivergedError) and (errors[0].epoch, errors[0].step) == (1, 3)
    epochs: list[int] = []
    assert train_jobs([Brightness()], [X], [lambda epoch, det: epochs.append(epoch)], TrainOptions()) == [None]
    assert epochs == [1]


# ---- which jobs stack, and the fp32 rule --------------------------------------------------------------
def test_every_precision_stacks():
    assert stack_size(4, "cpu", TrainOptions()) == (4, "")
    assert stack_size(None, "cpu", TrainOptions()) == (1, "")  # auto: 1 on the CPU
    assert stack_size(4, "cpu", TrainOptions(precision="bf16")) == (4, "")


def test_groups_hold_only_stackable_jobs_of_one_setting():
    jobs_ = [_job(s, c) for c in (0, 1) for s in (0, 1)]
    jobs_ += [_job(0, cls="Brightness"), _job(0, diverge=True), _job(1, no_such_parameter=1)]
    units = group_jobs(jobs_, 3)

    def name(job: Job) -> str:
        return f"{job.target.split(':')[1]}{sorted(job.params.items())}"

    # full groups as they fill; a job that cannot stack (another class, one that cannot be built) alone
    # at once; the groups still filling at the end in order of first appearance
    assert [[name(j) for j in unit] for unit in units] == [
        ["StackableBrightness[('random_state', 0)]", "StackableBrightness[('random_state', 1)]",
         "StackableBrightness[('random_state', 0)]"],
        ["Brightness[('random_state', 0)]"],
        ["StackableBrightness[('no_such_parameter', 1), ('random_state', 1)]"],
        ["StackableBrightness[('random_state', 1)]"],
        ["StackableBrightness[('diverge', True), ('random_state', 0)]"]]
    assert [[j.key.normal_class for j in unit] for unit in units][0] == [0, 0, 1]
    assert group_jobs(jobs_, 1) == [[j] for j in jobs_]


# ---- backends by name, and no cycle ------------------------------------------------------------------
def test_the_local_backend_runs_one_at_a_time_in_this_process_with_the_progress_hook():
    def unit(item, settings, progress=None):
        return (item, settings, progress)

    def hook(*args):
        return None

    assert list(BACKENDS["local"].run(unit, [1, 2], "s", 1, progress=hook)) == [(1, (1, "s", hook)),
                                                                                (2, (2, "s", hook))]
    assert [name for name, backend in BACKENDS.items() if backend.cluster] == ["dask"]
    assert BACKENDS["local"].available()


def test_stacking_imports_no_private_name_and_not_the_runner():
    tree = ast.parse((ROOT / "benchmark" / "stacking.py").read_text())
    imported = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names]
    assert imported and all(not name.startswith("_") for module, name in imported if module != "__future__")
    assert "benchmark.runner" not in {module for module, _ in imported}
