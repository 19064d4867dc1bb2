"""The training engine (methods/engine/): one description per detector, K = 1 as a plain PyTorch loop,
K > 1 stacked, bf16 stacked, options only through `fit_jobs`, the step clock and progress display.

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
from methods.engine import fit_jobs
from methods.memae import MemAE, memae_loss
from test_stacking import DEEP, RTOL, STABLE, STACKABLE, rel_diff, smoke

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
