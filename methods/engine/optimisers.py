"""The optimisers of the engine: how one parameter group's optimiser is described (`OptimiserSpec`)
and built, a plain torch.optim optimiser for one job (K = 1: a solo fit's exact operations) or a
stacked one for K jobs (`StackedAdam` / `StackedRMSprop`: elementwise, per-job step counts, masked
updates, state on the device so a step can be captured in a CUDA graph), and gradient clipping
per job."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch


@dataclass(frozen=True)
class OptimiserSpec:
    """One parameter group's optimiser, as torch.optim's arguments.

    Attributes
    ----------
    kind : str
        "adam" (torch.optim.Adam, without amsgrad) or "rmsprop" (torch.optim.RMSprop without momentum,
        centring or weight decay).
    lr : float
        Learning rate (an lr schedule multiplies it, `StagePlan.lr_factor`).
    betas : tuple of float
        Adam's betas.
    eps : float
        Both optimisers' eps.
    weight_decay : float
        Adam's weight decay.
    alpha : float
        RMSprop's smoothing constant.
    """

    kind: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    alpha: float = 0.99

    def build(self, params: Sequence[torch.Tensor], stacked: bool) -> "JobOptimiser":
        """The optimiser of `params`: stacked (leading axis the job) or torch's own (one job).

        Parameters
        ----------
        params : sequence of torch.Tensor
            The group's parameters.
        stacked : bool
            Whether they are stacked parameters (K > 1, or a CUDA-graph fit).

        Returns
        -------
        JobOptimiser
        """
        if self.kind not in ("adam", "rmsprop"):
            raise ValueError(f"optimiser kind must be 'adam' or 'rmsprop', got {self.kind!r}")
        if stacked:
            if self.kind == "adam":
                return StackedAdam(params, self.lr, self.betas, self.eps, self.weight_decay)
            return StackedRMSprop(params, self.lr, self.alpha, self.eps)
        if self.kind == "adam":
            return TorchOptimiser(torch.optim.Adam(list(params), lr=self.lr, betas=self.betas, eps=self.eps,
                                                   weight_decay=self.weight_decay))
        return TorchOptimiser(torch.optim.RMSprop(list(params), lr=self.lr, alpha=self.alpha, eps=self.eps))


class TorchOptimiser:
    """A torch.optim optimiser behind the stacked optimisers' interface (one job: the mask is ignored,
    the engine steps it only when its job is active).

    Parameters
    ----------
    optimiser : torch.optim.Optimizer
        The optimiser.
    """

    def __init__(self, optimiser: torch.optim.Optimizer) -> None:
        self.optimiser = optimiser
        self.params = [p for group in optimiser.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        """The learning rate of every group (setting it sets all)."""
        return self.optimiser.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimiser.param_groups:
            group["lr"] = value

    def zero_grad(self) -> None:
        """Set every parameter's gradient to None."""
        self.optimiser.zero_grad(set_to_none=True)

    def step(self, active: "np.ndarray | torch.Tensor | None" = None) -> None:
        """One step of the optimiser (`active` is ignored: one job)."""
        self.optimiser.step()

