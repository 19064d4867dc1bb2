"""DAGMM: the energy against closed-form Gaussian log-densities, the mixture parameters from given
memberships, the reconstruction features, the whole-training-set GMM, determinism, score
direction and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.metrics import roc_auc_score

import methods.dagmm as dg
from methods.base import DivergedError
from methods.dagmm import DAGMM, inverse_diagonal_sum, mixture_parameters, reconstruction_features, sample_energy

TINY = dict(hidden_dims=(32, 8), batch_size=32, device="cpu")
SEPARABLE = dict(TINY, epochs=30, lr=1e-3)


def test_energy_of_one_gaussian_is_minus_log_density() -> None:
    mu = np.array([1.0, -1.0])
    sigma = np.array([[2.0, 0.5], [0.5, 1.0]])
    z = np.array([[1.0, -1.0], [0.0, 0.0], [3.0, 2.0], [-2.0, 0.5]])
    chol = torch.linalg.cholesky(torch.tensor(sigma)[None])
    energy = sample_energy(torch.tensor(z), torch.tensor([1.0], dtype=torch.float64), torch.tensor(mu)[None], chol)
    np.testing.assert_allclose(energy.numpy(), -multivariate_normal(mu, sigma).logpdf(z), rtol=1e-12)
    # By hand at the mean: -log N(mu; mu, Sigma) = log(2 pi) + log|Sigma| / 2, |Sigma| = 1.75.
    assert energy[0].item() == pytest.approx(np.log(2 * np.pi) + 0.5 * np.log(1.75), rel=1e-12)


def test_energy_of_a_mixture_and_far_points_stay_finite() -> None:
    phi = np.array([0.3, 0.7])
    mu = np.array([[0.0, 0.0], [4.0, 1.0]])
    sigma = np.array([[[1.0, 0.0], [0.0, 0.25]], [[0.5, -0.2], [-0.2, 0.3]]])
    z = np.array([[0.5, 0.1], [4.0, 1.0], [2.0, 0.5], [1e3, -1e3]])  # the last: exp(-maha/2) underflows
    log_parts = np.stack([np.log(phi[k]) + multivariate_normal(mu[k], sigma[k]).logpdf(z) for k in range(2)], axis=1)
    chol = torch.linalg.cholesky(torch.tensor(sigma))
    energy = sample_energy(torch.tensor(z), torch.tensor(phi), torch.tensor(mu), chol).numpy()
    np.testing.assert_allclose(energy, -logsumexp(log_parts, axis=1), rtol=1e-10)
    assert np.isfinite(energy).all() and energy[3] > 1e5
    # The float32 path is finite as well.
    energy32 = sample_energy(torch.tensor(z, dtype=torch.float32), torch.tensor(phi, dtype=torch.float32),
                             torch.tensor(mu, dtype=torch.float32), chol.float())
    assert torch.isfinite(energy32).all()


def test_mixture_parameters_from_given_memberships() -> None:
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    gamma = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    phi, mu, sigma = mixture_parameters(gamma, z)
    # phi_k = mean_i gamma_ik; mu_k = sum_i gamma_ik z_i / sum_i gamma_ik.
    np.testing.assert_allclose(phi.numpy(), [2.5 / 4, 1.5 / 4])
    np.testing.assert_allclose(mu.numpy(), [[3.0 / 2.5, 1.0 / 2.5], [1.0 / 1.5, 3.0 / 1.5]])
    # Component 2 by hand: weights (1, 0.5) on (0, 2), (2, 2); mean (2/3, 2):
    # Sigma = [1 * (2/3)^2 + 0.5 * (4/3)^2, 0; 0, 0] / 1.5 = [[8/9, 0], [0, 0]].
    np.testing.assert_allclose(sigma[1].numpy(), [[8 / 9, 0.0], [0.0, 0.0]], atol=1e-12)
    for k in range(2):
        expected = np.cov(z.numpy().T, aweights=gamma[:, k].numpy(), bias=True)
        np.testing.assert_allclose(sigma[k].numpy(), expected, atol=1e-12)
    _, _, jittered = mixture_parameters(gamma, z, jitter=1e-3)
    np.testing.assert_allclose((jittered - sigma).numpy(), np.broadcast_to(1e-3 * np.eye(2), (2, 2, 2)), atol=1e-15)


def test_inverse_diagonal_sum() -> None:
    sigma = np.array([[[2.0, 0.5], [0.5, 1.0]], [[4.0, 0.0], [0.0, 0.5]]])
    expected = sum(np.diag(np.linalg.inv(s)).sum() for s in sigma)  # 3/1.75 + 0.25 + 2
    value = inverse_diagonal_sum(torch.linalg.cholesky(torch.tensor(sigma))).item()
    assert value == pytest.approx(expected, rel=1e-12) and value == pytest.approx(3 / 1.75 + 2.25, rel=1e-12)


def test_reconstruction_features_by_hand() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    x_rec = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    features = reconstruction_features(x, x_rec, eps=1e-8)
    # ||x - x'|| / ||x|| = 4 / 5; cos = 9 / (5 * 3). A zero image stays finite thanks to eps.
    np.testing.assert_allclose(features[0].numpy(), [0.8, 0.6], rtol=1e-6)
    assert torch.isfinite(features).all()


@pytest.fixture(scope="module", params=[(1, 28), (3, 32)], ids=["1x28x28", "3x32x32"])
def fitted(request):
    from conftest import make_separable_task

    channels, size = request.param
    X_train, X_test, y_test = make_separable_task(96, 32, 32, channels, size, seed=0)
    return DAGMM(**SEPARABLE).fit(X_train), X_train, X_test, y_test


def test_training_log_and_batch_independent_scores(fitted) -> None:
    # Shape, dtype, finiteness, direction and determinism: tests/test_detector_contract.py.
    model, _, X_test, y_test = fitted
    scores = model.decision_function(X_test)
    assert roc_auc_score(y_test, scores) > 0.9  # the GMM below is the one that separates
    assert len(model.training_log_["loss"]) == 30 and np.isfinite(model.training_log_["loss"]).all()
    # A score does not depend on the other images of its batch (no dropout, fixed GMM).
    np.testing.assert_allclose(model.decision_function(X_test[:3]), scores[:3], rtol=1e-6)


def test_mixture_is_estimated_on_the_whole_training_set(fitted) -> None:
    model, X_train, X_test, _ = fitted
    with torch.no_grad():
        z, gamma, _ = model._codes(model._preprocess(torch.from_numpy(X_train)))
        phi, mu, sigma = mixture_parameters(gamma, z, model.cov_jitter)
        torch.testing.assert_close(model.phi_, phi)
        torch.testing.assert_close(model.mu_, mu)
        torch.testing.assert_close(model.sigma_, sigma)
        z_test, _, _ = model._codes(model._preprocess(torch.from_numpy(X_test)))
        expected = sample_energy(z_test, phi, mu, torch.linalg.cholesky(sigma)).numpy()
    np.testing.assert_allclose(model.decision_function(X_test), expected, rtol=1e-5)
    assert phi.sum().item() == pytest.approx(1.0)


def test_epoch_callback_sees_a_scoring_model(separable_task) -> None:
    X_train, X_test, _ = separable_task(64, 4, 4, channels=1, size=28, seed=1)
    seen = []
    model = DAGMM(**TINY, epochs=2).fit(X_train,
                                        epoch_callback=lambda e, det: seen.append((e, det.decision_function(X_test))))
    assert [e for e, _ in seen] == [1, 2]
    np.testing.assert_allclose(seen[-1][1], model.decision_function(X_test))
    # The callback's extra eval-mode passes do not change training.
    plain = DAGMM(**TINY, epochs=2).fit(X_train).decision_function(X_test)
    np.testing.assert_array_equal(plain, model.decision_function(X_test))


def test_divergence_raises(separable_task, monkeypatch) -> None:
    X_train, _, _ = separable_task(64, 4, 4, channels=1, size=28, seed=0)
    with pytest.raises(DivergedError):
        DAGMM(**TINY, epochs=3, lr=1e30).fit(X_train)
    monkeypatch.setattr(dg, "inverse_diagonal_sum", lambda chol: chol.sum() * float("nan"))
    with pytest.raises(DivergedError) as info:
        DAGMM(**TINY, epochs=3).fit(X_train)
    assert info.value.epoch == 1 and info.value.step == 1


def test_grad_clipping_runs(separable_task) -> None:
    X_train, X_test, _ = separable_task(64, 4, 4, channels=1, size=28, seed=0)
    scores = DAGMM(**TINY, epochs=2, grad_clip_norm=5.0).fit(X_train).decision_function(X_test)
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("name, value", [
    ("epochs", 0), ("batch_size", -2), ("latent_dim", 0), ("n_components", 1.5), ("estimation_hidden", 0),
    ("hidden_dims", (16, 0)), ("hidden_dims", "256"), ("dropout", 1.0), ("lambda_energy", -0.1),
    ("lambda_cov", float("inf")), ("lr", 0.0), ("cov_jitter", -1e-6), ("eps", 0.0), ("grad_clip_norm", -5.0),
])
def test_bad_hyperparameters(name: str, value) -> None:
    with pytest.raises(ValueError, match=name):
        DAGMM(**{name: value}).check_params()

