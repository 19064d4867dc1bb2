"""DAGMM: the energy against closed-form Gaussian log-densities, the mixture parameters from given
memberships, the reconstruction features, the loss of eq. 7 and its gradient, gradient clipping,
the whole-training-set GMM. The checks every detector passes (score shape, batch-independent
scores, determinism, divergence, the epoch callback, hyperparameter errors) are in
tests/test_detector_contract.py."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.metrics import roc_auc_score

from methods.dagmm import DAGMM, covariance_penalty, mixture_parameters, reconstruction_features, sample_energy

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


def test_covariance_penalty_is_the_sum_of_reciprocal_diagonals() -> None:
    # Zong et al.'s eq. 7: P = sum_k sum_j 1 / Sigma_k[j, j], here 1/2 + 1/1 + 1/4 + 1/0.5. The
    # diagonal of the inverse (3/1.75 + 2 for the first matrix) is a different quantity.
    sigma = torch.tensor([[[2.0, 0.5], [0.5, 1.0]], [[4.0, 0.0], [0.0, 0.5]]], dtype=torch.float64)
    assert covariance_penalty(sigma).item() == pytest.approx(0.5 + 1.0 + 0.25 + 2.0, rel=1e-12)
    assert covariance_penalty(sigma).item() != pytest.approx(3 / 1.75 + 2.25, rel=1e-3)


def test_reconstruction_features_by_hand() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    x_rec = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    features = reconstruction_features(x, x_rec, eps=1e-8)
    # ||x - x'|| / ||x|| = 4 / 5; cos = 9 / (5 * 3). A zero image stays finite thanks to eps.
    np.testing.assert_allclose(features[0].numpy(), [0.8, 0.6], rtol=1e-6)
    assert torch.isfinite(features).all()


def _eq7_terms(x: torch.Tensor, x_rec: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor,
               jitter: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three terms of paper eq. 7, written out without methods.dagmm's helpers.

    Parameters
    ----------
    x, x_rec : torch.Tensor
        (B, D) inputs and reconstructions.
    z, gamma : torch.Tensor
        (B, d) codes and (B, K) memberships, float64.
    jitter : float
        Added to each covariance diagonal (as the detector's cov_jitter).

    Returns
    -------
    (reconstruction, energy, penalty) : tuple of torch.Tensor
        mean_i ||x_i - x_i'||^2, mean_i E(z_i) and P(Sigma) = sum_k sum_j 1 / Sigma_k[j, j].
    """
    reconstruction = ((x - x_rec) ** 2).sum(dim=1).mean()
    d = z.shape[1]
    log_parts, penalty = [], torch.zeros((), dtype=z.dtype)
    for k in range(gamma.shape[1]):
        g = gamma[:, k]
        mu = (g[:, None] * z).sum(dim=0) / g.sum()
        diff = z - mu
        sigma = (g[:, None, None] * diff[:, :, None] * diff[:, None, :]).sum(dim=0) / g.sum()
        sigma = sigma + jitter * torch.eye(d, dtype=z.dtype)
        gaussian = torch.distributions.MultivariateNormal(mu, covariance_matrix=sigma)
        log_parts.append(torch.log(g.mean()) + gaussian.log_prob(z))
        penalty = penalty + sum(1.0 / sigma[j, j] for j in range(d))  # Zong et al.'s eq. 7
    energy = -torch.logsumexp(torch.stack(log_parts, dim=1), dim=1).mean()
    return reconstruction, energy, penalty


