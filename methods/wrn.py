"""The Wide Residual Network (Zagoruyko & Komodakis 2016) of the transformation-classification
detectors, GEOM and GOAD (docs/baselines.md, GEOM and GOAD sections), written anew after both
authors' versions: GEOM's Keras ``models/wide_residual_network.py`` and GOAD's PyTorch
``wideresnet.py`` (itself adapted from xternalz/WideResNet-pytorch).

WRN-d-k, n = (d - 4) / 6 blocks per group, widths (b, b k, 2 b k, 4 b k) with b = `base_width`
= 16 in both codes (the reduced profiles narrow it):

  conv3x3(in -> b) | group 1: n blocks, b k, stride 1 | group 2: n blocks, 2 b k, stride 2
  | group 3: n blocks, 4 b k, stride 2 | BN ReLU | global average pool -> features (4 b k)
  | linear -> logits

Pre-activation basic block: ``BN ReLU conv3x3(stride) [BN ReLU dropout] conv3x3`` plus the input,
or, where the width changes, plus ``conv1x1(stride)`` of the pre-activated input. All convolutions
are bias-free, padding 1 (PyTorch's symmetric padding; Keras' "same" pads stride-2 convolutions
on one side only, a difference of one pixel row that we do not copy).

Two switches keep each author's network:
- ``mid_bn_relu``: True is the standard block (GEOM). GOAD's published block computes the middle
  ``BN ReLU`` and then overwrites it (its ``wideresnet.py`` line marked "todo": ``out =
  self.conv1(...)`` a second time), so its block is ``BN ReLU conv conv``; False reproduces that.
- ``conv_init``: "fan_in" = He normal N(0, 2 / fan_in) (GEOM's ``_conv_kernel_initializer``),
  "fan_out" = N(0, 2 / (k * k * out_channels)) (GOAD's loop over ``self.modules()``). The linear
  layer is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with zero bias in both; BatchNorm weight 1, bias 0.

The 8 x 8 average pool of both codes is the global average pool on 32 x 32 inputs; here it is
global for any size.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import check_positive_int


class WideBasicBlock(nn.Module):
    """One pre-activation WRN block (module docstring).

    Parameters
    ----------
    in_channels, out_channels : int
        Widths.
    stride : int
        Stride of the first convolution (and of the shortcut convolution).
    dropout : float
        Dropout rate between the two convolutions (0 in both authors' settings).
    mid_bn_relu : bool
        BatchNorm + ReLU between the two convolutions (the standard block); False = GOAD's code.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float = 0.0,
                 mid_bn_relu: bool = True) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.mid = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU()) if mid_bn_relu else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.equal_in_out = in_channels == out_channels and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(self.mid(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor returning (features, logits) (module docstring).

    Parameters
    ----------
    depth : int
        6 n + 4 (10 in both authors' image settings: WRN-10-4).
    widen_factor : int
        k.
    num_classes : int
        Logits (the number of transformations).
    in_channels : int
        Image channels.
    dropout : float
        Dropout rate inside the blocks.
    mid_bn_relu : bool
        See `WideBasicBlock`.
    conv_init : str
        "fan_in" (GEOM) or "fan_out" (GOAD).
    base_width : int
        b, the stem's width (16 in both codes).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
                 dropout: float = 0.0, mid_bn_relu: bool = True, conv_init: str = "fan_in",
                 base_width: int = 16) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 with n >= 1, got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [base_width, base_width * widen_factor, 2 * base_width * widen_factor, 4 * base_width * widen_factor]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        channels = widths[0]
        for group, stride in zip(range(1, 4), (1, 2, 2)):
            for block in range(blocks_per_group):
                layers.append(WideBasicBlock(channels, widths[group], stride if block == 0 else 1, dropout,
                                             mid_bn_relu))
                channels = widths[group]
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        self.feature_dim = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan = module.kernel_size[0] * module.kernel_size[1] * (
                    module.in_channels if conv_init == "fan_in" else module.out_channels)
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        bound = 1.0 / math.sqrt(channels)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (features (B, 4 b k), logits (B, num_classes))."""
        features = self.features(x)
        return features, self.fc(features)


def check_wrn_params(depth: object, widen_factor: object, base_width: object) -> None:
    """Check a Wide ResNet's shape hyperparameters (GEOM's and GOAD's `depth`, `widen_factor`, `base_width`).

    Parameters
    ----------
    depth, widen_factor, base_width : object
        The values given.

    Raises
    ------
    ValueError
        Naming the hyperparameter: depth must be 6 n + 4 with n >= 1; the widths positive integers.
    """
    check_positive_int("depth", depth)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6 n + 4 with n >= 1 (10, 16, 22, ...), got {depth!r}")
    check_positive_int("widen_factor", widen_factor)
    check_positive_int("base_width", base_width)
