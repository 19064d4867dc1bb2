"""DCGAN building blocks shared by GANomaly, Mem_GANomaly and f-AnoGAN (docs/baselines.md, GANomaly
section: the authors' lib/networks.py layout, written anew). For isize = 32 and ngf = ndf = 64:

  encoder:  Conv(nc->64, k4 s2 p1) LReLU(0.2) | Conv(64->128) BN LReLU | Conv(128->256) BN LReLU
            | Conv(256->nz, k4 s1 p0)                      (all convs bias-free)
  decoder:  ConvT(nz->256, k4 s1 p0) BN ReLU | ConvT(256->128, k4 s2 p1) BN ReLU
            | ConvT(128->64) BN ReLU | ConvT(64->nc, k4 s2 p1) Tanh
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

Norm = Optional[Callable[[int, int], nn.Module]]  # (channels, spatial size) -> normalisation layer


def batch_norm(channels: int, size: int) -> nn.Module:
    """BatchNorm2d over `channels` (`size`, the spatial size, is unused: the `Norm` signature)."""
    return nn.BatchNorm2d(channels)


def layer_norm(channels: int, size: int) -> nn.Module:
    """LayerNorm over (channels, size, size): per-sample normalisation for WGAN-GP critics, where
    BatchNorm would break the per-sample gradient penalty."""
    return nn.LayerNorm([channels, size, size])


def _check_isize(isize: int) -> int:
    if isize < 16 or isize & (isize - 1):
        raise ValueError(f"image size must be a power of two >= 16, got {isize}")
    return int(math.log2(isize)) - 3  # number of stride-2 pyramid stages after the first conv


class DCGANFeatures(nn.Module):
    """The encoder pyramid without its last conv: (B, nc, isize, isize) -> (B, C, 4, 4).

    Parameters
    ----------
    isize : int
        Input size (square images), a power of two >= 16.
    nc : int
        Input channels.
    ndf : int
        Width of the first conv; each stride-2 stage doubles it (``out_channels`` is the last).
    norm : callable or None
        ``norm(channels, size)`` builds the layer after each conv but the first; None = none.
    bias : bool
        Conv biases (DCGAN: none).
    """

    def __init__(self, isize: int, nc: int, ndf: int = 64, norm: Norm = batch_norm, bias: bool = False) -> None:
        super().__init__()
        stages = _check_isize(isize)
        layers: list[nn.Module] = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=bias), nn.LeakyReLU(0.2, inplace=True)]
        channels, size = ndf, isize // 2
        for _ in range(stages):
            layers.append(nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=bias))
            channels, size = channels * 2, size // 2
            if norm is not None:
                layers.append(norm(channels, size))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.body = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DCGANEncoder(nn.Module):
    """Image -> latent map (B, nz, 1, 1): GANomaly's G_E and E (docs/method.md eqs. 1 and 3).

    Parameters
    ----------
    isize, nc : int
        Input size and channels, as for `DCGANFeatures`.
    nz : int
        Latent size.
    ndf : int
        Width of the first conv.
    norm : callable or None
        As for `DCGANFeatures`.
    """

    def __init__(self, isize: int, nc: int, nz: int = 100, ndf: int = 64, norm: Norm = batch_norm) -> None:
        super().__init__()
        self.features = DCGANFeatures(isize, nc, ndf, norm)
        self.final = nn.Conv2d(self.features.out_channels, nz, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.features(x))


class DCGANDecoder(nn.Module):
    """Latent (B, nz, 1, 1) or (B, nz) -> image (B, nc, isize, isize) in [-1, 1] (G_D, eq. 2).

    Parameters
    ----------
    isize : int
        Output size, a power of two >= 16.
    nc : int
        Output channels.
    nz : int
        Latent size.
    ngf : int
        Width of the last transposed conv before the output; earlier ones are wider by powers of 2.
    """

    def __init__(self, isize: int, nc: int, nz: int = 100, ngf: int = 64) -> None:
        super().__init__()
        stages = _check_isize(isize)
        channels = ngf * 2 ** stages
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, channels, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(True)]
        for _ in range(stages):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(channels // 2), nn.ReLU(True)]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.body(z)


class DCGANDiscriminator(nn.Module):
    """Encoder layout with a one-channel last conv.

    ``forward(x)`` returns ``(logit, features)``, the features being the last feature layer f(.)
    (the map before the final conv). It returns a logit, not a probability: BCE-with-logits is the
    numerically stable form of GANomaly's sigmoid + BCE.

    Parameters
    ----------
    isize, nc : int
        Input size and channels, as for `DCGANFeatures`.
    ndf : int
        Width of the first conv.
    norm : callable or None
        As for `DCGANFeatures`.
    """

    def __init__(self, isize: int, nc: int, ndf: int = 64, norm: Norm = batch_norm) -> None:
        super().__init__()
        self.features = DCGANFeatures(isize, nc, ndf, norm)
        self.classifier = nn.Conv2d(self.features.out_channels, 1, 4, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.classifier(features).reshape(-1), features
