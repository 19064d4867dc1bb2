"""The modules of K jobs as one model: `StackedModules` (torch.func.stack_module_state, a vmapped
functional call, the way back to each job's own modules) and `SoloModules`, the same interface over
ONE job's own modules called directly (no vmap, no functional call: a solo fit's exact operations).

`in_vmap()` tells a detector's loss whether it runs vmapped (f-AnoGAN's gradient penalty takes its
input gradient with torch.func.grad there, with torch.autograd.grad otherwise).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

_VMAP_DEPTH = [0]
# The layers whose weights autocast runs in the lower precision (torch.autocast's op lists).
AUTOCAST_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                    nn.Linear)


def in_vmap() -> bool:
    """Whether the code runs inside `StackedModules.call` (a vmapped loss).

    Returns
    -------
    bool
    """
    return _VMAP_DEPTH[0] > 0


class SoloModules:
    """One job's modules, by detector attribute, called as they are (the K = 1 engine).

    Outputs get a leading job axis of size 1 (a view), so that the engine's hooks see (K, ...) for
    every K.

    Parameters
    ----------
    detector : TorchDetector
        The job's detector.
    names : sequence of str
        The detector attributes holding the stage's modules.
    """

    def __init__(self, detector: Any, names: Any) -> None:
        self.detector = detector
        self.names = list(names)
        self.view = detector  # the loss runs on the detector itself

    def group_params(self, name: str) -> list[torch.Tensor]:
        """The parameters of module `name`, in `parameters()` order."""
        return list(getattr(self.detector, name).parameters())

    def buffer(self, name: str, key: str) -> torch.Tensor:
        """Buffer `key` of module `name` with a leading job axis (a view: writes reach the module)."""
        return getattr(self.detector, name).get_buffer(key).unsqueeze(0)

    def unstack_into(self, k: int) -> None:
        """Nothing to copy: the job's modules are the trained ones."""

    def load_params_from(self, k: int, name: str) -> None:
        """Nothing to copy: the job's modules are the trained ones."""

    def buffers_snapshot(self) -> None:
        """Nothing to keep: one job is never idle while the engine steps."""
        return None

    def restore_buffers(self, snapshot: Any, keep: torch.Tensor) -> None:
        """Nothing to restore (see `buffers_snapshot`)."""


class StackedModules:
    """K jobs' modules (same architectures) as stacked parameters and buffers, called vmapped.

    Offers a vmapped functional forward, a view of the first detector whose module attributes are
    the structure-holding templates (the loss code runs on it), and a way back to each job's own
    modules.

    Parameters
    ----------
    detectors : list of TorchDetector
        The jobs' detectors.
    names : sequence of str
        The detector attributes holding the stage's modules (same architectures in every job).
    """

    def __init__(self, detectors: list[Any], names: Any) -> None:
        self.names = list(names)
        joints = [nn.ModuleDict({name: getattr(det, name) for name in self.names}) for det in detectors]
        self.template = copy.deepcopy(joints[0])  # holds the structure; its own tensors are not used
        self.params, self.buffers = stack_module_state(joints)
        self.joints = joints
        self.autocast_params = {f"{name}.{key}" for name, module in self.template.named_modules()
                                if isinstance(module, AUTOCAST_MODULES) for key, _ in module.named_parameters()}
        self.cast_inputs_to: Optional[torch.dtype] = None  # set during a call with weight_dtype
        for module in self.template.modules():
            if isinstance(module, AUTOCAST_MODULES):
                module.register_forward_pre_hook(self._cast_inputs)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                # vmap's batch norm wants one dtype: normalise in fp32, hand on bf16 (as a solo fit's
                # mixed-dtype batch norm under autocast outputs).
                module.register_forward_pre_hook(self._inputs_to_float)
                module.register_forward_hook(self._output_to_cast)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.register_forward_pre_hook(self._inputs_to_float)  # autocast's fp32 ops: fp32 out
        self.view = copy.copy(detectors[0])  # the detector's own loss code, on the template modules
        for name in self.names:
            setattr(self.view, name, self.template[name])

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

    def call(self, fn: Callable[..., Any], x: torch.Tensor, *extra: torch.Tensor,
             context: Callable[[], Any] = contextlib.nullcontext, weight_dtype: Optional[torch.dtype] = None) -> Any:
        """vmap over jobs of fn(x[k], *(e[k] for e in extra)) with the template modules (`view`)
        carrying job k's parameters and buffers.

        BatchNorm in train mode updates job k's slice of the stacked running statistics.

        Parameters
        ----------
        fn : callable
            fn(x_k, *extra_k) -> outputs, calling the template modules.
        x : torch.Tensor
            (K, B, ...) the jobs' inputs.
        *extra : torch.Tensor
            (K, ...) further per-job inputs (e.g. random draws made outside vmap).
        context : callable
            A context manager factory entered inside the vmapped function (the autocast).
        weight_dtype : torch.dtype or None
            Cast the weights and biases of the convolutions and linear layers to this dtype first (a
            differentiable cast: the gradients reach the fp32 parameters), as autocast casts them
            for a solo fit; under vmap autocast misses some (methods/engine/fit.py's docstring).

        Returns
        -------
        Any
            fn's outputs stacked over jobs along a leading axis.
        """
        wrapper = _Apply(self.template, fn)
        params = {f"inner.{k}": v.to(weight_dtype) if weight_dtype is not None and k in self.autocast_params else v
                  for k, v in self.params.items()}
        buffers = {f"inner.{k}": v for k, v in self.buffers.items()}

        def one(p: dict, b: dict, xk: torch.Tensor, *ek: torch.Tensor) -> Any:
            with context():  # autocast entered inside vmap (see methods/engine/fit.py's docstring)
                return functional_call(wrapper, {**p, **b}, (xk, *ek))

        _VMAP_DEPTH[0] += 1
        self.cast_inputs_to = weight_dtype
        try:
            return vmap(one, randomness="error")(params, buffers, x, *extra)
        finally:
            _VMAP_DEPTH[0] -= 1
            self.cast_inputs_to = None

    def _cast_inputs(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        """A convolution's or linear layer's floating inputs in `cast_inputs_to` (what autocast does
        for it in a solo fit), during a call with `weight_dtype`."""
        if self.cast_inputs_to is None:
            return None
        return tuple(a.to(self.cast_inputs_to) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)

    def _inputs_to_float(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if self.cast_inputs_to is None:
            return None
        return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def _output_to_cast(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.cast_inputs_to is None else output.to(self.cast_inputs_to)

    def buffer(self, name: str, key: str) -> torch.Tensor:
        """The stacked buffer `key` of module `name`, (K, ...)."""
        return self.buffers[f"{name}.{key}"]

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
    """fn(x) as a module holding the template, so functional_call can swap the template's tensors."""

    def __init__(self, template: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.inner = template
        self.fn = fn

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> Any:
        return self.fn(x, *extra)


