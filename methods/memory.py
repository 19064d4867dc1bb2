"""The memory module of MemAE (Gong et al. 2019) as Mem_GANomaly uses it: docs/method.md eqs. 15-21,
and the addressing-weight entropy of eqs. 28-30. Used as is by Mem_GANomaly (on the latent
vector) and MemAE (on a feature map, one address per spatial position)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import check_choice, check_nonneg_float, check_positive_float, check_positive_int

ADDRESSING = ("dot", "cosine")


def check_memory_params(num_slots: int, shrink_threshold: Optional[float], addressing: str, eps: float,
                        num_slots_name: str = "num_slots") -> None:
    """Validate the memory module's arguments: the one check used by `MemoryModule`, MemAE and
    Mem_GANomaly.

    Parameters
    ----------
    num_slots : int
        N, a positive integer.
    shrink_threshold : float or None
        lambda of eq. 18: None (= 1/N) or a number in [0, 1); a threshold >= 1 would cut every
        softmax weight.
    addressing : str
        ``"dot"`` or ``"cosine"``.
    eps : float
        A positive finite number.
    num_slots_name : str
        The caller's name for N in error messages (Mem_GANomaly's is ``memory_size``).

    Raises
    ------
    ValueError
        Naming the bad argument.
    """
    check_positive_int(num_slots_name, num_slots)
    if shrink_threshold is not None:
        check_nonneg_float("shrink_threshold", shrink_threshold)
        if shrink_threshold >= 1:
            raise ValueError(f"shrink_threshold must be < 1 (it cuts softmax weights), got {shrink_threshold!r}")
    check_choice("addressing", addressing, ADDRESSING)
    check_positive_float("eps", eps)


class MemoryModule(nn.Module):
    """Memory M in R^{N x C}, learned by backprop.

    Parameters
    ----------
    num_slots : int
        N, the number of memory items.
    dim : int
        C, the feature dimension (Mem_GANomaly's nz).
    shrink_threshold : float or None
        lambda of eq. 18, in [0, 1). None means 1/N, the documented default (the paper gives
        none; MemAE's range is [1/N, 3/N]). 0 disables the hard-shrink gate.
    addressing : {"dot", "cosine"}
        "dot" (eq. 15, the default) or "cosine" (the MemAE paper's eq. 10).
    eps : float
        Epsilon of eq. 18 and of the l1 renormalisation (MemAE's 1e-12).

    Notes
    -----
    ``forward(z)`` takes (B, C) vectors or (B, C, H, W) maps (or (B, C, 1, 1)) and returns
    ``(z', w')``: z' with z's shape, and the addressing weights w' with the slot axis at dim 1,
    shape (B, N) or (B, N, H, W).
    """

    def __init__(self, num_slots: int, dim: int, shrink_threshold: Optional[float] = None,
                 addressing: str = "dot", eps: float = 1e-12) -> None:
        super().__init__()
        check_memory_params(num_slots, shrink_threshold, addressing, eps)
        check_positive_int("dim", dim)
        self.num_slots = num_slots
        self.dim = dim
        self.shrink_threshold = 1.0 / num_slots if shrink_threshold is None else float(shrink_threshold)
        self.addressing = addressing
        self.eps = eps
        bound = 1.0 / math.sqrt(dim)  # MemAE's init: U(-1/sqrt(C), 1/sqrt(C))
        self.memory = nn.Parameter(torch.empty(num_slots, dim).uniform_(-bound, bound))

    def address(self, queries: torch.Tensor) -> torch.Tensor:
        """Addressing weights w' of eqs. 15-20.

        Parameters
        ----------
        queries : Tensor
            (B, C) query vectors.

        Returns
        -------
        Tensor
            (B, N) weights, each row summing to 1 (or all zero when the gate cuts every slot).
        """
        if self.addressing == "dot":
            similarity = queries @ self.memory.t()                                        # (15)
        else:
            similarity = F.normalize(queries, dim=1) @ F.normalize(self.memory, dim=1).t()
        weights = torch.softmax(similarity, dim=1)                                         # (16)
        if self.shrink_threshold > 0:
            shifted = weights - self.shrink_threshold
            weights = F.relu(shifted) * weights / (shifted.abs() + self.eps)               # (18, 19)
            # (20); F.normalize's eps makes an all-cut row give w' = 0, hence z' = 0, not NaN.
            weights = F.normalize(weights, p=1, dim=1, eps=self.eps)
        return weights

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Recall from memory (eq. 21).

        Parameters
        ----------
        z : Tensor
            (B, C) vectors or (B, C, H, W) maps (one address per position).

        Returns
        -------
        tuple of Tensor
            ``(z', w')``: z' with z's shape; w' of shape (B, N) or (B, N, H, W).
        """
        if z.dim() == 2:
            weights = self.address(z)
            return weights @ self.memory, weights                                          # (21)
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) or (B, {self.dim}, H, W), got {tuple(z.shape)}")
        b, c, h, w = z.shape
        queries = z.permute(0, 2, 3, 1).reshape(-1, c)
        weights = self.address(queries)
        recalled = (weights @ self.memory).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return recalled, weights.reshape(b, h, w, self.num_slots).permute(0, 3, 1, 2)


def addressing_entropy(weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Eqs. 28-30: sum over slots (dim 1) of -w' log w', averaged over samples (and positions).

    Parameters
    ----------
    weights : Tensor
        Addressing weights with the slot axis at dim 1.
    eps : float
        The clamp of log; a zero weight contributes exactly zero, with a finite gradient.

    Returns
    -------
    Tensor
        A scalar.
    """
    return -(weights * torch.log(weights.clamp_min(eps))).sum(dim=1).mean()


@torch.no_grad()
def memory_health(memory: MemoryModule, queries: torch.Tensor) -> dict[str, float]:
    """How the memory is used by a fixed set of queries: a collapse (an encoder whose queries
    outgrow the memory rows, a softmax that saturates, the hard shrink leaving a few slots)
    shows here without reading code.

    Parameters
    ----------
    memory : MemoryModule
        The memory, addressed as in training (eqs. 15-20, shrink and renormalisation included).
    queries : torch.Tensor
        (B, C) query vectors (one per image) or (B, C, H, W) maps (one query per position).

    Returns
    -------
    dict
        ``memory_slots_in_use``: slots whose addressing weight w' is > 0 for at least one query
        (of N); ``memory_slots_per_query``: mean number of slots with w' > 0 per query;
        ``memory_max_weight``: mean over queries of the largest w'; ``query_norm``: mean l2 norm
        of the queries (||z||); ``memory_row_norm``: mean l2 norm of the N memory rows.
    """
    if queries.dim() == 4:
        queries = queries.permute(0, 2, 3, 1).reshape(-1, queries.shape[1])
    weights = memory.address(queries.float())
    used = weights > 0
    return {"memory_slots_in_use": float(used.any(dim=0).sum()),
            "memory_slots_per_query": float(used.sum(dim=1).float().mean()),
            "memory_max_weight": float(weights.max(dim=1).values.mean()),
            "query_norm": float(queries.float().norm(dim=1).mean()),
            "memory_row_norm": float(memory.memory.float().norm(dim=1).mean())}
