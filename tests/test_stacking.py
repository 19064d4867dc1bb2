"""Stacked training (methods/engine/, benchmark/stacking.py) and the shared training engine.

Tolerance of the stacked-vs-solo comparisons: the largest score difference relative to the
largest score, <= 1e-2 after the smoke budgets. A stacked fit runs the same arithmetic in
batched kernels (vmap: other summation orders) and evaluates Adam with per-job tensors, so it
differs from a solo fit by rounding, which Adam amplifies (its first updates are about
lr * sign(gradient), whatever the gradient's size). For scale, measured on these smoke jobs: a
solo fit at 1 vs 2 threads differs by ~2.5e-4, stacked vs solo by 4e-4 to 4e-3 (GANomaly); a
mix-up of jobs (another seed and data) differs at least ten times more than the job's own solo
fit, which the negative control checks. Measured max relative score differences, stacked vs
solo, in the smoke and different-sizes tests (1 thread): f-AnoGAN <= 3e-7, DAGMM <= 3e-5, Deep SVDD
soft-boundary <= 3e-7. DAGMM with each job's dropout masks drawn from a wrongly advanced stream
differs by 2e-3 to 7e-3, under RTOL: hence the separate exact test of the masks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import methods.torch_base as torch_base
from benchmark.records import JobKey
from benchmark.runner import Job
from benchmark.stacking import group_jobs
from methods import get_method
from methods.base import DivergedError, TrainOptions
from methods.engine import fit_jobs
from methods.engine.optimisers import StackedAdam, StackedRMSprop, clip_grad_norm_per_job
from methods.torch_base import TorchDetector

RTOL = 1e-2


@pytest.fixture(autouse=True)
def auto_precision_is_fp32(monkeypatch):
    """This file checks stacked = solo within RTOL in fp32: "auto" (every plain fit's and fit_jobs'
    default) resolves to fp32 here, as on a CPU without native bf16. bf16 is asked for explicitly where
    tested (and its stacked-vs-solo tolerance is tests/test_engine.py's)."""
    monkeypatch.setattr(torch_base, "native_bf16", lambda device: False)

# Test cases: a method's name, or a variant (its method and the settings that make it).
VARIANTS = {"dsvdd_soft": ("dsvdd", {"objective": "soft-boundary", "warm_up_epochs": 0})}
STACKABLE = ["ganomaly", "mem_ganomaly", "memae", "dsvdd", "dsvdd_soft", "f_anogan", "dagmm"]
DEEP = ["ganomaly", "mem_ganomaly", "memae", "dsvdd", "f_anogan", "dagmm"]


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# Smoke budgets; for the stacked fits also narrow networks, so the tests take seconds (a stacked
# fit is no faster than K solo fits on a CPU: see README, "Stacked jobs").
NARROW = {"ganomaly": {"ngf": 8, "ndf": 8, "nz": 10}, "mem_ganomaly": {"ngf": 8, "ndf": 8, "nz": 10, "memory_size": 20}}


def smoke(name: str, narrow: bool = False, device: str = "cpu", **extra):
    method, variant = VARIANTS.get(name, (name, {}))
    spec = get_method(method)
    settings = {**spec.settings("smoke", "mnist"), **variant, **(NARROW.get(name, {}) if narrow else {}), **extra}
    return lambda seed: spec.load()(**settings, random_state=seed, device=device)


# Mem_GANomaly at the paper's lr 2e-3 amplifies any rounding difference within a few steps: a
# solo fit at 1 vs 2 threads differs by up to 2.5e-2 after the 4 smoke steps and 7e-2 after 7
# (seeds 0-1), as much as stacked vs solo; at lr 2e-4 by <= 1e-3. Its tests use lr 2e-4.
STABLE = {"ganomaly": {}, "mem_ganomaly": {"lr": 2e-4}, "memae": {}, "dsvdd": {}, "dsvdd_soft": {}, "dagmm": {},
          # f-AnoGAN: a generator step every 2nd critic step (the smoke budget's 4 critic steps
          # would have none at n_critic 5) and flips on, so both are part of the comparison.
          "f_anogan": {"n_critic": 2, "hflip": True}}
# The different-sizes test's budget (2 epochs, 7 steps, batch 16) in each detector's arguments.
BUDGET = {"dsvdd": {"ae_epochs": 2, "ae_max_steps": 7, "ae_batch_size": 16},
          "f_anogan": {"gan_epochs": 2, "gan_max_steps": 7, "encoder_max_steps": 7, "batch_size": 16}}
BUDGET["dsvdd_soft"] = {**BUDGET["dsvdd"], "warm_up_epochs": 1}  # the radius updates from epoch 2 on
BUDGET["dagmm"] = {"grad_clip_norm": 5.0}  # clipped per job (its gradients' norms are far above 5 here)


def budget(name: str) -> dict:
    return BUDGET.get(name, {}) if name == "f_anogan" else {"epochs": 2, "max_steps": 7, "batch_size": 16,
                                                           **BUDGET.get(name, {})}


def steps_and_epochs(name: str, log: dict) -> tuple:
    """The steps and epochs a training log records (None where it records none)."""
    if name == "f_anogan":
        return (log["stage1"]["critic_steps"], log["stage2"]["iterations"]), log["stage1"]["epochs"]
    if name in ("memae", "dsvdd", "dsvdd_soft"):
        return log.get("steps"), len(log["epoch_mean_loss"])
    if name == "dagmm":
        return None, len(log["loss"])
    return log["steps"], log["epochs_run"]


def same_structure(a: dict, b: dict) -> bool:
    """Same keys at every level, same integer counters, lists of the same lengths."""
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        if isinstance(value, dict) and not same_structure(value, b[key]):
            return False
        if isinstance(value, int) and value != b[key] or isinstance(value, list) and len(value) != len(b[key]):
            return False
    return True


@pytest.mark.parametrize("name", STACKABLE)
def test_stacked_smoke_jobs_score_as_solo_jobs(name, separable_task):
    X, X_test, _ = separable_task(n_train=64)
    build = smoke(name, narrow=True, **STABLE[name])  # the smoke budget: 4 steps at batch 16
    stacked = [build(0), build(1)]
    assert fit_jobs(stacked, [X, X]) == [None, None]
    for seed, det in enumerate(stacked):
        solo = build(seed).fit(X)
        assert rel_diff(det.decision_function(X_test), solo.decision_function(X_test)) <= RTOL
        assert det.training_log_.get("steps") == solo.training_log_.get("steps")
        assert same_structure(det.training_log_, solo.training_log_)
    if name == "f_anogan":
        assert det.training_log_["stage1"]["generator_steps"] == 2  # 4 critic steps, n_critic 2
    if name == "dsvdd_soft":
        assert det.training_log_["radius"] == pytest.approx(solo.training_log_["radius"], rel=RTOL)
        assert det.training_log_["radius"] > 0  # updated (from R = 0) after the warm-up


@pytest.mark.parametrize("name", STACKABLE)
def test_stacked_jobs_of_different_sizes_score_as_solo_jobs(name, separable_task):
    # Three jobs: different seeds, different data, one training set larger (more steps per
    # epoch: it trains alone for the epoch's last steps, the others are masked), two epochs.
    build = smoke(name, narrow=True, **budget(name), **STABLE[name])
    # MemAE keeps the last incomplete batch: its jobs' sizes must be multiples of the batch;
    # Deep SVDD's jobs need one size.
    sizes = {"memae": [64, 64, 80], "dsvdd": [70, 70, 70], "dsvdd_soft": [70, 70, 70]}.get(name, [70, 70, 90])
    tasks = [separable_task(n_train=n, seed=i) for i, n in enumerate(sizes)]
    seeds = [0, 1, 2]
    solo = [build(s).fit(X) for s, (X, _, _) in zip(seeds, tasks)]
    stacked = [build(s) for s in seeds]
    assert fit_jobs(stacked, [X for X, _, _ in tasks]) == [None, None, None]
    for k, (X, X_test, y) in enumerate(tasks):
        expected = solo[k].decision_function(X_test)
        got = stacked[k].decision_function(X_test)
        assert rel_diff(got, expected) <= RTOL, (k, rel_diff(got, expected))
        steps, epochs = steps_and_epochs(name, stacked[k].training_log_)
        assert (steps, epochs) == steps_and_epochs(name, solo[k].training_log_)
        assert steps in (None, 7, (7, 7)) and epochs == 2
        assert same_structure(stacked[k].training_log_, solo[k].training_log_)
    # Negative control: another job's solo model is much further off than the job's own.
    own = rel_diff(stacked[0].decision_function(tasks[0][1]), solo[0].decision_function(tasks[0][1]))
    other = rel_diff(stacked[0].decision_function(tasks[0][1]), solo[1].decision_function(tasks[0][1]))
    assert other > 10 * own


@pytest.mark.parametrize("name", STACKABLE)
def test_a_diverging_job_is_recorded_and_the_others_go_on(name, separable_task):
    build = smoke(name, narrow=True, **STABLE[name])
    X, X_test, _ = separable_task(n_train=48)
    bad = X.copy()
    bad[:] = np.nan  # every loss of this job is NaN from its first step
    dets = [build(0), build(1)]
    errors = fit_jobs(dets, [X, bad])
    assert errors[0] is None
    assert isinstance(errors[1], DivergedError) and errors[1].epoch == 1 and errors[1].step == 1
    alone = build(0).fit(X).decision_function(X_test)
    assert rel_diff(dets[0].decision_function(X_test), alone) <= RTOL


def test_stacked_rmsprop_is_torch_rmsprop_per_job_and_masks_idle_jobs():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3)
    ref = [torch.nn.Parameter(w[k].clone()) for k in range(3)]
    opts = [torch.optim.RMSprop([p], lr=0.05) for p in ref]  # torch's defaults: alpha 0.99, eps 1e-8
    stacked = torch.nn.Parameter(w.clone())
    opt = StackedRMSprop([stacked], lr=0.05)
    for step in range(5):
        grads = torch.randn(3, 2, 3)
        active = np.array([True, step % 2 == 0, False])  # job 1 sits out every other step, job 2 always
        for k in range(3):
            if active[k]:
                ref[k].grad = grads[k].clone()
                opts[k].step()
        stacked.grad = grads.clone()
        opt.step(active)
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in ref]), rtol=1e-6, atol=1e-7)
    assert torch.equal(stacked.detach()[2], w[2]) and torch.equal(opt.square_avg[0][2], torch.zeros(2, 3))
    assert opt.steps.tolist() == [5, 3, 0]
    # By hand, one step from zero state: v = 0.01 g^2, p -= lr * g / (sqrt(v) + eps) = lr * sign(g) * 10.
    p = torch.nn.Parameter(torch.tensor([[1.0, -2.0]]))
    one = StackedRMSprop([p], lr=0.1)
    p.grad = torch.tensor([[3.0, -0.5]])
    one.step(np.array([True]))
    torch.testing.assert_close(p.detach(), torch.tensor([[1.0 - 1.0, -2.0 + 1.0]]), rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_per_job_is_torch_clip_per_job():
    torch.manual_seed(1)
    scale = torch.tensor([10.0, 0.1])  # job 0's gradient is clipped, job 1's is not
    grads = [torch.randn(2, 4) * scale[:, None], torch.randn(2, 3, 2) * scale[:, None, None]]
    stacked = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(stacked, grads):
        p.grad = g.clone()
    norms = clip_grad_norm_per_job(stacked, 1.0)
    for k in range(2):
        ref = [torch.nn.Parameter(torch.zeros_like(g[k])) for g in grads]
        for p, g in zip(ref, grads):
            p.grad = g[k].clone()
        total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        torch.testing.assert_close(norms[k], total)
        for p, q in zip(stacked, ref):
            torch.testing.assert_close(p.grad[k], q.grad)
    assert norms[0] > 1.0 > norms[1]


def test_stacked_adam_is_torch_adam_per_job_and_masks_idle_jobs():
    torch.manual_seed(0)
    w = torch.randn(2, 5)
    ref = [torch.nn.Parameter(w[k].clone()) for k in range(2)]
    opts = [torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.9)) for p in ref]
    stacked = torch.nn.Parameter(w.clone())
    opt = StackedAdam([stacked], lr=0.1, betas=(0.5, 0.9))
    for step in range(4):
        grads = torch.randn(2, 5)
        active = np.array([True, step % 2 == 0])  # job 1 sits out every other step
        for k in range(2):
            if active[k]:
                ref[k].grad = grads[k].clone()
                opts[k].step()
        stacked.grad = grads.clone()
        opt.step(active)
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in ref]), rtol=1e-6, atol=1e-7)
    assert opt.steps.tolist() == [4, 2]