class _StackedOptimiser:
    """What the stacked optimisers share: the stacked parameters, per-job step counts and the
    learning rate kept on the device (so a step has no host synchronisation and can be captured in
    a CUDA graph, methods/engine/graphs.py), and the masked write-back (idle jobs keep parameters and state).

    Parameters
    ----------
    params : sequence of torch.Tensor
        Stacked parameters, each of shape (K, ...).
    lr : float
        Learning rate.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float) -> None:
        self.params = list(params)
        device = self.params[0].device
        self.step_counts = torch.zeros(self.params[0].shape[0], dtype=torch.float64, device=device)
        self._lr = torch.tensor(float(lr), dtype=torch.float64, device=device)
        self._lr_value = float(lr)

    @property
    def lr(self) -> float:
        """The learning rate; setting it (an lr schedule, between steps) updates the device copy in place."""
        return self._lr_value

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr_value = float(value)
        self._lr.fill_(float(value))

    @property
    def steps(self) -> np.ndarray:
        """Each job's number of steps so far, (K,) int64 (a host copy)."""
        return self.step_counts.cpu().numpy().astype(np.int64)

    def zero_grad(self) -> None:
        """Set every parameter's gradient to None."""
        for p in self.params:
            p.grad = None

    def _begin_step(self, active: "np.ndarray | torch.Tensor") -> torch.Tensor:
        """Count a step for the active jobs; their mask on the device."""
        mask = as_job_mask(active, self.step_counts.device)
        self.step_counts += mask
        return mask

    @staticmethod
    def _commit(keep: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """old <- new where keep (broadcast over a job's slice), old unchanged elsewhere."""
        for old, new in pairs:
            old.copy_(torch.where(keep, new, old))


class StackedAdam(_StackedOptimiser):
    """Adam (torch.optim.Adam's update, without amsgrad) over stacked parameters whose leading axis is the job.

    `step(active)` updates only the jobs where `active` (shape (K,)) is True and keeps a step count
    per job for the bias corrections.

    Parameters
    ----------
    params : sequence of torch.Tensor
        Stacked parameters, each of shape (K, ...).
    lr : float
        Learning rate, as torch.optim.Adam.
    betas : tuple of float
        As torch.optim.Adam (default (0.9, 0.999)).
    eps : float
        As torch.optim.Adam (default 1e-8).
    weight_decay : float
        As torch.optim.Adam (default 0).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)  # step counts and lr on the device (float64, for the bias corrections)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, active: "np.ndarray | torch.Tensor") -> None:
        """One Adam step for the active jobs; the others' parameters and state stay unchanged.

        Parameters
        ----------
        active : np.ndarray or torch.Tensor
            (K,) bool, the jobs to update (a device tensor keeps the step free of host copies).
        """
        beta1, beta2 = self.betas
        mask = self._begin_step(active)
        steps = self.step_counts.clamp(min=1)
        dtype = self.params[0].dtype
        step_size = (self._lr / (1 - torch.pow(beta1, steps))).to(dtype)
        bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, steps)).to(dtype)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            m_new = m.lerp(grad, 1 - beta1)
            v_new = v.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v_new.sqrt() / bc2_sqrt.view(shape)).add_(self.eps)
            p_new = p - step_size.view(shape) * m_new / denom
            self._commit(mask.view(shape), [(m, m_new), (v, v_new), (p, p_new)])


class StackedRMSprop(_StackedOptimiser):
    """RMSprop (torch.optim.RMSprop's update without momentum, centring or weight decay) over
    stacked parameters whose leading axis is the job.

    `step(active)` updates only the jobs where `active` (shape (K,)) is True; the others keep their
    parameters and running averages.

    Parameters
    ----------
    params : sequence of torch.Tensor
        Stacked parameters, each of shape (K, ...).
    lr : float
        Learning rate, as torch.optim.RMSprop.
    alpha : float
        Smoothing constant, as torch.optim.RMSprop (default 0.99).
    eps : float
        As torch.optim.RMSprop (default 1e-8).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, alpha: float = 0.99, eps: float = 1e-8) -> None:
        super().__init__(params, lr)
        self.alpha, self.eps = alpha, eps
        self.square_avg = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, active: "np.ndarray | torch.Tensor") -> None:
        """One RMSprop step for the active jobs; the others' parameters and state stay unchanged.

        Parameters
        ----------
        active : np.ndarray or torch.Tensor
            (K,) bool, the jobs to update (a device tensor keeps the step free of host copies).
        """
        mask = self._begin_step(active)
        lr = self._lr.to(self.params[0].dtype)
        for p, sq in zip(self.params, self.square_avg):
            if p.grad is None:
                continue
            grad = p.grad
            sq_new = sq.mul(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
            p_new = p - lr * (grad / sq_new.sqrt().add_(self.eps))
            self._commit(mask.view((-1,) + (1,) * (p.dim() - 1)), [(sq, sq_new), (p, p_new)])


def as_job_mask(active: "np.ndarray | torch.Tensor", device: torch.device) -> torch.Tensor:
    """A (K,) bool job mask as a tensor on `device` (no copy when it is one already).

    Parameters
    ----------
    active : np.ndarray or torch.Tensor
        (K,) bool.
    device : torch.device
        Where the mask is needed.

    Returns
    -------
    torch.Tensor
    """
    if isinstance(active, torch.Tensor):
        return active.to(device=device, dtype=torch.bool)
    return torch.from_numpy(np.asarray(active, dtype=bool)).to(device)


@torch.no_grad()
def clip_grad_norm_per_job(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ per job: job k's gradients (slice k of every stacked
    parameter) scaled by min(1, max_norm / (||g_k|| + 1e-6)), ||g_k|| its total 2-norm.

    Parameters
    ----------
    params : sequence of torch.Tensor
        Stacked parameters (K, ...), their gradients clipped in place (None gradients skipped).
    max_norm : float
        The largest total gradient norm per job.

    Returns
    -------
    torch.Tensor
        (K,) each job's total gradient norm before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads], dim=1)  # (K, P)
    total = torch.linalg.vector_norm(norms, 2, dim=1)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view((-1,) + (1,) * (g.dim() - 1)).to(g.dtype))
    return total



JobOptimiser = Union[TorchOptimiser, StackedAdam, StackedRMSprop]


