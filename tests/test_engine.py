"""The training engine (methods/engine/): one description per detector, K = 1 as a plain PyTorch loop,
K > 1 stacked, bf16 stacked, options only through `fit_jobs`, the step clock and progress display,
stages of (image, copy) samples (GEOM, GOAD stacked and in bf16).

Tolerance of the stacked-vs-solo bf16 comparisons: RTOL of tests/test_stacking.py (1e-2, the largest
score difference relative to the largest score). Measured (CPU, 1 thread, these narrow smoke jobs at
the STABLE settings): Deep SVDD and MemAE ~1e-7, f-AnoGAN ~1e-4, DAGMM ~2e-4, GANomaly ~4e-3: the
stacked step casts what autocast casts in a solo step (methods/engine/fit.py), so the two differ by
summation order only, as in fp32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import TrainOptions, iterate_minibatches, supports_stacking
from methods.engine import Stage, fit_jobs
from methods.engine.jobs import minibatch
from methods.memae import MemAE, memae_loss
from test_stacking import DEEP, RTOL, STABLE, STACKABLE, rel_diff, same_structure, smoke

BF16 = TrainOptions(precision="bf16")


@pytest.mark.parametrize("name", STACKABLE)
def test_stacked_bf16_jobs_score_as_solo_bf16_jobs(name, separable_task, monkeypatch):
    X, X_test, _ = separable_task(n_train=64)
    build = smoke(name, narrow=True, **STABLE[name])
    dtypes: list = []
    original = torch.nn.functional.linear if name == "dagmm" else torch.nn.functional.conv2d

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear" if name == "dagmm" else "conv2d", spy)
    stacked = [build(0), build(1)]
    assert fit_jobs(stacked, [X, X], options=BF16) == [None, None]
    assert torch.bfloat16 in dtypes  # the stacked training ran its layers in bfloat16
    monkeypatch.undo()
    for seed, det in enumerate(stacked):
        solo = build(seed)
        assert fit_jobs([solo], [X], options=BF16) == [None]
        assert rel_diff(det.decision_function(X_test), solo.decision_function(X_test)) <= RTOL
        assert det.run_info()["precision"] == "bf16"
    fp32 = build(0).fit(X)
    assert not np.array_equal(stacked[0].decision_function(X_test), fp32.decision_function(X_test))


def test_a_solo_fit_is_a_plain_pytorch_loop_bit_for_bit(separable_task):
    # MemAE's smoke budget (4 steps at batch 16), written out by hand: Adam, zero_grad, backward, step.
    X, X_test, _ = separable_task(n_train=40)
    params = dict(epochs=2, batch_size=16, max_steps=4, device="cpu", random_state=3)
    engine = MemAE(**params).fit(X)
    by_hand = MemAE(**params)
    x = by_hand._begin_fit(X)
    by_hand._build_networks(x)
    by_hand.net_.train()
    optimiser = torch.optim.Adam(by_hand.net_.parameters(), lr=by_hand.lr)
    steps = 0
    for _ in range(2):
        for idx in iterate_minibatches(len(x), 16, False, by_hand.generator_, by_hand.device_):
            if steps < 4:
                x_hat, weights = by_hand.net_(x[idx])
                loss = memae_loss(x[idx], x_hat, weights, by_hand.entropy_weight)[0]
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                steps += 1
    by_hand._finish_fit()
    np.testing.assert_array_equal(engine.decision_function(X_test), by_hand.decision_function(X_test))
    assert engine.training_log_["steps"] == 4


def test_a_solo_fit_runs_no_vmap(separable_task, monkeypatch):
    import methods.engine.modules as modules

    calls = []
    monkeypatch.setattr(modules, "vmap", lambda *a, **k: calls.append(1) or torch.func.vmap(*a, **k))
    X, _, _ = separable_task(n_train=32)
    smoke("ganomaly", narrow=True)(0).fit(X)
    assert calls == []
    assert fit_jobs([smoke("ganomaly", narrow=True)(s) for s in range(2)], [X, X]) == [None, None]
    assert calls  # K = 2 does


def test_options_reach_training_through_fit_jobs_only(separable_task):
    X, _, _ = separable_task(n_train=32)
    det = smoke("memae")(0)
    options = TrainOptions(precision="bf16", memory_format="channels_last")
    assert fit_jobs([det], [X], options=options) == [None]
    assert det.train_options_ == options
    info = det.run_info()
    assert (info["precision"], info["memory_format"], info["cuda_graphs"]) == ("bf16", "channels_last", False)
    det.fit(X)  # a plain fit trains with the default options again: MemAE's, resolved
    info = det.run_info()
    assert (info["precision"], info["memory_format"]) == ("fp32", "channels_last")
    assert (info["precision_asked"], info["memory_format_asked"]) == ("auto", "default")
    assert not hasattr(det, "precision")  # no attribute set on a detector carries options any more


@pytest.mark.parametrize("name", DEEP)
def test_every_deep_detector_describes_its_training_and_stacks(name):
    assert supports_stacking(smoke(name)(0))


def test_a_detector_with_a_loop_of_its_own_trains_alone(separable_task):
    class OwnLoop(MemAE):
        def _fit(self, x_train, epoch_callback):
            self._build_networks(x_train)
            self.trained_ = True

    X, _, _ = separable_task(n_train=32)
    det = OwnLoop(device="cpu")
    assert not supports_stacking(det)
    assert fit_jobs([det], [X]) == [None] and det.trained_
    with pytest.raises(ValueError, match="cannot be trained stacked"):
        fit_jobs([OwnLoop(device="cpu"), OwnLoop(device="cpu", random_state=1)], [X, X])


@pytest.mark.parametrize("k", [1, 2])
def test_step_clock_and_progress_see_every_step_and_epoch(k, separable_task):
    X, _, _ = separable_task(n_train=40)
    dets = [smoke("dsvdd", epochs=2, max_steps=5, ae_epochs=1, ae_max_steps=3)(s) for s in range(k)]
    progress: list = []
    for det in dets:
        det.step_clock = []
        det.progress_callback = lambda stage, done, planned: progress.append((stage, done, planned))
    assert fit_jobs(dets, [X] * k) == [None] * k
    planned = dets[0].planned_steps(len(X))
    for det in dets:
        stages = [stage for stage, _ in det.step_clock]
        assert {s: stages.count(s) for s in planned} == planned
        assert all(seconds >= 0 for _, seconds in det.step_clock)
    assert progress.count(("svdd", 2, 2)) == k and progress.count(("pretrain", 1, 1)) == k


def test_a_stage_of_copies_counts_steps_on_pairs_and_hands_the_loss_images_and_copy_indices():
    stage = Stage("train", 32, epochs=2, drop_last=False, copies=72)
    # 10 images x 72 = 720 pairs: 22.5 batches of 32 per epoch
    assert (stage.steps_per_epoch(10), stage.planned_steps(10), stage.planned_epochs(10)) == (23, 46, 2)
    assert Stage("train", 32, epochs=2, copies=72).steps_per_epoch(10) == 22  # drop_last
    x = torch.arange(4.0)[:, None] * 10  # image i holds 10 i
    images, copies = minibatch(x, torch.tensor([0, 5, 6, 11]), copies=3)  # sample s = (image s // 3, copy s % 3)
    assert images[:, 0].tolist() == [0.0, 10.0, 20.0, 30.0] and copies.tolist() == [0, 2, 0, 2]
    (plain,) = minibatch(x, torch.tensor([3, 1]))
    assert plain[:, 0].tolist() == [30.0, 10.0]


# GEOM in bf16 at its smoke lr (1e-3): after 4 sign-like Adam steps its classifier's outputs are
# near-constant and the Dirichlets' precisions huge (alpha sums 1e5-1e6), so the Dirichlet score
# magnifies the bf16 rounding of the stacked step: 4e-3 and 1.4e-2 (seeds 0, 1) where the same
# networks' simple score differs by 1.4e-4; at lr 1e-4 5e-4 and 1e-4 (CPU, 1 thread). fp32: ~1e-7.
GEOM_GOAD = {("geom", "fp32"): {}, ("geom", "bf16"): {"lr": 1e-4}, ("goad", "fp32"): {}, ("goad", "bf16"): {}}


@pytest.mark.parametrize("name, precision", list(GEOM_GOAD))
def test_geom_and_goad_stacked_jobs_score_as_solo_jobs(name, precision, separable_task, monkeypatch):
    # Their samples are (image, transformation) pairs (GEOM: Stage.copies; GOAD: all 72 of each image).
    X, X_test, _ = separable_task(n_train=64)
    X_test = X_test[::8]  # 72 passes per image
    build = smoke(name, **GEOM_GOAD[name, precision])
    options = TrainOptions(precision=precision)
    dtypes: list = []
    original = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: dtypes.append(original(*a, **k).dtype)
                        or original(*a, **k))
    stacked = [build(0), build(1)]
    assert fit_jobs(stacked, [X, X], options=options) == [None, None]
    assert (torch.bfloat16 in dtypes) == (precision == "bf16")
    monkeypatch.undo()
    solo = [build(seed) for seed in range(2)]
    for det in solo:
        assert fit_jobs([det], [X], options=options) == [None]
    got, expected = [det.decision_function(X_test) for det in stacked], [det.decision_function(X_test) for det in solo]
    for k in range(2):
        assert rel_diff(got[k], expected[k]) <= RTOL
        assert same_structure(stacked[k].training_log_, solo[k].training_log_)
        assert stacked[k].training_log_["steps"] == 4
    # Negative control: the other job's solo model is much further off than the job's own.
    assert rel_diff(got[0], expected[1]) > 10 * rel_diff(got[0], expected[0])


def test_stacked_goad_jobs_of_different_sizes_keep_their_own_centres(separable_task):
    # 8 and 12 images in batches of 4: job 0 sits out every epoch's third step (no features summed).
    build = smoke("goad", batch_size=4, epochs=2, max_steps=None)
    tasks = [separable_task(n_train=n, seed=i) for i, n in enumerate([8, 12])]
    stacked = [build(0), build(1)]
    assert fit_jobs(stacked, [X for X, _, _ in tasks]) == [None, None]
    for k, (X, X_test, _) in enumerate(tasks):
        solo = build(k).fit(X)
        torch.testing.assert_close(stacked[k].centres_, solo.centres_, rtol=RTOL, atol=1e-6)
        assert rel_diff(stacked[k].decision_function(X_test[::8]), solo.decision_function(X_test[::8])) <= RTOL
        assert stacked[k].training_log_["steps"] == solo.training_log_["steps"] == [4, 6][k]
