"""The 72 geometric transformations shared by GEOM and GOAD (docs/baselines.md, GEOM section), applied
to batches of torch tensors on their device in one gather, deterministically.

GEOM's ``transformations.py`` (``Transformer(8, 8)``, copied by GOAD's ``transformations.py``) lists
them as ``itertools.product((False, True), (0, -8, 8), (0, -8, 8), range(4))`` over (flip, tx, ty,
k_rotate), in that order, so transformation ``t`` here is the same index there. Each one, on an
H x W image (``AffineTransformation.__call__``), in this order:

1. flip: ``np.fliplr`` of the H x W x C image, i.e. reverse the columns (W);
2. translate: Keras' ``apply_affine_transform(tx, ty, fill_mode="reflect")``, which calls
   ``scipy.ndimage.affine_transform`` with the identity and offset (tx, ty) on (row, column), so
   ``out[i, j] = in[i + tx, j + ty]`` (tx moves along the rows, ty along the columns), the
   pixels that come from outside read by scipy's "reflect" rule, the half-sample symmetric one
   (``d c b a | a b c d | d c b a``);
3. rotate: ``np.rot90(x, k)`` on the (row, column) axes, i.e. ``torch.rot90(x, k, dims=(-2, -1))``.

Every transformation maps each output pixel to one input pixel, so it is stored as a source-index
map over the H * W positions, built once per image size by applying the steps above to the grid
of pixel indices; applying any mix of transformations to a batch is then one ``torch.gather``.
Flips and rotations are permutations (invertible); the shifts are not (reflection duplicates the
border), as in the authors' code.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.preprocess import to_minus_one_one

#: GEOM's translation for 32 x 32 images (``Transformer(8, 8)``; 16 for their 64 x 64 cats-vs-dogs).
MAX_SHIFT = 8
#: The side both authors train at: GEOM's ``utils.py`` zero-pads MNIST and Fashion-MNIST 28 -> 32.
IMAGE_SIZE = 32


def prepare_images(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Both authors' input: square images zero-padded (equally on each side, the extra pixel after)
    to `size` when smaller (GEOM's ``load_mnist``: ``np.pad(..., 2)`` before scaling), then [0, 1]
    mapped to [-1, 1] (their ``normalize_minus1_1`` / GOAD's ``norm``).

    Parameters
    ----------
    x : Tensor
        (N, C, H, W) images in [0, 1], H == W.
    size : int
        The side to pad up to (larger images are left as they are).

    Returns
    -------
    Tensor
        (N, C, max(H, size), max(W, size)) in [-1, 1].

    Raises
    ------
    ValueError
        For non-square images (the 90-degree rotations need them).
    """
    height, width = x.shape[-2:]
    if height != width:
        raise ValueError(f"the geometric transformations need square images, got {height} x {width}")
    pad = max(0, size - height)
    if pad:
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=0.0)
    return to_minus_one_one(x)


@dataclass(frozen=True)
class Transformation:
    """One geometric transformation: flip, then shift (reflect padding), then rotation.

    Attributes
    ----------
    flip : bool
        Reverse the columns first.
    tx, ty : int
        Shift: ``out[i, j] = in[i + tx, j + ty]`` (rows, columns).
    k_rotate : int
        Number of 90-degree rotations (``torch.rot90`` / ``np.rot90`` direction).
    """

    flip: bool
    tx: int
    ty: int
    k_rotate: int


def geometric_transformations(max_shift: int = MAX_SHIFT) -> tuple[Transformation, ...]:
    """GEOM's transformation list, in its order (module docstring).

    Parameters
    ----------
    max_shift : int
        The translation in pixels (GEOM: 8).

    Returns
    -------
    tuple of Transformation
        72 transformations; index 0 is the identity.
    """
    return tuple(Transformation(flip, tx, ty, k)
                 for flip, tx, ty, k in itertools.product((False, True), (0, -max_shift, max_shift),
                                                          (0, -max_shift, max_shift), range(4)))


def _reflect_indices(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Fold any integer index into [0, size) by scipy's "reflect" (half-sample symmetric) rule."""
    folded = torch.remainder(indices, 2 * size)
    return torch.where(folded >= size, 2 * size - 1 - folded, folded)


def transform_image(image: torch.Tensor, transformation: Transformation) -> torch.Tensor:
    """Apply one transformation to one image or a batch, step by step (the reference definition).

    Parameters
    ----------
    image : Tensor
        (..., H, W); H == W when the transformation rotates by an odd multiple of 90 degrees.
    transformation : Transformation
        What to apply.

    Returns
    -------
    Tensor
        Same shape.
    """
    out = image.flip(-1) if transformation.flip else image
    if transformation.tx or transformation.ty:
        height, width = out.shape[-2:]
        rows = _reflect_indices(torch.arange(height, device=out.device) + transformation.tx, height)
        cols = _reflect_indices(torch.arange(width, device=out.device) + transformation.ty, width)
        out = out.index_select(-2, rows).index_select(-1, cols)
    if transformation.k_rotate % 4:
        out = torch.rot90(out, transformation.k_rotate, dims=(-2, -1))
    return out


class GeometricTransformer:
    """Applies a list of transformations to batches by one gather (module docstring).

    Parameters
    ----------
    transformations : sequence of Transformation
        Default: the 72 of `geometric_transformations()`.
    """

    def __init__(self, transformations: tuple[Transformation, ...] | None = None) -> None:
        self.transformations = tuple(transformations) if transformations is not None else geometric_transformations()
        self._maps: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    @property
    def n_transforms(self) -> int:
        """Number of transformations."""
        return len(self.transformations)

    def source_maps(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Where each output pixel of each transformation reads from.

        Parameters
        ----------
        height, width : int
            The image size (square for rotations).
        device : torch.device
            Where the maps live (built once per size and device).

        Returns
        -------
        Tensor
            (T, H * W) long: ``out.flatten(-2)[..., p] = x.flatten(-2)[..., maps[t, p]]``.
        """
        key = (height, width, torch.device(device))
        if key not in self._maps:
            grid = torch.arange(height * width, device=device).reshape(height, width)
            self._maps[key] = torch.stack([transform_image(grid, t).reshape(-1) for t in self.transformations])
        return self._maps[key]

    def apply(self, x: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        """Transform image b of the batch by transformation ``t_index[b]``.

        Parameters
        ----------
        x : Tensor
            (B, C, H, W) images.
        t_index : Tensor
            (B,) integer transformation indices, on x's device.

        Returns
        -------
        Tensor
            (B, C, H, W) transformed images.

        Raises
        ------
        ValueError
            If the images are not square (a 90-degree rotation would change their shape).
        """
        batch, channels, height, width = x.shape
        if height != width:
            raise ValueError(f"the geometric transformations need square images, got {height} x {width}")
        maps = self.source_maps(height, width, x.device)[t_index.long()]  # (B, H * W)
        flat = x.reshape(batch, channels, height * width)
        return flat.gather(2, maps[:, None, :].expand(batch, channels, height * width)).reshape(x.shape)

    def apply_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every transformation of every image, image-major: row ``b * T + t`` is transformation t of image b.

        Parameters
        ----------
        x : Tensor
            (B, C, H, W) images.

        Returns
        -------
        Tensor
            (B * T, C, H, W).
        """
        t_index = torch.arange(self.n_transforms, device=x.device).repeat(len(x))
        return self.apply(x.repeat_interleave(self.n_transforms, dim=0), t_index)
