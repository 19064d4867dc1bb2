"""Small shared preprocessing helpers. Inputs are [0, 1] float tensors (N, C, H, W) on the device."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to size x size (GANomaly resizes MNIST 28 -> 32); a no-op at that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def to_minus_one_one(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range of a Tanh decoder."""
    return x * 2.0 - 1.0


def flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def global_contrast_normalization(x: torch.Tensor) -> torch.Tensor:
    """Deep SVDD's per-image GCN with l1 scale: subtract the image mean, divide by the mean
    absolute deviation over all pixels and channels."""
    flat = flatten(x)
    centred = flat - flat.mean(dim=1, keepdim=True)
    scale = centred.abs().mean(dim=1, keepdim=True)
    return (centred / scale.clamp_min(1e-12)).reshape(x.shape)
