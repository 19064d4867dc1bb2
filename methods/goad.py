"""GOAD (Bergman & Hoshen 2020, "Classification-Based Anomaly Detection for General Data"): GEOM's
transformation classifier made open-set. Each transformation m has a centre c_m in feature space;
training pulls the features of T_m(x) towards c_m and away from the other centres (triplet-centre
loss), and an image is scored by how badly its transformed copies fall to their own centres
(docs/baselines.md, GOAD section).

Settings, each from the authors' code (lironber/GOAD; file named):
- transformations: GEOM's 72 (``transformations.py``, ``get_transformer("complicated")`` =
  ``Transformer(8, 8)``; `methods.transformations`);
- network: WRN-10-4 (``train_ad.py``: ``--depth 10 --widen-factor 4``) with the features f(x) =
  the 256-d global-average-pooled activations and a linear head over the 72 transformations
  (``wideresnet.py`` returns both); its block is ``BN ReLU conv conv`` (the middle BN ReLU is
  overwritten in their code, `methods.wrn`), fan-out He init;
- batches: 4 images with all their 72 transformations, 288 rows (``train_ad.py``
  ``--batch_size 288``; ``opt_tc.py`` permutes images, keeping each image's 72 copies together);
  16 epochs; Adam with PyTorch's defaults (lr 1e-3); last incomplete batch kept;
- loss (``opt_tc.py``): cross-entropy of the head + lmbda (0.1) * triplet-centre loss with margin
  m = 1 + 10 * mean(f^2) (``--reg True``), where the triplet-centre loss of the batch uses the batch's
  own per-transformation mean features as centres (`triplet_centre_loss`, the paper's method section);
- centres for scoring: the per-transformation mean of the training features (the paper's method section). The
  authors' code averages the features its last training epoch computed (train mode, weights
  moving): ``centres="last_epoch"`` (default). ``"train_pass"`` instead passes the training set
  once through the final network in eval mode;
- score (``opt_tc.py``, the paper's method section): sum over m of -log softmax_m'(-max(||f(T_m(x)) - c_m'||^2,
  eps))[m], the negative log-probability that each transformed copy lies at its own centre;
  eps = 0 (``--eps 0``). Higher = more anomalous.

GOAD's code covers CIFAR-10 only among images; MNIST-size images are zero-padded to 32 x 32 as in
GEOM (`methods.transformations.prepare_images`), with a 1-channel first convolution.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import (
    check_choice,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
)
from methods.engine import Job, OptimiserSpec, ParamGroup, Phase, Stage, StagePlan, StageResult, StepEvent
from methods.torch_base import TorchDetector
from methods.transformations import MAX_SHIFT, GeometricTransformer, geometric_transformations, prepare_images
from methods.wrn import WideResNet, check_wrn_params

# paper: the authors' CIFAR-10 settings on every dataset (their one image setting).
# quick: a CPU budget of ~11 min per class (one job per core: ~1 h per dataset and seed for the ten
# classes with --jobs 2), relative to the paper: a WRN-10-1 with stem width 8 (widths 8/8/16/32 instead
# of 16/64/128/256), 150 steps of 4 images x 72 (1/133 of the paper's 16 x 1250 steps on a 5000-image
# class, 0.12 of an epoch); the centres are that partial epoch's features. Measured with
# torch.set_num_threads(1) on the shared 2-core dev machine under heavy load (load average ~17, so an
# idle machine should be several times faster), the WRN-10-1/8 of methods/geom.py's measurement: 1.12
# ms per image-transformation scored, ~1.2 s per step of 288 rows (2.25 x a 128-row step at 0.52 s). A
# quick job (6000 test images x 72, 150 steps): 484 + 176 s = ~11 min. The paper budget (WRN-10-4,
# 20000 steps of 288 rows at ~13 s) would take ~75 h per class here.
# smoke: a WRN-10-1 with stem width 4 for 4 steps, enough for the contract tests' separable images.
# Each profile has only the "*" default (methods.DEFAULT): GOAD's budget does not depend on the dataset.
PROFILES: dict = {
    "paper": {"*": {}},  # every dataset: WRN-10-4, 16 epochs of 4 images x 72 transformations (the defaults)
    "quick": {"*": {"widen_factor": 1, "base_width": 8, "epochs": 1, "max_steps": 150}},  # every dataset
    "smoke": {"*": {"widen_factor": 1, "base_width": 4, "epochs": 1, "max_steps": 4, "batch_size": 2}},
}

def triplet_centre_loss(features: torch.Tensor, margin: float) -> torch.Tensor:
    """GOAD's triplet-centre loss on one batch (``opt_tc.py`` ``tc_loss``; the paper's method section).

    Centres are the batch's per-transformation mean features c_m; for each image i and
    transformation m: max(0, ||f_im - c_m||^2 + margin - min_{m' != m} ||f_im - c_m'||^2), averaged.

    Parameters
    ----------
    features : Tensor
        (B, T, D): the features of the T transformations of B images.
    margin : float
        The margin m (authors: 1).

    Returns
    -------
    Tensor
        Scalar loss.
    """
    centres = features.mean(0)  # (T, D)
    distances = (features[:, :, None, :] - centres[None, None]).pow(2).sum(-1)  # (B, T, T): image, own m, centre
    n_transforms = features.shape[1]
    own = torch.diagonal(distances, dim1=1, dim2=2)
    eye = torch.eye(n_transforms, dtype=torch.bool, device=features.device)
    nearest_other = distances.masked_fill(eye, float("inf")).amin(-1)
    return torch.clamp(own + margin - nearest_other, min=0).mean()


def goad_loss(net: nn.Module, x: torch.Tensor, transformer: GeometricTransformer, lmbda: float, margin: float,
              feature_reg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GOAD's training objective on a batch of images, every transformation of each (``opt_tc.py``).

    A pure function of the network and the batch (GOAD draws no transformations: all 72 of every
    image are in the batch), kept apart from the training loop.

    Parameters
    ----------
    net : nn.Module
        Returns (features, logits over the transformations).
    x : Tensor
        (B, C, H, W) preprocessed images.
    transformer : GeometricTransformer
        The T transformations.
    lmbda : float
        Weight of the triplet-centre loss (authors: 0.1).
    margin : float
        Its margin (authors: 1).
    feature_reg : float
        Weight of mean(f^2) (authors: 10; 0 = ``--reg False``).

    Returns
    -------
    (loss, cross_entropy, triplet_centre, feature_mean_square, features) : tuple of Tensor
        The total and its terms (scalars), and the (B, T, D) features (for the centres).
    """
    n_transforms = transformer.n_transforms
    features, logits = net(transformer.apply_all(x))
    labels = torch.arange(n_transforms, device=x.device).repeat(len(x))
    features = features.reshape(len(x), n_transforms, -1)
    cross_entropy = F.cross_entropy(logits, labels)
    triplet = triplet_centre_loss(features, margin)
    mean_square = features.pow(2).mean()
    loss = cross_entropy + lmbda * triplet + feature_reg * mean_square
    return loss, cross_entropy, triplet, mean_square, features


def goad_scores(features: torch.Tensor, centres: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """GOAD's anomaly score (``opt_tc.py`` evaluation; the paper's method section).

    Parameters
    ----------
    features : Tensor
        (B, T, D): the features of the T transformations of B images.
    centres : Tensor
        (T, D) the per-transformation training centres.
    eps : float
        Floor of the squared distances (authors: 0).

    Returns
    -------
    Tensor
        (B,) sum over m of -log softmax over m' of -max(||f_m - c_m'||^2, eps), at m' = m.
    """
    distances = (features[:, :, None, :] - centres[None, None]).pow(2).sum(-1).clamp_min(eps)  # (B, T, T)
    log_p = F.log_softmax(-distances, dim=2)
    return -torch.diagonal(log_p, dim1=1, dim2=2).sum(-1)


class GOAD(TorchDetector):
    """GOAD; see the module docstring for every setting and where it comes from.

    Parameters
    ----------
    depth, widen_factor : int
        The WRN (authors: 10 and 4).
    base_width : int
        The WRN's stem width b (authors: 16); the widths are (b, b k, 2 b k, 4 b k).
    max_shift : int
        Translation of the shifted transformations in pixels (authors: 8).
    epochs : int
        Epochs (authors: 16).
    batch_size : int
        Images per step, each with all 72 transformations (authors: 288 rows = 4 images).
    lr : float
        Adam learning rate (authors: 1e-3).
    lmbda, margin, feature_reg : float
        Loss weights (authors: 0.1, 1, 10).
    eps : float
        Floor of the squared distances in the score (authors: 0).
    centres : str
        "last_epoch" (authors' code) or "train_pass" (module docstring).
    max_steps : int or None
        Optional cap on the optimiser steps (None = every epoch whole).
    random_state : int
        Seed of the initialisation and the shuffling.
    device : str
        'auto', 'cpu', 'cuda' or 'cuda:N'.
    score_batch_size : int
        Images per scoring batch (each goes through the network 72 times).
    """

    def __init__(self, depth: int = 10, widen_factor: int = 4, base_width: int = 16,
                 max_shift: int = MAX_SHIFT, epochs: int = 16,
                 batch_size: int = 4, lr: float = 1e-3, lmbda: float = 0.1, margin: float = 1.0,
                 feature_reg: float = 10.0, eps: float = 0.0, centres: str = "last_epoch",
                 max_steps: Optional[int] = None, random_state: int = 0, device: str = "auto",
                 score_batch_size: int = 8) -> None:
        self.depth = depth
        self.widen_factor = widen_factor
        self.base_width = base_width
        self.max_shift = max_shift
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.lmbda = lmbda
        self.margin = margin
        self.feature_reg = feature_reg
        self.eps = eps
        self.centres = centres
        self.max_steps = max_steps
        self.random_state = random_state
        self.device = device
        self.score_batch_size = score_batch_size

    def _check_params(self) -> None:
        check_wrn_params(self.depth, self.widen_factor, self.base_width)
        check_positive_int("max_shift", self.max_shift)
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_float("lr", self.lr)
        check_nonneg_float("lmbda", self.lmbda)
        check_nonneg_float("margin", self.margin)
        check_nonneg_float("feature_reg", self.feature_reg)
        check_nonneg_float("eps", self.eps)
        check_choice("centres", self.centres, ("last_epoch", "train_pass"))
        if self.max_steps is not None:
            check_positive_int("max_steps", self.max_steps)

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return prepare_images(x)

    def _networks(self) -> Iterable[nn.Module]:
        return [self.net_]

    def _stages(self, n_train: int) -> list[Stage]:
        return [Stage("train", self.batch_size, epochs=self.epochs, max_steps=self.max_steps, drop_last=False)]

    def _build_networks(self, x_train: torch.Tensor) -> None:
        self.transformer_ = GeometricTransformer(geometric_transformations(self.max_shift))
        self.net_ = WideResNet(self.depth, self.widen_factor, self.transformer_.n_transforms, x_train.shape[1],
                               mid_bn_relu=False, conv_init="fan_out", base_width=self.base_width).to(self.device_)

    def _step_losses(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], list]:
        """The step's loss for the engine: `goad_loss` and its terms, logged; the (B, T, D) features
        go to `after_step` for the epoch's centres."""
        loss, cross_entropy, triplet, mean_square, features = goad_loss(
            self.net_, x, self.transformer_, self.lmbda, self.margin, self.feature_reg)
        logged = {"loss": loss, "cross_entropy": cross_entropy, "triplet_centre": triplet,
                  "feature_mean_square": mean_square}
        return [loss], logged, [features]

    def _stage_plans(self, n_train: int) -> list[StagePlan]:
        """The training, described once for any number of jobs: one stage over the images (each step
        all 72 transformations of each), Adam on the whole network. Per job the features of the
        epoch's steps are summed (`after_step`, from the weights before each update, as the
        authors' loop) and, after each epoch, their mean per transformation is the centres
        (``centres="last_epoch"``); the sums then start afresh for the next epoch. With
        ``"train_pass"`` the centres come from one eval-mode pass after the stage (and after each
        epoch for an epoch callback, which scores). The last incomplete batch is kept, so stacked
        jobs' training sets must have one size."""
        n_transforms = len(geometric_transformations(self.max_shift))
        # Per job (by Job.k): the epoch's feature sums per transformation and its image count.
        sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def begin(job: Job) -> None:
            det = job.detector
            sums[job.k] = (torch.zeros(n_transforms, det.net_.feature_dim, device=det.device_),
                           torch.zeros((), device=det.device_))

        def after_step(event: StepEvent) -> None:
            features = event.outputs[1]  # (K, B, T, D), detached
            for k in np.flatnonzero(event.active):
                feature_sums, images_seen = sums[event.jobs[k].k]
                feature_sums.add_(features[k].float().sum(0))
                images_seen.add_(features.shape[1])

        def end_epoch(job: Job, result: StageResult) -> None:
            det = job.detector
            feature_sums, images_seen = sums[job.k]
            det.centres_ = feature_sums / images_seen
            feature_sums.zero_()  # the next epoch's centres start afresh
            images_seen.zero_()
            det.training_log_ = {**{"epoch_mean_" + key: values for key, values in result.history.items()},
                                 "steps": result.steps}
            if job.callback is not None and det.centres == "train_pass":
                det._fit_centres(job.x)
                det._set_mode(train=True)

        def end(job: Job, result: StageResult) -> None:
            if job.detector.centres == "train_pass":
                job.detector._fit_centres(job.x)

        (stage,) = self._stages(n_train)
        phase = Phase(type(self)._step_losses, (ParamGroup(("net_",), OptimiserSpec("adam", self.lr)),))
        return [StagePlan(stage, ("net_",), (phase,), begin=begin, after_step=after_step, end_epoch=end_epoch,
                          end=end)]

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) features of every transformation of a preprocessed batch."""
        features, _ = self.net_(self.transformer_.apply_all(x))
        return features.reshape(len(x), self.transformer_.n_transforms, -1)

    @torch.no_grad()
    def _fit_centres(self, x_train: torch.Tensor) -> None:
        """Centres from one eval-mode pass over the training images (``centres="train_pass"``)."""
        self._set_mode(train=False)
        sums = torch.zeros_like(self.centres_)
        for start in range(0, len(x_train), self.score_batch_size):
            sums += self._features(x_train[start:start + self.score_batch_size]).sum(0)
        self.centres_ = sums / len(x_train)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        return goad_scores(self._features(x), self.centres_, self.eps)