def test_only_jobs_that_differ_in_class_or_seed_are_grouped():
    def job(method: str, cls: int, seed: int, **params) -> Job:
        return Job(JobKey("mnist", cls, method, seed, "smoke", "paper"), "smoke",
                   {**get_method(method).settings("smoke", "mnist"), **params, "random_state": seed, "device": "cpu"},
                   get_method(method).target)

    jobs = [job("ganomaly", c, s) for c in range(3) for s in range(2)]
    jobs += [job("ganomaly", 0, 0, lr=1e-3), job("iforest", 0, 0), job("iforest", 1, 0)]
    units = group_jobs(jobs, 4)
    sizes = sorted(len(u) for u in units)
    assert sizes == [1, 1, 1, 2, 4]
    for unit in units:
        assert len({(j.key.method, repr(sorted((k, v) for k, v in j.params.items() if k != "random_state")))
                    for j in unit}) == 1
    assert group_jobs(jobs, 1) == [[j] for j in jobs]


@pytest.mark.parametrize("name", DEEP)
def test_every_epoch_ends_through_end_epoch_and_planned_steps_are_run(name, separable_task, monkeypatch):
    calls = []
    original = TorchDetector._end_epoch

    def counting(self, epoch, callback):
        calls.append(epoch)
        return original(self, epoch, callback)

    monkeypatch.setattr(TorchDetector, "_end_epoch", counting)
    X, _, _ = separable_task(n_train=40)
    det = smoke(name)(0)
    det.fit(X)
    stages = det._stages(len(X))
    assert len(calls) == sum(stage.planned_epochs(len(X)) for stage in stages)
    planned = det.planned_steps(len(X))
    assert all(n > 0 for n in planned.values()) and set(planned) == set(det.stage_seconds_)


