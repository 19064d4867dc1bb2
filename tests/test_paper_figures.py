"""The paper's Figs. 4-6 (benchmark/paper_figures.py): drawn from records (Fig. 6) and from a
smoke-budget model on tiny fake MNIST (Figs. 4 and 5); the PNGs are written and not empty."""
from __future__ import annotations

import numpy as np
import pytest

from benchmark.paper_figures import fig6, fig6_curves, main
from fault_methods import write_fake_mnist
from record_factory import write_fake_record


def _per_epoch(values):
    return {"auroc_per_epoch": [{"epoch": i + 1, "auroc": v} for i, v in enumerate(values)],
            "best_epoch_on_test_OPTIMISTIC": {"epoch": int(np.argmax(values)) + 1, "auroc": max(values)}}


def test_fig6_one_curve_per_memory_size(tmp_path):
    results = tmp_path / "results"
    curves = {50: [0.5, 0.6, 0.7], 500: [0.4, 0.45, 0.5]}
    for n, values in curves.items():
        for seed in (0, 1):
            write_fake_record(results, "cifar10", 0, "mem_ganomaly", values[-1], seed=seed, protocol="paper",
                              profile=f"quick+sweep-mem_ganomaly.memory_size={n}+epochs=3",
                              hyperparameters={"memory_size": n, "epochs": 3, "lr": 0.002},
                              diagnostics=_per_epoch([v + seed / 100 for v in values]))
    write_fake_record(results, "cifar10", 0, "mem_ganomaly", 0.5, profile="quick+sweep-mem_ganomaly.memory_size=99",
                      hyperparameters={"memory_size": 99})  # no --track-auroc: not a curve
    write_fake_record(results, "cifar10", 1, "mem_ganomaly", 0.5,
                      profile="quick+sweep-mem_ganomaly.memory_size=50+epochs=3",
                      diagnostics=_per_epoch([0.1]))        # another class
    found = fig6_curves(results, "quick+sweep-mem_ganomaly.memory_size=*")
    assert sorted((c["memory_size"], c["seed"]) for c in found) == [(50, 0), (50, 1), (500, 0), (500, 1)]
    png, md = fig6(results, "quick+sweep-mem_ganomaly.memory_size=*", tmp_path / "out" / "fig6.png")
    assert png.stat().st_size > 5000
    caption = md.read_text()
    assert "3 epochs, lr 0.002, quick profile" in caption
    # N = 50: seeds (0.5, 0.6, 0.7) and (0.51, 0.61, 0.71): best of the mean curve 0.705 at epoch 3
    assert "| 50 | 3 | 0.002 | quick | 2 | 0.7000 | 0.7050 (epoch 3) |" in caption


def test_fig6_without_records_is_a_usage_error(tmp_path, capsys):
    assert main(["fig6", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    assert "--track-auroc" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fig45_smoke_on_fake_mnist(tmp_path, monkeypatch):
    import methods.mem_ganomaly

    small = {"*": {**methods.mem_ganomaly.PROFILES["smoke"]["*"],
                   "nz": 8, "ngf": 8, "ndf": 8}}  # the same path, cheaper
    monkeypatch.setitem(methods.mem_ganomaly.PROFILES, "smoke", small)
    data = tmp_path / "data"
    write_fake_mnist(data)
    out = tmp_path / "figures"
    code = main(["fig45", "--data-root", str(data), "--no-download", "--out-dir", str(out), "--profile", "smoke",
                 "--max-steps", "2", "--tsne-samples", "40", "--device", "cpu"])
    assert code == 0
    for name in ("fig4_tsne", "fig5_reconstructions"):
        assert (out / f"{name}.png").stat().st_size > 5000
    assert "40 MNIST test images" in (out / "fig4_tsne.md").read_text()
    assert "20 MNIST test images" in (out / "fig5_reconstructions.md").read_text()


@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--lr", "-1"]])
def test_fig45_bad_options_exit_2(bad, tmp_path):
    assert main(["fig45", "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "o"), *bad]) == 2
    assert not (tmp_path / "o").exists()


def test_latents_and_reconstruct_shapes(separable_task):
    from methods.mem_ganomaly import MemGANomaly

    X_train, X_test, _ = separable_task(n_train=32, n_test_normal=4, n_test_anomalous=4)
    detector = MemGANomaly(epochs=1, batch_size=16, max_steps=1, nz=8, ngf=8, ndf=8, memory_size=10, device="cpu",
                           score_batch_size=3).fit(X_train)
    z, z_hat = detector.latents(X_test)
    x_hat = detector.reconstruct(X_test)
    assert z.shape == z_hat.shape == (8, 8) and x_hat.shape == (8, 1, 32, 32)
    assert 0 <= x_hat.min() and x_hat.max() <= 1
    # the score (eq. 33) is the mean |z - z_hat|: the same numbers through both paths
    np.testing.assert_allclose(np.abs(z - z_hat).mean(axis=1), detector.decision_function(X_test), rtol=1e-5)
