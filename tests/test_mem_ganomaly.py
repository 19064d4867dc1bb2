"""Mem_GANomaly's own parts: the memory bottleneck, the losses of eqs. 22-32 under both presets
and reductions, the eq. 33 score, its settings and logs. The network and training loop shared
with GANomaly (shapes, shared-forward gradients) are tested, parametrised over both classes, in
test_ganomaly.py; the checks every detector passes (determinism, divergence, the epoch callback,
hyperparameter errors, ...) in tests/test_detector_contract.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone

from methods.mem_ganomaly import PRESETS, PROFILES, MemGANomaly

TINY = dict(ngf=8, ndf=8, nz=8, batch_size=16, memory_size=10, device="cpu")


def images(n: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, 28, 28), dtype=np.float32)


def loss_inputs():
    torch.manual_seed(0)
    x, x_hat = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    z, z_hat = torch.randn(2, 3), torch.randn(2, 3)
    f_real, f_fake = torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    logit_fake = torch.tensor([0.0, 1.0])
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # entropies 0 and ln 2 -> mean ln(2) / 2
    return x, x_hat, z, z_hat, f_real, f_fake, logit_fake, weights


def test_presets_and_explicit_weights():
    assert MemGANomaly().loss_weights() == {"eta_adv": 1.0, "eta_con": 50.0, "eta_enc": 1.0, "eta_w": 0.0002,
                                            "eta_gan": 0.0}
    assert MemGANomaly(preset="algorithm1").loss_weights() == dict.fromkeys(PRESETS["ganomaly"], 1.0)
    assert MemGANomaly(preset="algorithm1", eta_w=0.5).loss_weights()["eta_w"] == 0.5


def test_generator_loss_ganomaly_preset_mean_reduction():
    x, x_hat, z, z_hat, fr, ff, logit, w = loss_inputs()
    total, parts = MemGANomaly()._generator_loss(x, x_hat, z, z_hat, fr, ff, logit, w)
    expected = {"adv": F.mse_loss(ff, fr), "con": F.mse_loss(x_hat, x), "enc": (z - z_hat).abs().mean(),
                "w": torch.tensor(math.log(2) / 2)}
    assert set(parts) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(parts[name], value)
    torch.testing.assert_close(total, expected["adv"] + 50 * expected["con"] + expected["enc"] + 0.0002 * expected["w"])


def test_generator_loss_algorithm1_preset_norm_reduction():
    x, x_hat, z, z_hat, fr, ff, logit, w = loss_inputs()
    detector = MemGANomaly(preset="algorithm1", reduction="norm")
    total, parts = detector._generator_loss(x, x_hat, z, z_hat, fr, ff, logit, w)
    adv = torch.stack([(ff[i] - fr[i]).norm() for i in range(2)]).mean()          # (22), unsquared l2
    con = torch.stack([(x_hat[i] - x[i]).norm() for i in range(2)]).mean()        # (24)
    enc = (z - z_hat).abs().sum(dim=1).mean()                                     # (26), l1 norm
    gan = -torch.log(torch.sigmoid(logit)).mean()                                 # -log D(x_hat)
    for name, value in {"adv": adv, "con": con, "enc": enc, "gan": gan}.items():
        torch.testing.assert_close(parts[name], value)
    torch.testing.assert_close(total, adv + con + enc + math.log(2) / 2 + gan)


def test_discriminator_loss_is_eq_32_unhalved():
    # D(x) = D(x_hat) = 1/2: -log(1/2) - log(1 - 1/2) = 2 ln 2
    loss = MemGANomaly()._discriminator_loss(torch.zeros(3), torch.zeros(3)).item()
    assert loss == pytest.approx(2 * math.log(2), rel=1e-6)


def test_memory_sits_between_encoder_and_decoder_and_score_is_eq_33():
    X = images(40)
    det = MemGANomaly(**TINY, epochs=1, max_steps=2).fit(X)
    with torch.inference_mode():
        x = det._preprocess(torch.from_numpy(X))
        z = det.netg_["encoder"](x).flatten(1)
        z_mem, w = det.netg_["memory"](z)
        z_hat = det.netg_["encoder2"](det.netg_["decoder"](z_mem)).flatten(1)
        x_hat, z2, z_hat2, w2 = det._reconstruct(x)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(z_hat2, z_hat)
    torch.testing.assert_close(w2, w)
    sums = w.sum(dim=1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))  # renormalised rows (or all cut)
    np.testing.assert_allclose(det.decision_function(X), (z - z_hat).abs().mean(dim=1).numpy(), rtol=1e-5)


@pytest.mark.parametrize("preset", ["ganomaly", "algorithm1"])
def test_training_log_records_the_preset(preset):
    det = MemGANomaly(**TINY, epochs=2, preset=preset).fit(images(40))
    log = det.training_log_
    json.dumps(log)
    assert log["preset"] == preset and log["loss_weights"] == det.loss_weights()
    assert log["shrink_threshold_used"] == pytest.approx(1 / 10)   # lambda = 1/N by default
    expected = {"g", "d", "adv", "con", "enc", "w"} | ({"gan"} if preset == "algorithm1" else set())
    assert set(log["epoch_mean_losses"]) == expected
    assert all(len(v) == 2 and np.isfinite(v).all() for v in log["epoch_mean_losses"].values())
    assert np.isfinite(det.decision_function(images(8, seed=1))).all()


def test_explicit_shrink_threshold_and_cosine_addressing():
    det = MemGANomaly(**TINY, epochs=1, max_steps=1, shrink_threshold=0.05, addressing="cosine").fit(images(32))
    assert det.netg_["memory"].shrink_threshold == 0.05 and det.netg_["memory"].addressing == "cosine"


def test_memory_gets_gradients_during_training():
    det = MemGANomaly(**TINY, epochs=1, max_steps=1)
    det.fit(images(32))
    initial = det.netg_["memory"].memory.detach().clone()
    det.set_params(max_steps=3).fit(images(32))
    assert not torch.equal(initial, det.netg_["memory"].memory.detach())  # the same seed, more steps


def test_params_and_profiles():
    params = MemGANomaly().get_params()
    assert "w_adv" not in params and params["preset"] == "ganomaly" and params["lr"] == 2e-3
    assert (params["batch_size"], params["beta1"], params["beta2"], params["nz"]) == (64, 0.5, 0.999, 100)
    assert params["shrink_threshold"] is None and params["eps"] == 1e-12 and params["reduction"] == "mean"
    clone(MemGANomaly(preset="algorithm1"))
    paper = PROFILES["paper"]
    assert {k: (v["memory_size"], v["epochs"]) for k, v in paper.items()} == {
        "mnist": (100, 60), "fashion_mnist": (1600, 100), "cifar10": (1400, 150), "*": (100, 60)}
    for profile in PROFILES.values():
        for settings in profile.values():
            assert "lr" not in settings  # every profile keeps the paper's lr 2e-3
