"""GANomaly (and, where parametrised, Mem_GANomaly, which shares its network and training loop):
network shapes, preprocessing, the shared-forward gradients against the authors' separate passes,
the score and losses against hand-worked values, logging, the authors' settings. The checks every
detector passes (score shape, batch-independent scores, determinism, direction, divergence, the
epoch callback, hyperparameter errors) are in tests/test_detector_contract.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.ganomaly import PROFILES, GANomaly
from methods.mem_ganomaly import MemGANomaly

TINY = dict(ngf=8, ndf=8, nz=8, batch_size=16, device="cpu")
BOTH = [GANomaly, pytest.param(MemGANomaly, id="MemGANomaly")]


def tiny(cls, **kwargs):
    extra = {"memory_size": 10} if cls is MemGANomaly else {}
    return cls(**{**TINY, **extra, **kwargs})


def images(n: int, channels: int, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, size, size), dtype=np.float32)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_network_shapes(cls, channels, size):
    X = images(40, channels, size)
    det = tiny(cls, epochs=1, max_steps=2).fit(X)
    with torch.inference_mode():
        x = det._preprocess(torch.from_numpy(X[:5]))
        x_hat, z, z_hat, weights = det._reconstruct(x)
        _, features = det.netd_(x)
    assert x.shape == x_hat.shape == (5, channels, 32, 32)
    assert z.shape == z_hat.shape == (5, 8)
    assert features.shape == (5, 32, 4, 4)  # the map before D's last conv (ndf * 4 channels)
    assert (x_hat.abs() <= 1).all()
    if cls is MemGANomaly:
        assert weights.shape == (5, 10)


def test_preprocess_resizes_to_32_and_scales_to_minus_one_one():
    det = GANomaly()
    x = det._preprocess(torch.cat([torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28)]))
    assert x.shape == (2, 1, 32, 32)
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0)) and torch.allclose(x[1], torch.ones_like(x[1]))


def test_first_conv_uses_the_papers_padding():
    det = tiny(GANomaly, epochs=1, max_steps=1).fit(images(16, 1))
    first = det.netg_["encoder"].features.body[0]
    assert (first.kernel_size, first.stride, first.padding) == ((4, 4), (2, 2), (1, 1))


@pytest.mark.parametrize("cls", BOTH)
def test_shared_forward_gives_the_authors_gradients(cls):
    """One D pass on x and one on x_hat, with backward(inputs=...), give G and D exactly the
    gradients of the authors' separate G step (D on x and x_hat) and D step (D on x, x_hat.detach())."""
    det = tiny(cls, epochs=1, max_steps=1).fit(images(32, 1))
    det._set_mode(train=True)
    x = det._preprocess(torch.from_numpy(images(16, 1, seed=1)))
    g_params, d_params = list(det.netg_.parameters()), list(det.netd_.parameters())

    g_loss, d_loss, _ = det._forward_losses(x)
    ours_g = torch.autograd.grad(g_loss, g_params, retain_graph=True)
    ours_d = torch.autograd.grad(d_loss, d_params)

    x_hat, z, z_hat, weights = det._reconstruct(x)       # authors' G step: fresh passes, nothing detached
    _, feat_real = det.netd_(x)
    logit_fake, feat_fake = det.netd_(x_hat)
    g_ref, _ = det._generator_loss(x, x_hat, z, z_hat, feat_real, feat_fake, logit_fake, weights)
    ref_g = torch.autograd.grad(g_ref, g_params)
    logit_real, _ = det.netd_(x)                          # authors' D step on the detached fakes
    logit_fake, _ = det.netd_(x_hat.detach())
    ref_d = torch.autograd.grad(det._discriminator_loss(logit_real, logit_fake), d_params)

    for ours, ref in zip(ours_g + ours_d, ref_g + ref_d):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


def test_score_is_the_mean_squared_latent_distance():
    X = images(32, 1)
    det = tiny(GANomaly, epochs=1, max_steps=2).fit(X)
    with torch.inference_mode():
        _, z, z_hat, _ = det._reconstruct(det._preprocess(torch.from_numpy(X)))
    np.testing.assert_allclose(det.decision_function(X), ((z - z_hat) ** 2).mean(dim=1).numpy(), rtol=1e-5)


def test_generator_loss_is_the_authors_weighted_sum():
    det = tiny(GANomaly)
    torch.manual_seed(0)
    x, x_hat, z, z_hat, fr, ff = (torch.randn(4, 3) for _ in range(6))
    total, parts = det._generator_loss(x, x_hat, z, z_hat, fr, ff, torch.zeros(4), None)
    expected = F.mse_loss(ff, fr) + 50 * F.l1_loss(x_hat, x) + F.mse_loss(z_hat, z)
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"adv", "con", "enc"}
    # D: GANomaly halves BCE(real) + BCE(fake); a logit of 0 is D = 1/2 -> (ln 2 + ln 2) / 2
    assert det._discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(np.log(2), rel=1e-6)


def test_training_log():
    det = tiny(GANomaly, epochs=2).fit(images(40, 1))
    log = det.training_log_
    assert not det.netg_.training and not det.netd_.training
    assert log["epochs_run"] == 2 and log["steps"] == 4   # 40 images, batch 16, drop_last
    assert set(log["epoch_mean_losses"]) == {"g", "d", "adv", "con", "enc"}
    assert all(len(v) == 2 and np.isfinite(v).all() for v in log["epoch_mean_losses"].values())
    assert log["d_reinit_count"] == len(log["d_reinit_epochs"])
    assert log["d_collapse_check_every_steps"] == 1


def test_discriminator_reinit_is_recorded():
    det = tiny(GANomaly, epochs=2, d_reinit_threshold=1e9).fit(images(40, 1))  # every D loss "collapses"
    assert det.training_log_["d_reinit_count"] == 4
    assert det.training_log_["d_reinit_epochs"] == [1, 1, 2, 2]


def test_max_steps_caps_training():
    det = tiny(GANomaly, epochs=5, max_steps=3).fit(images(64, 1))
    assert det.training_log_["steps"] == 3 and det.training_log_["epochs_run"] == 1


def test_profiles_follow_the_authors():
    defaults = GANomaly().get_params()
    optimiser = (defaults["epochs"], defaults["batch_size"], defaults["lr"], defaults["beta1"], defaults["beta2"])
    assert optimiser == (15, 64, 2e-4, 0.5, 0.999)
    assert (defaults["w_adv"], defaults["w_con"], defaults["w_enc"], defaults["nz"]) == (1.0, 50.0, 1.0, 100)
    assert PROFILES["paper"] == {"*": {}}
