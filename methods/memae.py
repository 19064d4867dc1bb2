"""MemAE (Gong et al. 2019): a convolutional autoencoder with the shared memory module on its
bottleneck feature map (docs/baselines.md, MemAE section; memory = docs/method.md eqs. 15-21, entropy =
eqs. 28-30 as the shared `methods.memory` implements them).

Network (written down here because neither the paper text nor the authors' code fixes it for
images; docs/baselines.md: "a few stride-2 convs with BN + ReLU, a mirrored transposed-conv decoder"):

  encoder: for each width w in `widths`:  Conv(k3, s2, p1, no bias) BN ReLU
  memory:  MemoryModule(num_slots, widths[-1]) addressing every spatial position separately
           (`memory_layout="position"`, the default: docs/baselines.md, as the authors' video code), or
           one address for the whole flattened encoding (`"image"`, MemoryModule(num_slots,
           C * h * w)); the MemAE paper's Fig. 2 allows both
  decoder: mirrored: ConvT(k3, s2, p1) BN ReLU per width in reverse, then ConvT(-> nc, bias)
           + `output_activation` (default tanh, since the input is scaled to [-1, 1])

Default widths (16, 32, 64) are those reimplementations quote from the MemAE paper for MNIST
(Conv2(1,2,16)-Conv2(3,2,32)-Conv2(3,2,64); its first conv is 1x1 there, here 3x3 like the others
so that no pixel is skipped); CIFAR-10's profile uses (64, 128, 256) (our choice). Sizes: native,
no resizing: 28 -> 14 -> 7 -> 4 and 32 -> 16 -> 8 -> 4; the decoder's output paddings are
computed from the encoder's sizes so any H x W comes back at its own size.

Init: conv N(0, 0.02), BN weight N(1, 0.02), bias 0 (`init_dcgan_weights`); the memory keeps its
uniform init. Loss: mean-reduced MSE + entropy_weight (0.0002) * addressing entropy. Adam lr 1e-4
(default betas, no weight decay), 100 epochs, input in [-1, 1].

Score (a documented choice, `score`): "mse" (default) = the per-image mean squared error over all
channels and pixels in the [-1, 1] input space, the paper's reconstruction error; "position_l2" =
the authors' video code: sqrt(sum over channels of r^2) per pixel, averaged over pixels.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

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
from methods.memory import MemoryModule, addressing_entropy, check_memory_params, memory_health
from methods.preprocess import to_minus_one_one
from methods.torch_base import TorchDetector, init_dcgan_weights

MNIST_LIKE = {"num_slots": 100, "widths": (16, 32, 64), "memory_layout": "position"}
CIFAR = {"num_slots": 500, "widths": (64, 128, 256), "memory_layout": "position"}
PROFILES: dict = {
    # Paper: N = 100 for MNIST, 500 for CIFAR-10; Fashion-MNIST has no published N: MNIST's
    # setting (same image size, same network) is used. 100 epochs everywhere (docs/baselines.md).
    "paper": {
        "mnist": {**MNIST_LIKE, "epochs": 100},
        "fashion_mnist": {**MNIST_LIKE, "epochs": 100},
        "cifar10": {**CIFAR, "epochs": 100},
        # "*" (methods.DEFAULT): unknown datasets get MNIST's setting, the smallest memory and network.
        "*": {**MNIST_LIKE, "epochs": 100},
    },
    # CPU budget (~30 s per MNIST class for fit + scoring ~6000 test images): the paper's network,
    # lr and batch, fewer epochs. Measured on MNIST (5923 / 5851 train images, 5980 / 5974 test
    # images), 1 torch thread on the shared, heavily loaded 2-core dev machine: class 0 21.8 s,
    # class 8 34.5 s (fit + scoring). Far from converged (epoch-5 loss 0.25).
    "quick": {
        "mnist": {**MNIST_LIKE, "epochs": 5},
        "fashion_mnist": {**MNIST_LIKE, "epochs": 5},
        "cifar10": {**CIFAR, "epochs": 2},
        "*": {**MNIST_LIKE, "epochs": 5},  # MNIST's, as under paper
    },
    # Every dataset: a narrow network for a few steps, for the end-to-end tests.
    "smoke": {"*": {"num_slots": 100, "widths": (8, 16, 32), "epochs": 1, "batch_size": 64,
                    "max_steps": 10}},
}


def _conv_sizes(size: int, stages: int) -> list[int]:
    """Spatial sizes through `stages` Conv(k3, s2, p1) layers: s -> ceil(s / 2)."""
    sizes = [size]
    for _ in range(stages):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class MemAENet(nn.Module):
    """MemAE's network: encoder -> memory -> decoder (module docstring).

    Parameters
    ----------
    nc, height, width : int
        Input channels and size (the decoder's output paddings come from it).
    widths : sequence of int
        Encoder channel widths, one stride-2 conv each.
    num_slots : int
        Memory size N.
    shrink_threshold : float or None
        The memory's lambda; None = 1/N.
    addressing : str
        "dot" or "cosine".
    output_activation : str
        "tanh" or "none".
    memory_layout : str
        "position" (default: one address per bottleneck position) or "image".
    """

    def __init__(self, nc: int, height: int, width: int, widths: Sequence[int], num_slots: int,
                 shrink_threshold: Optional[float], addressing: str, output_activation: str,
                 memory_layout: str = "position") -> None:
        super().__init__()
        hs, ws = _conv_sizes(height, len(widths)), _conv_sizes(width, len(widths))
        self.memory_layout = memory_layout
        enc: list[nn.Module] = []
        channels = nc
        for w in widths:
            enc += [nn.Conv2d(channels, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True)]
            channels = w
        self.encoder = nn.Sequential(*enc)
        dim = widths[-1] if memory_layout == "position" else widths[-1] * hs[-1] * ws[-1]
        self.memory = MemoryModule(num_slots, dim, shrink_threshold, addressing)
        dec: list[nn.Module] = []
        outs = list(reversed(widths[:-1])) + [nc]
        for i, out in enumerate(outs):
            stage = len(widths) - i  # ConvT k3 s2 p1 gives 2 s - 1 + output_padding
            pad = (hs[stage - 1] - (2 * hs[stage] - 1), ws[stage - 1] - (2 * ws[stage] - 1))
            last = i == len(outs) - 1
            dec.append(nn.ConvTranspose2d(channels, out, 3, 2, 1, output_padding=pad, bias=last))
            if not last:
                dec += [nn.BatchNorm2d(out), nn.ReLU(True)]
            channels = out
        if output_activation == "tanh":
            dec.append(nn.Tanh())
        self.decoder = nn.Sequential(*dec)
        self.encoder.apply(init_dcgan_weights)
        self.decoder.apply(init_dcgan_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct a batch through the memory.

        Parameters
        ----------
        x : torch.Tensor
            (B, C, H, W) input in [-1, 1].

        Returns
        -------
        (x_hat, weights) : tuple of torch.Tensor
            x_hat (B, C, H, W); addressing weights (B, N, h, w) for memory_layout "position",
            (B, N) for "image".
        """
        z = self.encoder(x)
        if self.memory_layout == "position":
            z_hat, weights = self.memory(z)  # one address per spatial position: (B, N, h, w)
        else:
            z_hat, weights = self.memory(z.flatten(1))  # one address per image: (B, N)
            z_hat = z_hat.reshape(z.shape)
        return self.decoder(z_hat), weights


def memae_loss(x: torch.Tensor, x_hat: torch.Tensor, weights: torch.Tensor,
               entropy_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MemAE's objective: MSE (mean over all elements) + entropy_weight * addressing entropy.

    The entropy is eqs. 28-30: summed over slots, averaged over images and positions.

    Parameters
    ----------
    x, x_hat : torch.Tensor
        Input and reconstruction, same shape.
    weights : torch.Tensor
        Addressing weights, slots on axis 1.
    entropy_weight : float
        Weight of the entropy term.

    Returns
    -------
    (total, mse, entropy) : tuple of torch.Tensor
        Scalars.
    """
    mse = F.mse_loss(x_hat, x)
    entropy = addressing_entropy(weights)
    return mse + entropy_weight * entropy, mse, entropy


def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-image anomaly score from the reconstruction residual.

    Parameters
    ----------
    x, x_hat : torch.Tensor
        (B, C, H, W) input and reconstruction.
    kind : str
        "mse" (default) = mean over C, H, W of (x - x_hat)^2; "position_l2" = mean over H, W of the
        l2 norm over channels (the authors' video code).

    Returns
    -------
    torch.Tensor
        (B,) scores.
    """
    residual = x - x_hat
    if kind == "mse":
        return residual.pow(2).flatten(1).mean(dim=1)
    return residual.pow(2).sum(dim=1).sqrt().flatten(1).mean(dim=1)


class MemAE(TorchDetector):
    """Memory-augmented autoencoder; see the module docstring for every choice and its default.

    Parameters
    ----------
    num_slots : int
        Memory size N (paper: 100 MNIST, 500 CIFAR-10).
    shrink_threshold : float or None
        lambda; None = 1/N (the paper's range is [1/N, 3/N]).
    addressing : str
        "dot" (the authors' code) or "cosine" (the paper's text).
    entropy_weight : float
        Weight of the addressing entropy (0.0002, the authors').
    widths : sequence of int
        Encoder channel widths, one stride-2 conv each (our choice, see the module docstring).
    output_activation : str
        "tanh" (default, input in [-1, 1]) or "none" (the video code).
    epochs, batch_size : int
        100 epochs are the paper's; batch 64 is ours.
    lr : float
        Adam lr 1e-4, the paper's.
    max_steps : int or None
        Optional cap on the total number of optimiser steps (None = every epoch whole).
    score : str
        "mse" (default) or "position_l2" (see `reconstruction_error`).
    memory_layout : str
        "position" (default: one address per bottleneck position) or "image" (one address per
        image, the flattened encoding as the query).
    random_state : int
        Seed of the initialisation and the shuffling (default 0).
    device : str
        'auto', 'cpu', 'cuda' or 'cuda:N' (default 'auto'; see `resolve_device`).
    score_batch_size : int
        Images per scoring batch (default 1024).
    """

    # Measured (issue 20): reports/published/quick-bf16-fidelity-mnist (fp32 vs bf16 AUROC, quick MNIST, seeds
    # 0-2) and reports/published/speed-cpu (training img/s, 2 threads, idle machine).
    # fp32: bf16 AUROC differs from fp32 (-0.004, p = 0.021); channels-last 1.12x over NCHW (1039 vs 925 img/s).
    default_memory_format = "channels_last"

    memory_size_param = "num_slots"

    def __init__(self, num_slots: int = 100, shrink_threshold: Optional[float] = None,
                 addressing: str = "dot", entropy_weight: float = 0.0002,
                 widths: Sequence[int] = (16, 32, 64), output_activation: str = "tanh",
                 epochs: int = 100, batch_size: int = 64, lr: float = 1e-4,
                 max_steps: Optional[int] = None, score: str = "mse",
                 memory_layout: str = "position", random_state: int = 0, device: str = "auto",
                 score_batch_size: int = 1024) -> None:
        self.num_slots = num_slots
        self.shrink_threshold = shrink_threshold
        self.addressing = addressing
        self.entropy_weight = entropy_weight
        self.widths = widths
        self.output_activation = output_activation
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.max_steps = max_steps
        self.score = score
        self.memory_layout = memory_layout
        self.random_state = random_state
        self.device = device
        self.score_batch_size = score_batch_size

    def _check_params(self) -> None:
        check_memory_params(self.num_slots, self.shrink_threshold, self.addressing, 1e-12)
        check_nonneg_float("entropy_weight", self.entropy_weight)
        if isinstance(self.widths, (str, bytes)) or not isinstance(self.widths, Sequence) or len(self.widths) == 0:
            raise ValueError(f"widths must be a non-empty sequence of positive integers, got {self.widths!r}")
        for w in self.widths:
            check_positive_int("widths", w)
        check_choice("output_activation", self.output_activation, ("tanh", "none"))
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_float("lr", self.lr)
        if self.max_steps is not None:
            check_positive_int("max_steps", self.max_steps)
        check_choice("score", self.score, ("mse", "position_l2"))
        check_choice("memory_layout", self.memory_layout, ("position", "image"))

    _epoch_facts_sample_size = 512  # the memory's health per epoch, on the first 512 training images

    @torch.no_grad()
    def _epoch_facts(self) -> dict[str, float]:
        """The memory's health (methods.memory.memory_health) on the fixed sample, eval mode:
        one query per bottleneck position ("position") or per image ("image")."""
        self._set_mode(train=False)
        x = self._facts_sample_
        z = torch.cat([self.net_.encoder(x[i:i + self.score_batch_size])
                       for i in range(0, len(x), self.score_batch_size)])
        self._set_mode(train=True)
        return memory_health(self.net_.memory, z if self.memory_layout == "position" else z.flatten(1))

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return to_minus_one_one(x)  # native size, no resizing (see the module docstring)

    def _networks(self) -> Iterable[nn.Module]:
        return [self.net_]

    def _stages(self, n_train: int) -> list[Stage]:
        # drop_last=False: every image is used every epoch (BN on an h x w map copes with any batch).
        return [Stage("train", self.batch_size, epochs=self.epochs, max_steps=self.max_steps, drop_last=False)]

    def _build_networks(self, x_train: torch.Tensor) -> None:
        nc, height, width = x_train.shape[1:]
        self.net_ = MemAENet(nc, height, width, tuple(int(w) for w in self.widths), self.num_slots,
                             self.shrink_threshold, self.addressing, self.output_activation,
                             self.memory_layout).to(self.device_)

    def _step_losses(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], list]:
        """The step's loss for the engine: MemAE's objective and its two terms, logged."""
        x_hat, weights = self.net_(x)
        loss, mse, entropy = memae_loss(x, x_hat, weights, self.entropy_weight)
        return [loss], {"loss": loss, "mse": mse, "entropy": entropy}, []

    def _stage_plans(self, n_train: int) -> list[StagePlan]:
        """The training, described once for any number of jobs: one stage, Adam on the whole network.
        The last incomplete batch is kept, so stacked jobs' training sets must have one size."""
        def end_epoch(job: Job, result: StageResult) -> None:
            log = {"epoch_mean_" + key: values for key, values in result.history.items()}
            job.detector.training_log_ = {**log, "steps": result.steps}

        (stage,) = self._stages(n_train)
        phase = Phase(type(self)._step_losses, (ParamGroup(("net_",), OptimiserSpec("adam", self.lr)),))
        return [StagePlan(stage, ("net_",), (phase,), end_epoch=end_epoch)]

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        x_hat, _ = self.net_(x)
        return reconstruction_error(x, x_hat, self.score)
