"""CUDA-graph capture of the training step (methods/engine/graphs.py, --cuda-graphs).

On a CPU machine (CI) the capture itself cannot run: the tests that capture skip without CUDA.
What the CPU can check: the optimiser state the capture relies on lives on the device and an lr
schedule reaches it, a tensor mask steps like a numpy one, and every way of asking for graphs on
a CPU is refused with a clear error (exit 2 for the CLI) before anything trains.

Tolerance of the graphed-vs-eager comparisons (CUDA only): RTOL of tests/test_stacking.py. A
replayed graph runs the same kernels as the eager step, so on one GPU the two differ only where
cuDNN picks other algorithms or atomics reorder sums.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.cli import main
from methods.base import TrainOptions
from methods.engine import fit_jobs
from methods.engine.graphs import GraphedStep
from methods.engine.optimisers import StackedAdam
from test_stacking import RTOL, STABLE, STACKABLE, rel_diff, smoke

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device (none here)")


def test_stacked_adam_keeps_its_state_on_the_device_and_follows_an_lr_schedule():
    torch.manual_seed(0)
    w = torch.randn(2, 3)
    ref = [torch.nn.Parameter(w[k].clone()) for k in range(2)]
    opts = [torch.optim.Adam([p], lr=0.1) for p in ref]
    stacked = torch.nn.Parameter(w.clone())
    opt = StackedAdam([stacked], lr=0.1)
    assert opt.step_counts.device == stacked.device and opt._lr.device == stacked.device
    lr_tensor = opt._lr
    for step in range(4):
        if step == 2:  # a schedule changes the lr between steps: the same device tensor, updated in place
            opt.lr = 0.01
            for o in opts:
                o.param_groups[0]["lr"] = 0.01
        grads = torch.randn(2, 3)
        for k in range(2):
            ref[k].grad = grads[k].clone()
            opts[k].step()
        stacked.grad = grads.clone()
        opt.step(torch.tensor([True, True]))  # a device mask, as a graphed step passes it
    assert opt._lr is lr_tensor and float(opt._lr) == pytest.approx(0.01) and opt.lr == pytest.approx(0.01)
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in ref]), rtol=1e-6, atol=1e-7)


def test_a_tensor_mask_steps_as_a_numpy_mask():
    torch.manual_seed(1)
    w, grads = torch.randn(3, 4), [torch.randn(3, 4) for _ in range(3)]
    results = []
    for as_tensor in (False, True):
        p = torch.nn.Parameter(w.clone())
        opt = StackedAdam([p], lr=0.05)
        for step, g in enumerate(grads):
            mask = np.array([True, step != 1, False])
            p.grad = g.clone()
            opt.step(torch.from_numpy(mask) if as_tensor else mask)
        results.append((p.detach().clone(), opt.steps.tolist()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert results[0][1] == results[1][1] == [3, 2, 0]
    torch.testing.assert_close(results[1][0][2], w[2], rtol=0, atol=0)  # the idle job never moved


def test_graphs_are_refused_on_a_cpu():
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(lambda x: x, torch.device("cpu"))
    det = smoke("ganomaly")(0)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        fit_jobs([det], [np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)],
                 options=TrainOptions(cuda_graphs=True))


def test_cli_refuses_cuda_graphs_without_a_gpu(tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["--dataset", "mnist", "--methods", "ganomaly", "--classes", "0", "--profile", "smoke",
                 "--device", "cpu", "--cuda-graphs", "--results-dir", str(results), "--no-download"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs needs a CUDA device" in err and "drop the flag" in err
    assert not results.exists()


def build(name: str, seed: int, **extra):
    return smoke(name, narrow=True, device="cuda", **{**STABLE.get(name, {}), **extra})(seed)


GRAPHS = TrainOptions(cuda_graphs=True)


def graph_budget(name: str) -> dict:
    """12 steps at batch 16 in each stage (f-AnoGAN at n_critic 2: 6 generator steps, so its
    generator phase is captured and replayed too, after the 3 warm-up steps)."""
    if name == "f_anogan":
        return {"gan_epochs": 2, "gan_max_steps": 12, "encoder_max_steps": 12, "batch_size": 16}
    budget = {"epochs": 2, "max_steps": 12, "batch_size": 16}
    if name in ("dsvdd", "dsvdd_soft"):
        budget.update(ae_epochs=2, ae_max_steps=12, ae_batch_size=16)
    return budget


@needs_cuda
@pytest.mark.parametrize("name", STACKABLE)
def test_a_graphed_fit_scores_as_an_eager_fit(name, separable_task):
    X, X_test, _ = separable_task(n_train=128)
    budget = graph_budget(name)
    eager = build(name, 0, **budget).fit(X)
    graphed = build(name, 0, **budget)
    assert fit_jobs([graphed], [X], options=GRAPHS) == [None]
    stats = graphed.run_info()["graph_steps"]
    assert all(s["captured"] and s["replayed_steps"] > 0 for s in stats.values()), stats
    assert rel_diff(graphed.decision_function(X_test), eager.decision_function(X_test)) <= RTOL
    assert graphed.training_log_.keys() == eager.training_log_.keys()


@needs_cuda
@pytest.mark.parametrize("name", STACKABLE)
def test_graphed_stacked_jobs_score_as_solo_jobs(name, separable_task):
    tasks = [separable_task(n_train=128, seed=i) for i in range(3)]
    budget = graph_budget(name)
    stacked = [build(name, s, **budget) for s in range(3)]
    assert fit_jobs(stacked, [X for X, _, _ in tasks], options=GRAPHS) == [None, None, None]
    for seed, (X, X_test, _) in enumerate(tasks):
        solo = build(name, seed, **budget).fit(X)
        assert rel_diff(stacked[seed].decision_function(X_test), solo.decision_function(X_test)) <= RTOL