@pytest.mark.parametrize("name", ["ganomaly", "memae"])
def test_bf16_precision_trains_under_autocast_and_is_recorded(name, separable_task, monkeypatch):
    X, X_test, _ = separable_task(n_train=48)
    fp32 = smoke(name, narrow=True)(0).fit(X)
    dtypes = []
    original = torch.nn.functional.conv2d

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    det = smoke(name, narrow=True)(0)
    assert fit_jobs([det], [X], options=TrainOptions(precision="bf16")) == [None]
    assert torch.bfloat16 in dtypes  # the training convolutions ran in bfloat16
    dtypes.clear()
    scores = det.decision_function(X_test)
    assert torch.bfloat16 not in dtypes  # scoring stays fp32
    assert np.all(np.isfinite(scores)) and not np.array_equal(scores, fp32.decision_function(X_test))
    assert det.run_info()["precision"] == "bf16" and fp32.run_info()["precision"] == "fp32"


def test_stacked_run_writes_one_record_per_job_naming_its_group(shared_data, tmp_path):
    import json

    from benchmark.cli import main

    def run(stack: str) -> dict:
        results = tmp_path / f"results{stack}"
        assert main(["--dataset", "mnist", "--methods", "memae", "--classes", "0", "1", "--set", "max_steps=2",
                     "--profile", "smoke", "--data-root", str(shared_data), "--no-download", "--no-progress",
                     "--results-dir", str(results), "--reports-dir", str(tmp_path / f"reports{stack}"),
                     "--stack", stack]) == 0
        return {path.name + path.parent.name: json.loads(path.read_text())
                for path in results.rglob("*.json") if path.parent.name == "memae"}

    stacked, solo = run("4"), run("1")
    assert len(stacked) == len(solo) == 2
    for name, record in stacked.items():
        assert record["stack"]["size"] == 2 and len(record["stack"]["jobs"]) == 2
        assert "stack" not in solo[name]
        assert abs(record["metrics"]["auroc"] - solo[name]["metrics"]["auroc"]) <= 0.01


