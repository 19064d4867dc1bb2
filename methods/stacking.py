"""Stacked training: K jobs of one detector (same class, same hyperparameters, different seeds
and/or training sets) trained together in one process as ONE batched model.

The K networks' parameters and buffers are stacked along a new leading axis
(`torch.func.stack_module_state`) and one forward pass runs all K through `torch.func.vmap` +
`functional_call`, so a GPU sees K times the work per kernel launch. Per job stay separate:

* data and shuffling: job k draws its own permutation from its own `torch.Generator`, exactly as
  its solo fit would, and its minibatch is indexed from its own training set;
* initialisation and seeds: each job's networks are built by its own `_begin_fit` (which seeds
  the global RNG with the job's seed) and `_build_networks`, as in the solo fit, then stacked;
* BatchNorm statistics: the running buffers are stacked too, and vmap updates each job's slice;
* optimiser state: `StackedAdam` / `StackedRMSprop`, elementwise with per-job step counts, so
  job k's slice sees exactly the updates of its own optimiser; gradient clipping per job
  (`clip_grad_norm_per_job`);
* random draws in a step: made outside vmap (which runs with randomness="error") per job, from
  the job's own generator or global-RNG stream (`JobRNG`), in its solo step's order and shapes
  (`job_draws`), and passed into the vmapped step as inputs;
* divergence: a per-job monitor; a job with a non-finite value stops (recorded as diverged at the
  end of that epoch, as a solo fit raises there) and the others go on;
* jobs with fewer steps in an epoch (smaller training sets) sit out the last steps of the epoch:
  their parameters, optimiser state and BatchNorm buffers are left unchanged (masked).

What is not bit-identical to a solo fit: the batched kernels sum in another order (float
reassociation), and StackedAdam evaluates Adam's formula with per-job tensors where torch's
Adam uses Python scalars; both are rounding-level differences, which an unstable GAN can grow
over many steps (as it grows any rounding difference, e.g. another thread count).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from methods.base import DivergedError, EpochCallback, supports_stacking
from methods.graphs import GraphedStep


class _StackedOptimiser:
    """What the stacked optimisers share: the stacked parameters, per-job step counts and the
    learning rate kept on the device (so a step has no host synchronisation and can be captured in
    a CUDA graph, methods/graphs.py), and the masked write-back (idle jobs keep parameters and state).

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


