"""MemAE: network shapes under both memory layouts, numerics of the loss and score against
hand-worked values, its settings. The checks every detector passes (score shape, determinism,
direction, divergence, the epoch callback, hyperparameter errors) are in
tests/test_detector_contract.py. Tiny data, CPU, seconds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.memae import PROFILES, MemAE, MemAENet, memae_loss, reconstruction_error

TINY = dict(num_slots=10, widths=(4, 8), epochs=1, batch_size=16, device="cpu")


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("layout", ["position", "image"])
def test_network_shapes_and_scores_under_both_layouts(separable_task, channels, size, layout):
    X_train, X_test, _ = separable_task(n_train=32, n_test_normal=5, n_test_anomalous=5, channels=channels, size=size)
    det = MemAE(**TINY, memory_layout=layout).fit(X_train)
    scores = det.decision_function(X_test)
    assert np.isfinite(scores).all() and (scores >= 0).all()  # a mean squared error
    assert len(det.training_log_["epoch_mean_loss"]) == 1 and det.training_log_["steps"] == 2
    # Native size in, native size out (28 -> 14 -> 7 -> 4 and back through computed paddings).
    x = torch.zeros(2, channels, size, size)
    x_hat, weights = det.net_(x)
    assert x_hat.shape == x.shape
    expected = (2, 10, 7, 7) if size == 28 else (2, 10, 8, 8)
    assert weights.shape == (expected if layout == "position" else (2, 10))


@pytest.mark.parametrize("size", [20, 28, 31, 32])
def test_decoder_restores_any_size(size):
    net = MemAENet(1, size, size, (4, 8, 16), 10, None, "dot", "tanh")
    assert net(torch.zeros(2, 1, size, size))[0].shape == (2, 1, size, size)


def test_loss_is_mse_plus_weighted_entropy():
    # x = 0, x_hat = 0.5 everywhere: MSE = 0.25. Weights uniform over 4 slots at every position:
    # entropy = ln 4 per position, and the mean over images and positions is ln 4 too.
    x = torch.zeros(2, 1, 4, 4)
    x_hat = torch.full_like(x, 0.5)
    weights = torch.full((2, 4, 3, 3), 0.25)
    total, mse, entropy = memae_loss(x, x_hat, weights, entropy_weight=0.0002)
    assert mse.item() == pytest.approx(0.25)
    assert entropy.item() == pytest.approx(math.log(4), rel=1e-6)
    assert total.item() == pytest.approx(0.25 + 0.0002 * math.log(4), rel=1e-6)
    # A one-hot address has zero entropy (0 log 0 = 0): the loss is the MSE alone.
    one_hot = torch.zeros(2, 4, 3, 3)
    one_hot[:, 1] = 1.0
    assert memae_loss(x, x_hat, one_hot, 0.0002)[0].item() == pytest.approx(0.25)


def test_reconstruction_error_by_hand():
    x = torch.zeros(2, 2, 1, 2)
    x_hat = torch.tensor([[[[3.0, 0.0]], [[4.0, 0.0]]],   # image 0: residuals (3, 4) at pixel 0
                          [[[1.0, 1.0]], [[1.0, 1.0]]]])  # image 1: residual 1 everywhere
    # mse: image 0 = (9 + 16) / 4; image 1 = 1.
    np.testing.assert_allclose(reconstruction_error(x, x_hat, "mse").numpy(), [25 / 4, 1.0])
    # position_l2: image 0 = mean(5, 0); image 1 = mean(sqrt 2, sqrt 2).
    np.testing.assert_allclose(reconstruction_error(x, x_hat, "position_l2").numpy(), [2.5, math.sqrt(2)], rtol=1e-6)


def test_scores_are_the_per_image_mse_in_minus_one_one_space(separable_task):
    X_train, X_test, _ = separable_task(n_train=16, n_test_normal=3, n_test_anomalous=3)
    det = MemAE(**TINY).fit(X_train)
    x = torch.from_numpy(X_test) * 2 - 1
    with torch.no_grad():
        x_hat, _ = det.net_(x)
    expected = ((x - x_hat) ** 2).mean(dim=(1, 2, 3)).double().numpy()
    np.testing.assert_allclose(det.decision_function(X_test), expected, rtol=1e-5)


def test_profiles_and_defaults():
    assert PROFILES["paper"]["mnist"]["num_slots"] == 100 and PROFILES["paper"]["cifar10"]["num_slots"] == 500
    assert MemAE().lr == 1e-4 and MemAE().epochs == 100 and MemAE().entropy_weight == 0.0002