def test_dropout_mask_is_the_dropout_layers_mask_and_draws_as_it_does():
    from methods.dagmm import dropout_mask

    h = torch.randn(6, 10)
    torch.manual_seed(3)
    out = torch.nn.Dropout(0.5).train()(h)
    after_layer = torch.get_rng_state()
    torch.manual_seed(3)
    mask = dropout_mask(h.shape, 0.5, h.dtype, h.device)
    assert torch.equal(out, h * mask)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(torch.get_rng_state(), after_layer)  # the stream advanced exactly as by the layer


def test_stacked_dagmm_jobs_use_their_solo_fits_dropout_masks(separable_task, monkeypatch):
    # Scores alone would not show wrong masks: masks from a wrongly advanced stream move the
    # scores by only 2e-3 to 7e-3 after these steps (see the module docstring). A solo fit draws its
    # masks as the Dropout layer would (test above); each stacked job must draw its solo fit's masks.
    import methods.dagmm as dagmm

    build = smoke("dagmm", epochs=2, batch_size=16)
    tasks = [separable_task(n_train=48, seed=i) for i in range(2)]
    drawn: list = []
    original_mask = dagmm.dropout_mask
    monkeypatch.setattr(dagmm, "dropout_mask", lambda *a: drawn.append(original_mask(*a)) or drawn[-1])
    solo_masks = []
    for seed, (X, _, _) in enumerate(tasks):
        drawn.clear()
        build(seed).fit(X)
        solo_masks.append(list(drawn))
    drawn.clear()
    assert fit_jobs([build(0), build(1)], [X for X, _, _ in tasks]) == [None, None]
    assert len(solo_masks[0]) == len(solo_masks[1]) == 6  # 3 steps per epoch, 2 epochs
    stacked_masks = [drawn[k::2] for k in range(2)]  # per step, job 0 then job 1
    for k in range(2):
        assert len(stacked_masks[k]) == 6
        assert all(torch.equal(a, b) for a, b in zip(stacked_masks[k], solo_masks[k]))
    assert not torch.equal(stacked_masks[0][0], stacked_masks[1][0])