def job_draws(active: np.ndarray, draw: Callable[[int], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-job random inputs for a vmapped step, drawn outside vmap (which runs with randomness="error").

    Parameters
    ----------
    active : np.ndarray
        (K,) bool; `draw(k)` is called for the active jobs only, in job order (each draws from its
        own generator or RNG stream, as its solo step would), the others get zeros.
    draw : callable
        draw(k) -> job k's tensors, the same shapes for every job.

    Returns
    -------
    list of torch.Tensor
        Each draw stacked over the jobs, (K, ...).
    """
    drawn = {k: list(draw(k)) for k in np.flatnonzero(active)}
    like = next(iter(drawn.values()))
    return [torch.stack([drawn[k][i] if k in drawn else torch.zeros_like(like[i]) for k in range(len(active))])
            for i in range(len(like))]


class StackedModules:
    """K copies of a dict of modules (same architecture) as stacked parameters and buffers.

    Offers a vmapped functional forward and a way back to each job's own modules.

    Parameters
    ----------
    per_job : list of dict of str to nn.Module
        Per job, its modules by name (same names and architectures for every job).
    """

    def __init__(self, per_job: list[dict[str, nn.Module]]) -> None:
        self.names = list(per_job[0])
        joints = [nn.ModuleDict(modules) for modules in per_job]
        self.template = copy.deepcopy(joints[0])  # holds the structure; its own tensors are not used
        self.params, self.buffers = stack_module_state(joints)
        self.joints = joints

    def group_params(self, name: str) -> list[torch.Tensor]:
        """The stacked parameters of module `name`.

        Parameters
        ----------
        name : str
            The module's name.

        Returns
        -------
        list of torch.Tensor
            Its stacked parameters, each (K, ...).
        """
        return [p for key, p in self.params.items() if key.split(".", 1)[0] == name]

    def call(self, fn: Callable[..., Any], x: torch.Tensor, *extra: torch.Tensor) -> Any:
        """vmap over jobs of fn(modules, x[k], *(e[k] for e in extra)), the modules carrying job k's
        parameters and buffers.

        BatchNorm in train mode updates job k's slice of the stacked running statistics.

        Parameters
        ----------
        fn : callable
            fn(modules, x_k, *extra_k) -> outputs, on the template modules.
        x : torch.Tensor
            (K, B, ...) the jobs' inputs.
        *extra : torch.Tensor
            (K, ...) further per-job inputs (e.g. random draws made outside vmap).

        Returns
        -------
        Any
            fn's outputs stacked over jobs along a leading axis.
        """
        wrapper = _Apply(self.template, fn)
        params = {f"inner.{k}": v for k, v in self.params.items()}
        buffers = {f"inner.{k}": v for k, v in self.buffers.items()}

        def one(p: dict, b: dict, xk: torch.Tensor, *ek: torch.Tensor) -> Any:
            return functional_call(wrapper, {**p, **b}, (xk, *ek))

        return vmap(one, randomness="error")(params, buffers, x, *extra)

    @torch.no_grad()
    def buffers_snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the stacked buffers.

        Returns
        -------
        dict of str to torch.Tensor
        """
        return {key: b.clone() for key, b in self.buffers.items()}

    @torch.no_grad()
    def restore_buffers(self, snapshot: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        """Job k's buffers back to `snapshot` where keep[k] is False (jobs sitting a step out).

        Parameters
        ----------
        snapshot : dict of str to torch.Tensor
            From `buffers_snapshot`.
        keep : torch.Tensor
            (K,) bool, True where a job's current buffers are kept.
        """
        for key, b in self.buffers.items():
            view = keep.view((-1,) + (1,) * (b.dim() - 1))
            b.copy_(torch.where(view, b, snapshot[key]))

    @torch.no_grad()
    def unstack_into(self, k: int) -> None:
        """Copy job k's slice into its own modules (for its callback, scoring and record).

        Parameters
        ----------
        k : int
            The job.
        """
        joint = self.joints[k]
        for key, p in joint.named_parameters():
            p.copy_(self.params[key][k])
        for key, b in joint.named_buffers():
            b.copy_(self.buffers[key][k])

    @torch.no_grad()
    def load_params_from(self, k: int, name: str) -> None:
        """Job k's slice of module `name`'s parameters from its own module (after a re-init).

        Parameters
        ----------
        k : int
            The job.
        name : str
            The module's name.
        """
        for key, p in self.joints[k][name].named_parameters():
            self.params[f"{name}.{key}"][k].copy_(p)


class _Apply(nn.Module):
    """fn(template, x) as a module, so functional_call can swap the template's tensors."""

    def __init__(self, template: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.inner = template
        self.fn = fn

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> Any:
        return self.fn(self.inner, x, *extra)


class JobRNG:
    """Job k's global RNG streams (CPU, and the device's when it is a GPU) kept apart.

    For the random draws a solo fit makes from the global RNG after building its networks.

    Parameters
    ----------
    device : torch.device
        The training device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.states: list[tuple] = []

    def save(self) -> None:
        """Append the current global RNG state as the next job's state."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.states.append((torch.get_rng_state(), cuda))

    def run(self, k: int, fn: Callable[[], None]) -> None:
        """fn() with the global RNG in job k's state; job k's state advances, the others' do not.

        Parameters
        ----------
        k : int
            The job.
        fn : callable
            Called without arguments; the outer global RNG state is restored afterwards.
        """
        outer = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        cpu, cuda = self.states[k]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        try:
            fn()
            self.states[k] = (torch.get_rng_state(),
                              torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        finally:
            torch.set_rng_state(outer[0])
            if outer[1] is not None:
                torch.cuda.set_rng_state(outer[1], self.device)


class LockstepBatches:
    """Per-job shuffled minibatch indices for one epoch, served step by step for all jobs at once.

    Drawn as `iterate_minibatches` draws them (one randperm per job from its own generator).

    Parameters
    ----------
    sizes : sequence of int
        Each job's number of training images.
    batch_size : int
        Minibatch size.
    drop_last : bool
        Drop the last incomplete batch of every epoch.
    generators : sequence of torch.Generator
        Each job's shuffling generator.
    device : torch.device
        Where the indices go.

    Raises
    ------
    ValueError
        If the last incomplete batch is kept and the sizes differ (unless divisible by the batch size).
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, drop_last: bool, generators: Sequence[torch.Generator],
                 device: torch.device) -> None:
        self.batch_size = batch_size
        self.perms = [torch.randperm(n, generator=g, device=g.device).to(device) for n, g in zip(sizes, generators)]
        self.steps = [(n // batch_size if (drop_last and n >= batch_size) else -(-n // batch_size)) for n in sizes]
        if not drop_last and len(set(sizes)) > 1 and any(n % batch_size for n in sizes):
            # A last, smaller batch would fall on different steps for different jobs.
            raise ValueError("stacked jobs of a detector that keeps the last incomplete batch need training sets "
                             "of one size (or sizes divisible by the batch size)")
        if drop_last and len(set(sizes)) > 1 and any(n < batch_size for n in sizes):
            # A training set smaller than one batch is one smaller batch, of another size than the others'.
            raise ValueError("stacked jobs need training sets of at least one batch each, or of one size")

    def indices(self, step: int) -> tuple[list[torch.Tensor], np.ndarray]:
        """The jobs' minibatch indices at one step.

        Parameters
        ----------
        step : int
            0-based step of the epoch.

        Returns
        -------
        (indices, real) : tuple of (list of torch.Tensor, np.ndarray)
            Per-job indices (a placeholder batch for a job past its epoch end), and per job
            whether it has a real batch at this step.
        """
        out, real = [], np.zeros(len(self.perms), dtype=bool)
        for k, (perm, n_steps) in enumerate(zip(self.perms, self.steps)):
            s = step if step < n_steps else 0  # a job past its epoch end gets a placeholder batch
            real[k] = step < n_steps
            out.append(perm[s * self.batch_size:(s + 1) * self.batch_size])
        return out, real


class JobMonitor:
    """A DivergenceMonitor per job: the first step with a non-finite logged value, on the device.

    Parameters
    ----------
    k : int
        Number of jobs.
    device : torch.device
        The training device.
    """

    def __init__(self, k: int, device: torch.device) -> None:
        self.first_bad = torch.full((k,), -1, dtype=torch.long, device=device)

    def update(self, steps: torch.Tensor, values: torch.Tensor, active: torch.Tensor) -> None:
        """Record the current step of each active job whose values are non-finite (first time only).

        Parameters
        ----------
        steps : torch.Tensor
            (K,) each job's step count.
        values : torch.Tensor
            (K, V) the logged values.
        active : torch.Tensor
            (K,) bool, the jobs that stepped.
        """
        bad = ~values.detach().isfinite().all(dim=1) & active & (self.first_bad < 0)
        self.first_bad = torch.where(bad, steps, self.first_bad)

    def errors(self, epoch: int) -> list[Optional[DivergedError]]:
        """Per job, None or a DivergedError at `epoch` (syncs once).

        Parameters
        ----------
        epoch : int
            The epoch, reported in the errors.

        Returns
        -------
        list of Optional[DivergedError]
        """
        return [DivergedError(epoch=epoch, step=int(s)) if s >= 0 else None for s in self.first_bad.tolist()]


def check_stackable(detectors: Sequence[Any]) -> None:
    """Check that the detectors share their class and every hyperparameter but random_state.

    Parameters
    ----------
    detectors : sequence of Detector
        The jobs' detectors.

    Raises
    ------
    ValueError
        If the classes or hyperparameters differ.
    """
    first = detectors[0]
    ref = {k: v for k, v in first.get_params().items() if k != "random_state"}
    for det in detectors[1:]:
        if type(det) is not type(first):
            raise ValueError(f"stacked jobs must share a detector class, got {type(first).__name__} "
                             f"and {type(det).__name__}")
        params = {k: v for k, v in det.get_params().items() if k != "random_state"}
        if params != ref:
            raise ValueError("stacked jobs must share every hyperparameter but random_state")


def fit_stacked(detectors: Sequence[Any], Xs: Sequence[np.ndarray],
                callbacks: Optional[Sequence[Optional[EpochCallback]]] = None) -> list[Optional[DivergedError]]:
    """Train K detectors of one class together (see the module docstring). Each detector ends up
    fitted as after its own `fit` (unless it diverged); returns per job None or its DivergedError.

    Parameters
    ----------
    detectors : sequence of TorchDetector
        K unfitted detectors of one class with the same hyperparameters but random_state.
    Xs : sequence of np.ndarray
        Their training images, (N_k, C, H, W) floats in [0, 1] of one shape.
    callbacks : sequence of EpochCallback or None, optional
        Per-job epoch callbacks (as fit's epoch_callback).

    Returns
    -------
    list of Optional[DivergedError]
        Per job, None or its DivergedError.

    Raises
    ------
    ValueError
        If the counts differ, there is no detector, the detectors are not stackable, their class
        cannot train stacked, or the images differ in shape.
    """
    detectors = list(detectors)
    if len(detectors) != len(Xs) or not detectors:
        raise ValueError("fit_stacked needs one training set per detector, and at least one detector")
    check_stackable(detectors)
    if not supports_stacking(detectors[0]):
        raise ValueError(f"{type(detectors[0]).__name__} cannot be trained stacked")
    if any(getattr(det, "precision", "fp32") != "fp32" for det in detectors):
        # Measured on torch 2.14 (CPU): under vmap, bf16 autocast leaves some convolutions with fp32
        # weights and bf16 inputs (MemAE, Deep SVDD, Mem_GANomaly, f-AnoGAN fail), so bf16 trains alone.
        raise ValueError("stacked training (and --cuda-graphs) runs in fp32 only; bf16 jobs train alone")
    callbacks = list(callbacks) if callbacks is not None else [None] * len(detectors)
    xs = []
    rng: Optional[JobRNG] = None
    for det, X in zip(detectors, Xs):
        x = det._begin_fit(X)  # seeds the global RNG with the job's seed, as its solo fit
        det._build_networks(x)
        xs.append(x)
        rng = rng or JobRNG(det.device_)
        rng.save()  # the job's global RNG from here on (e.g. GANomaly's D re-inits)
    if len({tuple(x.shape[1:]) for x in xs}) != 1:
        raise ValueError("stacked jobs need training images of one shape")
    errors = type(detectors[0])._fit_stacked(detectors, xs, callbacks, rng)
    for det, error in zip(detectors, errors):
        if error is None:
            det._finish_fit()  # per-epoch facts into the log, eval mode, as a solo fit
        else:
            det.__dict__.pop("_facts_sample_", None)
    return errors


def graphed_step(detectors: Sequence[Any], step: Callable[..., Any], stage_name: str) -> Callable[..., Any]:
    """The step as it runs: captured in a CUDA graph when the jobs' detectors ask for it
    (`cuda_graphs`, the runner's --cuda-graphs), else as it is. The graph's statistics go to each
    detector's `graph_stats_[stage_name]` (one dict, updated as the steps run) for its record.

    Parameters
    ----------
    detectors : sequence of TorchDetector
        The jobs.
    step : callable
        step(*tensors) -> tensors, free of host synchronisation.
    stage_name : str
        The training stage the step belongs to.

    Returns
    -------
    callable
        The step, or its GraphedStep.
    """
    if not getattr(detectors[0], "cuda_graphs", False):
        return step
    graphed = GraphedStep(step, detectors[0].device_)
    for det in detectors:
        det.graph_stats_ = {**getattr(det, "graph_stats_", {}), stage_name: graphed.stats}
    return graphed


def train_stacked_stage(detectors: Sequence[Any], xs: Sequence[torch.Tensor],
                        callbacks: Sequence[Optional[EpochCallback]], stage: Any, stacked: StackedModules,
                        forward: Optional[Callable[..., tuple]], optimisers: Sequence[tuple[Any, list[torch.Tensor]]],
                        names: Sequence[str], end_epoch: Callable[[int, int, int, dict], None],
                        after_step: Optional[Callable[[np.ndarray, np.ndarray, int, list[torch.Tensor]], None]] = None,
                        begin_epoch: Optional[Callable[[int], None]] = None, *,
                        inputs: Optional[Callable[[np.ndarray, list[torch.Tensor]], Sequence[torch.Tensor]]] = None,
                        after_backward: Optional[Callable[[], None]] = None,
                        step: Optional[Callable[[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray],
                                                tuple[list[torch.Tensor], torch.Tensor]]] = None,
                        epoch_means: Optional[Callable[[int, torch.Tensor, int], list[float]]] = None,
                        ) -> list[Optional[DivergedError]]:
    """The stacked counterpart of `TorchDetector._train_stage`, for K jobs in lockstep.

    Per step: each job's minibatch (its own shuffling), `forward(modules, x_k, *inputs_k)` vmapped
    over the jobs -> (losses, logged values[, extra outputs]) with losses[i] of shape (K,) the loss
    of `optimisers[i]`; each loss's gradient into its own parameters; `after_backward()`; the
    optimisers step the active jobs only (BatchNorm buffers of idle jobs restored); this part is
    one function of device tensors, captured in a CUDA graph when the detectors ask for it;
    `after_step(active, steps, epoch, losses + extra outputs)`. A custom `step` replaces the
    forward / backward / optimiser part (multi-phase steps). After each epoch, per job that trained
    in it: divergence check, epoch means, its modules brought up to date (`unstack_into`),
    `end_epoch(k, epoch, steps_k, history_k)` (a DivergedError it raises ends that job alone), its
    `_end_epoch`.

    Parameters
    ----------
    detectors : sequence of TorchDetector
        The K jobs' detectors (after `_begin_fit` and `_build_networks`).
    xs : sequence of torch.Tensor
        Their preprocessed training sets, on the device.
    callbacks : sequence of EpochCallback or None
        Per-job epoch callbacks.
    stage : Stage
        The budget.
    stacked : StackedModules
        The jobs' modules, stacked.
    forward : callable or None
        forward(modules, x_k, *inputs_k) -> (losses, logged values) or (losses, logged values,
        extra outputs); None with a custom `step`.
    optimisers : sequence of (stacked optimiser, list of torch.Tensor)
        Each optimiser (`step(active)`) with the parameters its loss trains.
    names : sequence of str
        Names of the logged values, in order.
    end_epoch : callable
        end_epoch(k, epoch, steps_k, history_k), per job after each epoch.
    after_step : callable, optional
        after_step(active, steps, epoch, outputs), after each step; outputs are the detached
        losses then the forward's extra outputs (or a custom step's outputs).
    begin_epoch : callable, optional
        begin_epoch(epoch), before each epoch (lr schedules).
    inputs : callable, optional
        inputs(active, indices) -> further (K, ...) inputs of `forward` for this step (random
        draws made per job outside vmap), `indices` the jobs' minibatch indices.
    after_backward : callable, optional
        Called between the backward pass and the optimiser steps (gradient clipping).
    step : callable, optional
        step(x, active, active_t, steps) -> (outputs, logged values (K, V)): does the whole step
        (its own forward passes, backward passes and optimiser steps for `active`, each phase
        through `graphed_step` if it is to be captured); `x` (K, B, ...) the minibatches, `active_t`
        the mask on the device, `steps` each job's step count before this step.
    epoch_means : callable, optional
        epoch_means(k, sums_k, n_steps_k) -> job k's epoch means (default sums / steps).

    Returns
    -------
    list of Optional[DivergedError], one per job.
    """
    k_jobs = len(detectors)
    device = detectors[0].device_
    histories: list[dict] = [{} for _ in detectors]
    errors: list[Optional[DivergedError]] = [None] * k_jobs
    alive = np.ones(k_jobs, dtype=bool)
    steps = np.zeros(k_jobs, dtype=np.int64)  # on the host, for the loop's decisions ...
    steps_t = torch.zeros(k_jobs, dtype=torch.long, device=device)  # ... and on the device, for the monitor
    monitor = JobMonitor(k_jobs, device)
    cap = stage.max_steps if stage.max_steps is not None else np.iinfo(np.int64).max

    def one_step(x: torch.Tensor, active_t: torch.Tensor, *extra: torch.Tensor) -> tuple[list[torch.Tensor],
                                                                                           torch.Tensor]:
        # Forward, backward and the optimisers' updates: no host sync, so it can be graph-captured.
        with detectors[0]._autocast():
            out = stacked.call(forward, x, *extra)
            losses, values = out[0], out[1]
            for _, params in optimisers:
                for p in params:
                    p.grad = None
            for i, (loss, (_, params)) in enumerate(zip(losses, optimisers)):
                loss.sum().backward(inputs=params, retain_graph=i < len(optimisers) - 1)
        if after_backward is not None:
            after_backward()
        for optimiser, _ in optimisers:
            optimiser.step(active_t)
        extras = out[2] if len(out) > 2 else []
        return [loss.detach() for loss in losses] + [e.detach() for e in extras], values.detach()

    train_step = graphed_step(detectors, one_step, stage.name) if step is None else None
    epoch, epochs_run = stage.first_epoch - 1, 0
    while (stage.epochs is None or epochs_run < stage.epochs) and alive.any():
        epoch, epochs_run = epoch + 1, epochs_run + 1
        if begin_epoch is not None:
            begin_epoch(epoch)
        batches = LockstepBatches([len(x) for x in xs], stage.batch_size, stage.drop_last,
                                  [det.generator_ for det in detectors], device)
        in_epoch = alive.copy()
        sums: Optional[torch.Tensor] = None
        n_steps = np.zeros(k_jobs, dtype=np.int64)
        s = 0
        while True:
            idx, real = batches.indices(s)
            active = in_epoch & real & (steps < cap)
            if not active.any():
                break
            active_t = torch.from_numpy(active).to(device)
            snapshot = None if active.all() else stacked.buffers_snapshot()
            x = torch.stack([xs[k][idx[k]] for k in range(k_jobs)])
            if step is not None:
                outputs, values = step(x, active, active_t, steps.copy())
                values = values.detach()
            else:
                extra = inputs(active, idx) if inputs is not None else ()
                outputs, values = train_step(x, active_t, *extra)
            if snapshot is not None:
                stacked.restore_buffers(snapshot, active_t)
            steps += active
            steps_t += active_t
            n_steps += active
            monitor.update(steps_t, values, active_t)
            sums = torch.where(active_t[:, None], values, torch.zeros_like(values)) if sums is None else \
                torch.where(active_t[:, None], sums + values, sums)
            if after_step is not None:
                after_step(active, steps, epoch, outputs)
            s += 1
        epoch_errors = monitor.errors(epoch)
        for k in np.flatnonzero(in_epoch):
            det = detectors[k]
            if epoch_errors[k] is not None:
                errors[k], alive[k] = epoch_errors[k], False
                continue
            n_k = int(n_steps[k])
            means = epoch_means(k, sums[k], n_k) if epoch_means is not None else (sums[k] / n_k).tolist()
            for name, value in zip(names, means):
                histories[k].setdefault(name, []).append(value)
            stacked.unstack_into(k)
            try:
                end_epoch(k, epoch, int(steps[k]), histories[k])
            except DivergedError as exc:
                errors[k], alive[k] = exc, False
                continue
            if det.progress_callback is not None:
                det.progress_callback(stage.name, epochs_run, stage.planned_epochs(len(xs[k])))
            det._end_epoch(epoch, callbacks[k] if stage.epoch_callback else None)
            if steps[k] >= cap:
                alive[k] = False
    return errors
