"""Small shared preprocessing helpers. Inputs are [0, 1] float tensors (N, C, H, W) on the device."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to size x size (GANomaly resizes MNIST 28 -> 32); a no-op at that size.

    Parameters
    ----------
    x : Tensor
        (N, C, H, W) images.
    size : int
        The output height and width.

    Returns
    -------
    Tensor
        (N, C, size, size).
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def to_minus_one_one(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to [-1, 1], the range of a Tanh decoder.

    Parameters
    ----------
    x : Tensor
        Images in [0, 1].

    Returns
    -------
    Tensor
        ``2 x - 1``.
    """
    return x * 2.0 - 1.0


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C * H * W).

    Parameters
    ----------
    x : Tensor
        A batch.

    Returns
    -------
    Tensor
        One row per sample.
    """
    return x.reshape(x.shape[0], -1)


def global_contrast_normalization(x: torch.Tensor) -> torch.Tensor:
    """Deep SVDD's per-image global contrast normalisation with l1 scale: subtract the image mean,
    divide by the mean absolute deviation over all pixels and channels.

    Parameters
    ----------
    x : Tensor
        (N, C, H, W) images.

    Returns
    -------
    Tensor
        The normalised images, same shape (a constant image maps to zeros).
    """
    flat = flatten(x)
    centred = flat - flat.mean(dim=1, keepdim=True)
    scale = centred.abs().mean(dim=1, keepdim=True)
    return (centred / scale.clamp_min(1e-12)).reshape(x.shape)