def _codes_by_hand(compression: torch.nn.Module, estimation: torch.nn.Module, x: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x', z, gamma) of a batch through the two networks, the code features computed here."""
    z_c, x_rec = compression(x)
    relative = torch.linalg.vector_norm(x - x_rec, dim=1) / (torch.linalg.vector_norm(x, dim=1) + eps)
    cosine = (x * x_rec).sum(dim=1) / (torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(x_rec, dim=1))
    z = torch.cat([z_c, relative[:, None], cosine[:, None]], dim=1)
    return x_rec, z.double(), estimation(z).double()


def test_loss_is_reconstruction_plus_weighted_energy_plus_weighted_covariance_penalty(separable_task) -> None:
    X_train, _, _ = separable_task(32, 0, 0, channels=1, size=28, seed=4)
    model = DAGMM(**TINY, epochs=1).fit(X_train)
    model._set_mode(train=False)  # no dropout: the memberships are a function of the batch
    x = model._preprocess(torch.from_numpy(X_train))
    with torch.no_grad():
        x_rec, z, gamma = _codes_by_hand(model.compression_, model.estimation_, x, model.eps)
        reconstruction, energy, penalty = (t.item() for t in _eq7_terms(x, x_rec, z, gamma, model.cov_jitter))
        losses = {}
        for lambda_energy, lambda_cov in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.1, 0.005), (2.0, 0.5)]:
            model.lambda_energy, model.lambda_cov = lambda_energy, lambda_cov
            loss, values = model._loss(x)
            losses[lambda_energy, lambda_cov] = loss.item()
            expected = reconstruction + lambda_energy * energy + lambda_cov * penalty
            assert loss.item() == pytest.approx(expected, rel=1e-6)
            np.testing.assert_allclose(values.numpy(), [expected, reconstruction, energy, penalty], rtol=1e-6)
    # Each weight multiplies its own term: the differences isolate the terms.
    assert losses[1.0, 0.0] - losses[0.0, 0.0] == pytest.approx(energy, rel=1e-6)
    assert losses[0.0, 1.0] - losses[0.0, 0.0] == pytest.approx(penalty, rel=1e-6)
    assert losses[2.0, 0.5] - losses[0.1, 0.005] == pytest.approx(1.9 * energy + 0.495 * penalty, rel=1e-6)
    assert abs(energy) > 1e-3 and penalty > 1e-3 and reconstruction > 1e-3  # no term is negligible here


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Largest ||got - want|| / ||want|| over a list of per-parameter gradients."""
    return max(((g.double() - w.double()).norm() / w.double().norm()).item() for g, w in zip(got, want))


def test_training_step_follows_the_gradient_of_the_full_loss(separable_task, monkeypatch) -> None:
    """The gradient the optimiser applies is that of reconstruction + lambda_energy * energy +
    lambda_cov * P(Sigma), recomputed here from the networks as they were at that step."""
    X_train, _, _ = separable_task(32, 0, 0, channels=1, size=28, seed=5)
    # Weights under which each term carries a large share of the gradient (P is ~1e6 at init).
    lambda_energy, lambda_cov = 1.0, 1e-5
    model = DAGMM(**TINY, epochs=1, dropout=0.0, lambda_energy=lambda_energy, lambda_cov=lambda_cov)
    seen: dict = {}
    adam_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen["grads"] = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        seen["nets"] = copy.deepcopy((model.compression_, model.estimation_))  # before the update
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    model.fit(X_train)  # one step: 32 images at batch 32
    compression, estimation = seen["nets"]
    params = [*compression.parameters(), *estimation.parameters()]
    assert len(params) == len(seen["grads"])
    # The batch is all 32 images; the loss does not depend on their order, so the shuffle does not matter.
    x = model._preprocess(torch.from_numpy(X_train))
    x_rec, z, gamma = _codes_by_hand(compression.train(), estimation.train(), x, model.eps)
    terms = _eq7_terms(x, x_rec, z, gamma, model.cov_jitter)
    grads = [[g if g is not None else torch.zeros_like(p)
              for g, p in zip(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True), params)]
             for term in terms]  # the reconstruction does not reach the estimation network

    def combine(w_rec: float, w_energy: float, w_cov: float) -> list[torch.Tensor]:
        return [w_rec * a + w_energy * b + w_cov * c for a, b, c in zip(*grads)]

    full = combine(1.0, lambda_energy, lambda_cov)
    assert _relative_error(seen["grads"], full) < 1e-3
    # Leaving any one term out moves the gradient by far more than that tolerance.
    for weights in ((1.0, lambda_energy, 0.0), (1.0, 0.0, lambda_cov), (0.0, lambda_energy, lambda_cov)):
        assert _relative_error(combine(*weights), full) > 0.1


@pytest.fixture(scope="module", params=[(1, 28), (3, 32)], ids=["1x28x28", "3x32x32"])
def fitted(request):
    from conftest import make_separable_task

    channels, size = request.param
    X_train, X_test, y_test = make_separable_task(96, 32, 32, channels, size, seed=0)
    return DAGMM(**SEPARABLE).fit(X_train), X_train, X_test, y_test


def test_training_log_and_separation(fitted) -> None:
    model, _, X_test, y_test = fitted
    assert roc_auc_score(y_test, model.decision_function(X_test)) > 0.9  # the GMM below is the one that separates
    assert len(model.training_log_["loss"]) == 30 and np.isfinite(model.training_log_["loss"]).all()


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


def _gradients_at_each_step(model: DAGMM, X_train: np.ndarray, monkeypatch) -> list[list[torch.Tensor]]:
    """Fit `model` and return the gradients Adam applied at each step (after any clipping)."""
    steps: list[list[torch.Tensor]] = []
    adam_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        steps.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return adam_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", spy)
        model.fit(X_train)
    return steps


def test_grad_clipping_bounds_the_applied_gradient_norm(separable_task, monkeypatch) -> None:
    X_train, _, _ = separable_task(64, 0, 0, channels=1, size=28, seed=0)
    clip = 0.1
    unclipped = _gradients_at_each_step(DAGMM(**TINY, epochs=2), X_train, monkeypatch)
    clipped = _gradients_at_each_step(DAGMM(**TINY, epochs=2, grad_clip_norm=clip), X_train, monkeypatch)
    assert len(clipped) == len(unclipped) == 4  # 64 images at batch 32, 2 epochs

    def norm(grads: list[torch.Tensor]) -> float:
        return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()

    assert min(norm(grads) for grads in unclipped) > 100 * clip  # the setting needs clipping at every step
    for grads in clipped:
        assert norm(grads) == pytest.approx(clip, rel=1e-4)
    # Same seed, same first batch: the first clipped gradient is the unclipped one rescaled to norm `clip`.
    scale = clip / norm(unclipped[0])
    for got, raw in zip(clipped[0], unclipped[0]):
        torch.testing.assert_close(got, raw * scale, rtol=1e-4, atol=1e-9)
