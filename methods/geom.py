"""GEOM (Golan & El-Yaniv 2018, "Deep Anomaly Detection Using Geometric Transformations"):
a classifier of which of 72 geometric transformations was applied to a normal image; an image is
anomalous when the classifier cannot tell (docs/baselines.md, GEOM section).

Settings, each from the authors' code (izikgo/AnomalyDetectionTransformations; file named):
- transformations: the 72 of ``transformations.py`` ``Transformer(8, 8)``: flip x shift by
  (0, -8, +8) px on each axis (reflect padding) x 4 rotations by 90 degrees
  (`methods.transformations`);
- network: WRN-10-4 (``experiments.py``: ``n, k = (10, 4)`` for every dataset but
  cats-vs-dogs, which gets WRN-16-8 and 16-pixel shifts), softmax over the 72 transformations
  (`methods.wrn.WideResNet`, standard pre-activation blocks, He fan-in init, no dropout);
- data: every (image, transformation) pair of the training set is one sample, shuffled, with the
  transformation's index as the label (``experiments.py``: ``np.repeat`` + ``np.tile``, Keras
  ``fit``'s shuffling, last incomplete batch kept); input in [-1, 1], MNIST-size images
  zero-padded to 32 x 32 (``utils.py``);
- optimisation: Adam (Keras defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-7), batch 128,
  ``ceil(200 / 72) = 3`` epochs (``experiments.py``), cross-entropy; L2 weight decay 0.5 * 5e-4
  on every weight (``models/wide_residual_network.py``: ``WEIGHT_DECAY`` on conv, dense and
  BatchNorm parameters), which as a loss term 0.00025 * ||w||^2 is Adam's coupled
  ``weight_decay=5e-4``; BatchNorm momentum 0.9 (Keras) = PyTorch's 0.1, eps 1e-5.

Score (``score``), computed on the trained network in eval mode from log-softmax outputs:
- "dirichlet" (default; the paper's Dirichlet normality score, ``experiments.py``): for each transformation t, the
  softmax vectors of the transformed training images are modelled as Dirichlet(alpha_t), fitted
  by the fixed-point maximum-likelihood iteration (Minka 2000) from the authors' initial guess
  (`fit_dirichlet`); normality(x) = mean over t of sum_j (alpha_t,j - 1) log p_j(T_t(x)) (the
  Dirichlet log-density without its constant); the anomaly score is its negative.
- "simple" (the paper's simplified score, commented out in ``experiments.py``): the mean over t
  of the predicted probability of the transformation actually applied, negated.

Choices: log-probabilities come from ``log_softmax`` (the authors take ``np.log`` of the softmax,
which is -inf where float32 underflows); Keras pads stride-2 convolutions on one side, PyTorch on
both (methods/wrn.py).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import (
    check_choice,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
)
from methods.engine import Job, OptimiserSpec, ParamGroup, Phase, Stage, StagePlan, StageResult
from methods.torch_base import TorchDetector
from methods.transformations import MAX_SHIFT, GeometricTransformer, geometric_transformations, prepare_images
from methods.wrn import WideResNet, check_wrn_params

# paper: the authors' settings on every dataset (they use one setting for all 32 x 32 datasets).
# quick: a CPU budget of ~12 min per class (one job per core: ~1 h per dataset and seed for the ten
# classes with --jobs 2), relative to the paper: a WRN-10-1 with stem width 8 (widths 8/8/16/32 instead
# of 16/64/128/256), 300 steps of 128 pairs (1/28 of the paper's 8438 steps on a 5000-image class, 0.11
# of an epoch), the Dirichlets fitted on the first 500 training images (not all). Measured with
# torch.set_num_threads(1) on the shared 2-core dev machine under heavy load (load average ~17, so an
# idle machine should be several times faster): WRN-10-1/8 0.52 s per training step of 128 and 1.12 ms
# per image-transformation scored (the paper's WRN-10-4: 5.8 s and 19.9 ms). A quick job (6000 test
# images x 72, 500 x 72 for the Dirichlets, 300 steps): 484 + 40 + 156 s = ~11 min. The paper budget
# would take ~18 h per class here (13.6 h training, 2 h Dirichlets, 2.4 h scoring).
# smoke: a WRN-10-1 with stem width 4 for 4 steps, enough for the contract tests' separable images;
# 20 Dirichlet iterations (a 4-step classifier's near-constant outputs would use all 1000, ~6 s idle).
# Each profile has only the "*" default (methods.DEFAULT): GEOM's budget does not depend on the dataset.
PROFILES: dict = {
    "paper": {"*": {}},  # every dataset: WRN-10-4, 3 epochs of all 72 transformations (the defaults)
    "quick": {"*": {"widen_factor": 1, "base_width": 8, "epochs": 1, "max_steps": 300,
                    "dirichlet_max_images": 500}},  # every dataset: the budget measured above
    "smoke": {"*": {"widen_factor": 1, "base_width": 4, "epochs": 1, "max_steps": 4, "batch_size": 32,
                    "dirichlet_max_images": 16, "dirichlet_max_iter": 20}},  # every dataset
}

#: -psi(1), the Euler-Mascheroni constant (the authors' ``-psi(1)``).
EULER_GAMMA = 0.5772156649015329


def geom_loss(net: nn.Module, x: torch.Tensor, t_index: torch.Tensor,
              transformer: GeometricTransformer) -> tuple[torch.Tensor, torch.Tensor]:
    """GEOM's training objective on one batch: cross-entropy of the transformation classifier.

    A pure function of the network, the batch and the step's draws (which transformation each image
    gets), kept apart from the training loop.

    Parameters
    ----------
    net : nn.Module
        Returns (features, logits over the transformations).
    x : Tensor
        (B, C, H, W) preprocessed images.
    t_index : Tensor
        (B,) the transformation applied to each image, also its label.
    transformer : GeometricTransformer
        The transformations.

    Returns
    -------
    (loss, accuracy) : tuple of Tensor
        Mean cross-entropy and the share of correct predictions (logged, no gradient).
    """
    _, logits = net(transformer.apply(x, t_index))
    loss = F.cross_entropy(logits, t_index)
    accuracy = (logits.detach().argmax(dim=1) == t_index).float().mean()
    return loss, accuracy


def inverse_digamma(y: torch.Tensor, iters: int = 5) -> torch.Tensor:
    """psi^-1(y) by Newton's method from Minka's initial guess (the authors' ``inv_psi``).

    Parameters
    ----------
    y : Tensor
        Values (float64).
    iters : int
        Newton steps (the authors: 5).

    Returns
    -------
    Tensor
        x with digamma(x) = y.
    """
    x = torch.where(y >= -2.22, torch.exp(y) + 0.5, -1.0 / (y + EULER_GAMMA))  # psi(1) = -EULER_GAMMA
    for _ in range(iters):
        x = x - (torch.digamma(x) - y) / torch.polygamma(1, x)
    return x


def fit_dirichlet(mean_p: torch.Tensor, mean_log_p: torch.Tensor, max_iter: int = 1000,
                  tol: float = 1e-9) -> torch.Tensor:
    """Maximum-likelihood Dirichlet parameters from the sufficient statistics of N observations, by the
    fixed-point iteration alpha <- psi^-1(psi(sum alpha) + mean log p) (Minka 2000; the authors'
    ``fixed_point_dirichlet_mle``), from their initial guess alpha_0 = mean p * s, with the
    precision s = (K - 1) * gamma / (sum_j f_j log f_j - sum_j f_j mean_log_p_j), f = mean p
    (``calc_approx_alpha_sum``). Each row stops when its update moves alpha by less than `tol`
    (euclidean), as each of the authors' per-transformation fits.

    Parameters
    ----------
    mean_p : Tensor
        (..., K) mean of the observed probability vectors.
    mean_log_p : Tensor
        (..., K) mean of their logarithms.
    max_iter : int
        Iteration cap (the authors: 1000).
    tol : float
        Convergence threshold (the authors: 1e-9).

    Returns
    -------
    Tensor
        (..., K) alpha, float64.
    """
    mean_p, mean_log_p = mean_p.double(), mean_log_p.double()
    k = mean_p.shape[-1]
    alpha_sum = (k - 1) * EULER_GAMMA / ((mean_p * mean_p.log()).sum(-1) - (mean_p * mean_log_p).sum(-1))
    alpha = mean_p * alpha_sum[..., None]
    done = torch.zeros(alpha.shape[:-1], dtype=torch.bool, device=alpha.device)
    for _ in range(max_iter):
        new = inverse_digamma(torch.digamma(alpha.sum(-1, keepdim=True)) + mean_log_p)
        moved = (new - alpha).pow(2).sum(-1).sqrt()
        alpha = torch.where(done[..., None], alpha, new)
        done = done | (moved < tol)
        if bool(done.all()):
            break
    return alpha


def dirichlet_normality(alpha: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """The Dirichlet log-density without its normalising constant, sum_j (alpha_j - 1) log p_j
    (the authors' ``dirichlet_normality_score``).

    Parameters
    ----------
    alpha : Tensor
        (K,) Dirichlet parameters.
    log_p : Tensor
        (B, K) log-probabilities.

    Returns
    -------
    Tensor
        (B,) normality (higher = more normal).
    """
    return ((alpha - 1.0) * log_p).sum(-1)


class GEOM(TorchDetector):
    """GEOM; see the module docstring for every setting and where it comes from.

    Parameters
    ----------
    depth, widen_factor : int
        The WRN (authors: 10 and 4).
    base_width : int
        The WRN's stem width b (authors: 16); the widths are (b, b k, 2 b k, 4 b k).
    max_shift : int
        Translation of the shifted transformations in pixels (authors: 8).
    epochs : int
        Epochs over the 72 x N (image, transformation) pairs (authors: ceil(200 / 72) = 3).
    batch_size : int
        Pairs per step (authors: 128).
    lr : float
        Adam learning rate (authors: Keras' 1e-3).
    weight_decay : float
        Coupled L2 on every parameter (authors: 2 x 0.5 x 5e-4 = 5e-4).
    max_steps : int or None
        Optional cap on the optimiser steps (None = every epoch whole).
    score : str
        "dirichlet" (default) or "simple" (module docstring).
    dirichlet_max_images : int or None
        Fit the Dirichlets on the first this many training images (None = all, the authors').
    dirichlet_max_iter : int
        Cap on the fixed-point iterations of each Dirichlet fit (authors: 1000; a barely trained
        classifier's near-constant outputs need them all, a trained one's far fewer).
    random_state : int
        Seed of the initialisation and the shuffling.
    device : str
        'auto', 'cpu', 'cuda' or 'cuda:N'.
    score_batch_size : int
        Images per scoring batch (each goes through the network 72 times).
    """

    def __init__(self, depth: int = 10, widen_factor: int = 4, base_width: int = 16,
                 max_shift: int = MAX_SHIFT, epochs: int = 3,
                 batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 5e-4,
                 max_steps: Optional[int] = None, score: str = "dirichlet",
                 dirichlet_max_images: Optional[int] = None, dirichlet_max_iter: int = 1000,
                 random_state: int = 0, device: str = "auto",
                 score_batch_size: int = 256) -> None:
        self.depth = depth
        self.widen_factor = widen_factor
        self.base_width = base_width
        self.max_shift = max_shift
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.score = score
        self.dirichlet_max_images = dirichlet_max_images
        self.dirichlet_max_iter = dirichlet_max_iter
        self.random_state = random_state
        self.device = device
        self.score_batch_size = score_batch_size

    def _check_params(self) -> None:
        check_wrn_params(self.depth, self.widen_factor, self.base_width)
        check_positive_int("max_shift", self.max_shift)
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_float("lr", self.lr)
        check_nonneg_float("weight_decay", self.weight_decay)
        if self.max_steps is not None:
            check_positive_int("max_steps", self.max_steps)
        check_choice("score", self.score, ("dirichlet", "simple"))
        if self.dirichlet_max_images is not None:
            check_positive_int("dirichlet_max_images", self.dirichlet_max_images)
        check_positive_int("dirichlet_max_iter", self.dirichlet_max_iter)

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return prepare_images(x)

    def _networks(self) -> Iterable[nn.Module]:
        return [self.net_]

    def _stages(self, n_train: int) -> list[Stage]:
        # The samples are (image, transformation) pairs: 72 copies of every training image.
        return [Stage("train", self.batch_size, epochs=self.epochs, max_steps=self.max_steps, drop_last=False,
                      copies=len(geometric_transformations(self.max_shift)))]

    def _build_networks(self, x_train: torch.Tensor) -> None:
        self.transformer_ = GeometricTransformer(geometric_transformations(self.max_shift))
        self.net_ = WideResNet(self.depth, self.widen_factor, self.transformer_.n_transforms, x_train.shape[1],
                               mid_bn_relu=True, conv_init="fan_in", base_width=self.base_width).to(self.device_)

    def _step_losses(self, x: torch.Tensor,
                     t_index: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], list]:
        """The step's loss for the engine: `geom_loss` on the minibatch's (image, transformation)
        pairs (the stage's copies are the transformations), its accuracy logged."""
        loss, accuracy = geom_loss(self.net_, x, t_index, self.transformer_)
        return [loss], {"loss": loss, "accuracy": accuracy}, []

    def _stage_plans(self, n_train: int) -> list[StagePlan]:
        """The training, described once for any number of jobs: one stage over the n_train x 72
        (image, transformation) pairs, Adam (Keras' eps, coupled weight decay) on the whole network;
        per job after each epoch the log (and, for an epoch callback, which scores, that epoch's
        Dirichlets), after the stage the Dirichlets on the training images. The last incomplete
        batch is kept, so stacked jobs' training sets must have one size."""
        def end_epoch(job: Job, result: StageResult) -> None:
            det = job.detector
            det.training_log_ = {**{"epoch_mean_" + key: values for key, values in result.history.items()},
                                 "steps": result.steps}
            if job.callback is not None:  # the diagnostic scores mid-training: it needs this epoch's Dirichlets
                det._fit_score_model(job.x)
                det._set_mode(train=True)

        def end(job: Job, result: StageResult) -> None:
            job.detector._fit_score_model(job.x)

        (stage,) = self._stages(n_train)
        # Keras' Adam defaults; its L2 regulariser on every weight is Adam's coupled weight decay.
        adam = OptimiserSpec("adam", self.lr, eps=1e-7, weight_decay=self.weight_decay)
        phase = Phase(type(self)._step_losses, (ParamGroup(("net_",), adam),))
        return [StagePlan(stage, ("net_",), (phase,), end_epoch=end_epoch, end=end)]

    @torch.no_grad()
    def _log_probabilities(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """float64 log-softmax of the classifier on transformation t of a preprocessed batch, (B, T)."""
        t_index = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        _, logits = self.net_(self.transformer_.apply(x, t_index))
        return F.log_softmax(logits.double(), dim=1)

    @torch.no_grad()
    def _fit_score_model(self, x_train: torch.Tensor) -> None:
        """The per-transformation Dirichlets on the training images (eval mode; "dirichlet" only)."""
        self.alpha_ = None
        if self.score != "dirichlet":
            return
        self._set_mode(train=False)
        x_fit = x_train if self.dirichlet_max_images is None else x_train[:self.dirichlet_max_images]
        n_transforms = self.transformer_.n_transforms
        sum_p = torch.zeros(n_transforms, n_transforms, dtype=torch.float64, device=self.device_)
        sum_log_p = torch.zeros_like(sum_p)
        for start in range(0, len(x_fit), self.score_batch_size):
            chunk = x_fit[start:start + self.score_batch_size]
            for t in range(n_transforms):
                log_p = self._log_probabilities(chunk, t)
                sum_p[t] += log_p.exp().sum(0)
                sum_log_p[t] += log_p.sum(0)
        self.alpha_ = fit_dirichlet(sum_p / len(x_fit), sum_log_p / len(x_fit), max_iter=self.dirichlet_max_iter)
        self.training_log_["dirichlet_alpha_sum_mean"] = float(self.alpha_.sum(-1).mean())
        self.training_log_["dirichlet_images"] = len(x_fit)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        n_transforms = self.transformer_.n_transforms
        normality = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for t in range(n_transforms):
            log_p = self._log_probabilities(x, t)
            if self.score == "dirichlet":
                normality += dirichlet_normality(self.alpha_[t], log_p)
            else:
                normality += log_p[:, t].exp()
        return -normality / n_transforms