def test_a_dagmm_job_whose_covariance_goes_singular_diverges_alone(separable_task):
    from methods.dagmm import mixture_parameters

    build = smoke("dagmm", epochs=2, batch_size=16, cov_jitter=0.0)
    X, X_test, _ = separable_task(n_train=64)
    constant = np.full_like(X, 0.5)  # one code for every image: every covariance is singular
    probe = build(1)
    x = probe._begin_fit(constant)
    probe._build_networks(x)
    with torch.no_grad():
        z, gamma, _ = probe._codes(x[:16])
        assert torch.linalg.cholesky_ex(mixture_parameters(gamma, z)[2])[1].any()  # not positive definite
    with pytest.raises(DivergedError) as solo_error:
        build(1).fit(constant)
    dets = [build(0), build(1)]
    errors = fit_jobs(dets, [X, constant])
    assert errors[0] is None
    assert isinstance(errors[1], DivergedError)
    assert (errors[1].epoch, errors[1].step) == (solo_error.value.epoch, solo_error.value.step) == (1, 1)
    alone = build(0).fit(X).decision_function(X_test)
    assert rel_diff(dets[0].decision_function(X_test), alone) <= RTOL
    assert not hasattr(dets[1], "phi_")  # no mixture estimated for the diverged job


def test_f_anogan_jobs_whose_gan_stage_ends_in_different_epochs(separable_task):
    # Stage 1 capped at 5 critic steps: 3 per epoch at 48 images (ends in epoch 2), 6 at 96 (in
    # epoch 1); stage 2's epochs are numbered on from there, per job, as in the solo fits.
    build = smoke("f_anogan", gan_epochs=2, gan_max_steps=5, encoder_max_steps=4, n_critic=2, hflip=True)
    tasks = [separable_task(n_train=n, seed=i) for i, n in enumerate([48, 96])]
    seen: list = [[], []]
    callbacks = [lambda epoch, det, k=k: seen[k].append(epoch) for k in range(2)]
    dets = [build(0), build(1)]
    assert fit_jobs(dets, [X for X, _, _ in tasks], callbacks) == [None, None]
    for k, (X, X_test, _) in enumerate(tasks):
        solo_seen: list = []
        solo = build(k).fit(X, epoch_callback=lambda epoch, det: solo_seen.append(epoch))
        assert seen[k] == solo_seen
        assert rel_diff(dets[k].decision_function(X_test), solo.decision_function(X_test)) <= RTOL
        assert same_structure(dets[k].training_log_, solo.training_log_)
    assert seen == [[3, 4], [2]]  # stage 2 (4 steps): 3 steps per epoch at 48 images, 6 at 96
