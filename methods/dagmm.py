"""DAGMM, Deep Autoencoding Gaussian Mixture Model (Zong et al. 2018), on flattened pixels
(docs/baselines.md, DAGMM section).

* Compression network: an MLP autoencoder with tanh hidden layers, linear code z_c and linear
  output. The paper's network (120-60-30-10-1) is for KDDCUP; for pixels there is none, so the
  widths are a choice: 784 (or 3072) -> 256 -> 64 -> 16 -> z_c (2) and the mirror image back.
  The input is the [0, 1] pixels, flattened, at native size (no resizing).
* Code z = [z_c, relative Euclidean error ||x - x'|| / (||x|| + eps), cosine similarity(x, x')].
* Estimation network: z -> 10 (tanh) -> Dropout(0.5) -> K (softmax), K = 4 -> memberships gamma.
* GMM parameters from gamma (paper eq. 5): phi_k = mean_i gamma_ik, mu_k = gamma-weighted mean,
  Sigma_k = gamma-weighted covariance.
* Sample energy (eq. 6): E(z) = -log sum_k phi_k N(z; mu_k, Sigma_k), with N the normalised
  Gaussian density (the paper's sqrt|2 pi Sigma_k| denominator), so E(z) equals -log p(z) exactly.
* Loss (eq. 7): mean_i ||x_i - x_i'||_2^2 (per-sample squared l2 norm, as the paper)
  + 0.1 * mean_i E(z_i) + 0.005 * sum_k sum_j 1 / Sigma_k[j, j]; the last term is read as the
  paper writes it, the diagonal of Sigma_k, which is what penalises singular covariances.
* Adam lr 1e-4, batch 1024, 200 epochs (paper's KDDCUP settings); the last incomplete batch of
  an epoch is dropped (a batch of a few samples would give a near-singular covariance).
* Score: the sample energy under the GMM estimated over the WHOLE training set after training
  (eval mode: no dropout), never the last mini-batch's parameters.

Numerical stability (a reproduction's choices, not the paper's):
* `cov_jitter` (default 1e-6) is added to every covariance diagonal, in training and for the
  final GMM; the mixture and energy are computed in float64 (the code is a few numbers per image).
* The energy uses the Cholesky factor L of Sigma_k: Mahalanobis terms by triangular solves,
  log|Sigma_k| = 2 sum log diag L, a log-sum-exp over components; no explicit inverse, no exp
  overflow.
* A failed Cholesky (non-positive-definite covariance) makes the loss NaN, which ends training
  in DivergedError. Gradient clipping (`grad_clip_norm`, None by default; 5 in reproductions) is
  optional.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import (
    DivergedError,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
)
from methods.engine import Job, OptimiserSpec, ParamGroup, Phase, Stage, StagePlan, StageResult
from methods.preprocess import flatten
from methods.torch_base import TorchDetector

# paper: the budget published for KDDCUP (200 epochs, batch 1024), used for every dataset here
# (about 5 optimiser steps per epoch at 6000 images, ~1000 steps in all).
# quick: a CPU budget for one MNIST class (~6000 train + ~6000 test images, 2 threads, target
# ~15 s): 60 epochs. Measured on real MNIST with ONE thread on a loaded machine: class 0 14.8 s
# (fit 14.7 + score 0.1), class 8 15.8 s; two threads are faster.
# Each profile has only the "*" default (methods.DEFAULT): the budget does not depend on the dataset.
PROFILES: dict = {
    "paper": {"*": {}},  # every dataset: the KDDCUP budget (the constructor's defaults)
    "quick": {"*": {"epochs": 60}},  # every dataset: the 60 epochs measured on MNIST above
    "smoke": {"*": {"epochs": 1}},  # every dataset
}


# ---- networks ----------------------------------------------------------------------------------
def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers with tanh between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class CompressionNet(nn.Module):
    """DAGMM's compression network, an MLP autoencoder with tanh hidden layers.

    Parameters
    ----------
    input_dim : int
        D, the flattened input size.
    hidden_dims : sequence of int
        Encoder hidden widths (the decoder mirrors them).
    latent_dim : int
        Size of z_c.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        dims = [input_dim, *hidden_dims, latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> (z_c (B, latent_dim), x' (B, D))."""
        z_c = self.encoder(x)
        return z_c, self.decoder(z_c)


class EstimationNet(nn.Module):
    """DAGMM's estimation network: z -> hidden (tanh) -> Dropout -> K logits; softmax gives gamma.

    Parameters
    ----------
    input_dim : int
        Size of z.
    hidden : int
        Hidden width.
    n_components : int
        K, the mixture components.
    dropout : float
        Dropout probability.
    """

    def __init__(self, input_dim: int, hidden: int, n_components: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_components))

    def forward(self, z: torch.Tensor, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Memberships of a batch of codes.

        Parameters
        ----------
        z : torch.Tensor
            (B, input_dim) codes.
        dropout_mask : torch.Tensor, optional
            (B, hidden) a drawn dropout mask (`dropout_mask`), used in place of the Dropout layer
            (stacked training, where the layer cannot draw); None: the layer as it is.

        Returns
        -------
        torch.Tensor
            (B, K) memberships gamma, rows summing to 1.
        """
        if dropout_mask is None:
            return torch.softmax(self.body(z), dim=1)
        linear, tanh, _, out = self.body
        return torch.softmax(out(tanh(linear(z)) * dropout_mask), dim=1)


def dropout_mask(shape: Sequence[int], p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The mask (0 or 1 / (1 - p)) by which nn.Dropout(p) in train mode multiplies an input of this
    shape, dtype and device, drawn from the global RNG exactly as that layer draws it (it is
    dropout applied to ones), so that the RNG stream advances as in the layer's call.

    Parameters
    ----------
    shape : sequence of int
        The input's shape.
    p : float
        The dropout probability.
    dtype : torch.dtype
        The input's dtype.
    device : torch.device
        The input's device.

    Returns
    -------
    torch.Tensor
        The mask.
    """
    return F.dropout(torch.ones(tuple(shape), dtype=dtype, device=device), p, training=True)


def reconstruction_features(x: torch.Tensor, x_rec: torch.Tensor, eps: float) -> torch.Tensor:
    """The reconstruction features of the code z.

    Parameters
    ----------
    x, x_rec : torch.Tensor
        (B, D) input and reconstruction.
    eps : float
        Added to the relative error's denominator (and the cosine's).

    Returns
    -------
    torch.Tensor
        (B, 2): relative Euclidean error ||x - x'|| / (||x|| + eps) and cosine similarity.
    """
    relative = (x - x_rec).norm(dim=1) / (x.norm(dim=1) + eps)
    cosine = F.cosine_similarity(x, x_rec, dim=1, eps=eps)
    return torch.stack([relative, cosine], dim=1)


# ---- GMM -----------------------------------------------------------------------------------------
def mixture_parameters(gamma: torch.Tensor, z: torch.Tensor,
                       jitter: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GMM parameters of paper eq. 5 from memberships and codes.

    Parameters
    ----------
    gamma : torch.Tensor
        (N, K) memberships.
    z : torch.Tensor
        (N, d) codes.
    jitter : float
        Added to each covariance diagonal (a stability choice, see the module docstring; default 0).

    Returns
    -------
    (phi, mu, sigma) : tuple of torch.Tensor
        phi (K,), mu (K, d) and Sigma (K, d, d).
    """
    weight = gamma.sum(dim=0)                                      # (K,)
    phi = weight / gamma.shape[0]
    mu = gamma.T @ z / weight[:, None]
    diff = z[:, None, :] - mu[None]                                # (N, K, d)
    sigma = torch.einsum("nk,nki,nkj->kij", gamma, diff, diff) / weight[:, None, None]
    sigma = sigma + jitter * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    return phi, mu, sigma


def sample_energy(z: torch.Tensor, phi: torch.Tensor, mu: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Paper eq. 6, the sample energy E(z) = -log sum_k phi_k N(z; mu_k, Sigma_k).

    Equals -log p(z) of the mixture.

    Parameters
    ----------
    z : torch.Tensor
        (N, d) codes.
    phi, mu : torch.Tensor
        (K,) weights and (K, d) means.
    chol : torch.Tensor
        (K, d, d) the Cholesky factors of Sigma.

    Returns
    -------
    torch.Tensor
        (N,) energies.
    """
    d = z.shape[1]
    diff = (z[:, None, :] - mu[None]).permute(1, 2, 0)             # (K, d, N)
    solved = torch.linalg.solve_triangular(chol, diff, upper=False)
    mahalanobis = solved.pow(2).sum(dim=1).T                       # (N, K)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(dim=-1)  # (K,)
    log_components = torch.log(phi)[None] - 0.5 * (mahalanobis + log_det[None] + d * math.log(2 * math.pi))
    return -torch.logsumexp(log_components, dim=1)


def covariance_penalty(sigma: torch.Tensor) -> torch.Tensor:
    """P(Sigma) = sum_k sum_j 1 / Sigma_k[j, j], the penalty of Zong et al.'s eq. 7 as printed: the
    reciprocals of the covariance diagonals, which grow when a component's variance collapses
    towards zero (a singular covariance).

    Parameters
    ----------
    sigma : torch.Tensor
        (K, d, d) the covariances (jitter included).

    Returns
    -------
    torch.Tensor
        The scalar penalty.
    """
    return torch.diagonal(sigma, dim1=-2, dim2=-1).reciprocal().sum()


# ---- detector -------------------------------------------------------------------------------------
class DAGMM(TorchDetector):
    """DAGMM on flattened pixels.

    Defaults: the paper's settings (docs/baselines.md) and, where there is no published value for
    pixels, the choices written beside each argument.

    Parameters
    ----------
    hidden_dims : sequence of int
        (256, 64, 16): our choice for pixel inputs.
    latent_dim : int
        2: our choice (KDDCUP network: 1).
    estimation_hidden : int
        10 (paper).
    dropout : float
        0.5 (paper).
    n_components : int
        K = 4 (paper).
    lambda_energy : float
        0.1 (paper).
    lambda_cov : float
        0.005 (paper).
    lr : float
        Adam 1e-4 (paper).
    batch_size : int
        1024 (paper).
    epochs : int
        200 (paper, KDDCUP).
    max_steps : int or None
        Optional cap on the optimiser steps (None = no cap).
    cov_jitter : float
        1e-6 on Sigma's diagonal (stability choice).
    eps : float
        In the relative error's denominator.
    grad_clip_norm : float or None
        None = paper; 5 in reproductions.
    random_state : int
        Seed of the initialisation and the shuffling (default 0).
    device : str
        'auto', 'cpu', 'cuda' or 'cuda:N' (default 'auto'; see `resolve_device`).
    score_batch_size : int
        Images per scoring batch (default 1024).
    """

    # Measured (issue 20): reports/published/quick-bf16-fidelity-mnist (fp32 vs bf16 AUROC, quick MNIST, seeds
    # 0-2) and reports/published/speed-cpu (training img/s, 2 threads, idle machine).
    # Left at fp32 NCHW: bf16 AUROC is within seed noise but bf16 trains slower (0.93x); channels-last 1.03x,
    # within the measurement's noise.
    default_precision = "fp32"
    default_memory_format = "nchw"

    def __init__(self, hidden_dims: Sequence[int] = (256, 64, 16), latent_dim: int = 2,
                 estimation_hidden: int = 10, dropout: float = 0.5, n_components: int = 4,
                 lambda_energy: float = 0.1, lambda_cov: float = 0.005, lr: float = 1e-4,
                 batch_size: int = 1024, epochs: int = 200, max_steps: Optional[int] = None,
                 cov_jitter: float = 1e-6, eps: float = 1e-8,
                 grad_clip_norm: Optional[float] = None, random_state: int = 0, device: str = "auto",
                 score_batch_size: int = 1024) -> None:
        self.hidden_dims = hidden_dims              # (256, 64, 16): our choice for pixel inputs
        self.latent_dim = latent_dim                # 2: our choice (KDDCUP network: 1)
        self.estimation_hidden = estimation_hidden  # 10 (paper)
        self.dropout = dropout                      # 0.5 (paper)
        self.n_components = n_components            # K = 4 (paper)
        self.lambda_energy = lambda_energy          # 0.1 (paper)
        self.lambda_cov = lambda_cov                # 0.005 (paper)
        self.lr = lr                                # Adam 1e-4 (paper)
        self.batch_size = batch_size                # 1024 (paper)
        self.epochs = epochs                        # 200 (paper, KDDCUP)
        self.max_steps = max_steps                  # optional cap on the optimiser steps (None = no cap)
        self.cov_jitter = cov_jitter                # 1e-6 on Sigma's diagonal (stability choice)
        self.eps = eps                              # in the relative error's denominator
        self.grad_clip_norm = grad_clip_norm        # None = paper; 5 in reproductions
        self.random_state = random_state
        self.device = device
        self.score_batch_size = score_batch_size

    def _check_params(self) -> None:
        if isinstance(self.hidden_dims, (str, bytes)) or not isinstance(self.hidden_dims, Sequence):
            raise ValueError(f"hidden_dims must be a sequence of positive integers, got {self.hidden_dims!r}")
        for width in self.hidden_dims:
            check_positive_int("hidden_dims", width)
        for name in ("latent_dim", "estimation_hidden", "n_components", "batch_size", "epochs"):
            check_positive_int(name, getattr(self, name))
        if self.max_steps is not None:
            check_positive_int("max_steps", self.max_steps)
        check_nonneg_float("dropout", self.dropout)
        if self.dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_nonneg_float("lambda_energy", self.lambda_energy)
        check_nonneg_float("lambda_cov", self.lambda_cov)
        check_positive_float("lr", self.lr)
        check_nonneg_float("cov_jitter", self.cov_jitter)
        check_positive_float("eps", self.eps)
        if self.grad_clip_norm is not None:
            check_positive_float("grad_clip_norm", self.grad_clip_norm)

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return flatten(x)

    def _networks(self) -> Iterable[nn.Module]:
        nets = (getattr(self, "compression_", None), getattr(self, "estimation_", None))
        return [net for net in nets if net is not None]

    def _codes(self, x: torch.Tensor, dropout_mask: Optional[torch.Tensor] = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (z (B, latent_dim + 2) in float64, gamma (B, K) in float64, x'); `dropout_mask` as
        EstimationNet.forward's."""
        z_c, x_rec = self.compression_(x)
        z = torch.cat([z_c, reconstruction_features(x, x_rec, self.eps)], dim=1)
        gamma = self.estimation_(z, dropout_mask)
        return z.double(), gamma.double(), x_rec

    def _loss(self, x: torch.Tensor, dropout_mask: Optional[torch.Tensor] = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Paper eq. 7 on a training batch: (loss, logged values [loss, reconstruction, energy,
        cov_penalty]); the loss is NaN when a covariance is not positive definite."""
        z, gamma, x_rec = self._codes(x, dropout_mask)
        phi, mu, sigma = mixture_parameters(gamma, z, self.cov_jitter)
        chol, info = torch.linalg.cholesky_ex(sigma)
        reconstruction = (x - x_rec).pow(2).sum(dim=1).mean()
        energy = sample_energy(z, phi, mu, chol).mean()
        cov_penalty = covariance_penalty(sigma)
        loss = reconstruction + self.lambda_energy * energy + self.lambda_cov * cov_penalty
        loss = torch.where(info.any(), torch.full_like(loss, float("nan")), loss)
        return loss, torch.stack([loss, reconstruction.double(), energy, cov_penalty])

    def _build_networks(self, x_train: torch.Tensor) -> None:
        """The compression and estimation networks (PyTorch's default init, from the global RNG)."""
        self.compression_ = CompressionNet(x_train.shape[1], list(self.hidden_dims), self.latent_dim).to(self.device_)
        self.estimation_ = EstimationNet(self.latent_dim + 2, self.estimation_hidden, self.n_components,
                                         self.dropout).to(self.device_)

    # ---- training ----
    def _stages(self, n_train: int) -> list[Stage]:
        return [Stage("train", self.batch_size, epochs=self.epochs, max_steps=self.max_steps, drop_last=True)]

    def _step_losses(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], dict, list]:
        """The step's loss for the engine: eq. 7 with the drawn dropout mask, and its logged terms."""
        loss, values = self._loss(x, mask)
        return [loss], dict(zip(("loss", "reconstruction", "energy", "cov_penalty"), values.unbind())), []

    def _draw_dropout_mask(self, rows: int) -> tuple[torch.Tensor]:
        """The step's dropout mask, from the job's global RNG stream as the Dropout layer draws it
        (`dropout_mask`), in the layer input's dtype (bfloat16 under bf16 autocast)."""
        dtype = torch.bfloat16 if self._options().precision == "bf16" else torch.float32
        return (dropout_mask((rows, self.estimation_hidden), self.dropout, dtype, self.device_),)

    def _stage_plans(self, n_train: int) -> list[StagePlan]:
        """The training, described once for any number of jobs: one stage, Adam on both networks
        (gradient clipped per job with `grad_clip_norm`), the dropout masks drawn per job outside the
        step; a non-positive-definite covariance makes a job's loss NaN (it diverges alone); after
        training, each job's GMM is estimated over its whole training set."""
        def begin(job: Job) -> None:
            job.detector.training_log_ = {}

        def end_epoch(job: Job, result: StageResult) -> None:
            job.detector.training_log_ = result.history
            if job.callback is not None:  # eval-mode passes only: training is unchanged
                job.detector._estimate_mixture(job.x, result.last_epoch)

        def end(job: Job, result: StageResult) -> None:
            job.detector._estimate_mixture(job.x, result.last_epoch)

        (stage,) = self._stages(n_train)
        group = ParamGroup(("compression_", "estimation_"), OptimiserSpec("adam", self.lr),
                           clip_grad_norm=self.grad_clip_norm)
        phase = Phase(type(self)._step_losses, (group,), draws=type(self)._draw_dropout_mask)
        return [StagePlan(stage, ("compression_", "estimation_"), (phase,), begin=begin, end_epoch=end_epoch,
                          end=end)]

    @torch.no_grad()
    def _estimate_mixture(self, x_train: torch.Tensor, epoch: int) -> None:
        """The GMM over the WHOLE training set (eval mode), stored for scoring."""
        self._set_mode(train=False)
        codes = [self._codes(x_train[start:start + self.score_batch_size])[:2]
                 for start in range(0, len(x_train), self.score_batch_size)]
        z, gamma = torch.cat([c[0] for c in codes]), torch.cat([c[1] for c in codes])
        self.phi_, self.mu_, self.sigma_ = mixture_parameters(gamma, z, self.cov_jitter)
        self.chol_, info = torch.linalg.cholesky_ex(self.sigma_)
        if not bool(torch.isfinite(self.sigma_).all()) or bool(info.any()):
            raise DivergedError(epoch=epoch, step=-1, detail="singular or non-finite GMM covariance after training")
        self._set_mode(train=True)

    # ---- score ----
    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        z, _, _ = self._codes(x)
        return sample_energy(z, self.phi_, self.mu_, self.chol_)
