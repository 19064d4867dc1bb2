"""CUDA-graph capture of a training step (the runner's `--cuda-graphs`).

A training step of this suite's detectors is small (64 images of 32 x 32), so on a GPU it waits on
Python and on hundreds of kernel launches rather than on arithmetic. `GraphedStep` records the
whole step once (forward, backward, optimiser update: `torch.cuda.CUDAGraph`) and replays it with
one launch afterwards, following PyTorch's whole-network capture recipe
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture):

* the first `warmup` calls run eagerly on a side stream (cuDNN autotuning, lazy initialisation and
  the gradient-accumulation streams settle there); they are real training steps;
* the next call is captured into static input and output tensors and then replayed, so it too is a
  real step; every later call copies its inputs into the static ones and replays;
* a call whose inputs differ in shape or dtype from the captured ones (the last, smaller batch of
  an epoch when a detector keeps it) runs eagerly instead.

What the captured function must respect (the engine's phase step, methods/engine/loop.py, does): no host
synchronisation and no CPU-side values that change between steps (step counts, learning rates,
masks are device tensors: `StackedAdam` / `StackedRMSprop` keep theirs on the device), random draws
made outside and passed in as inputs, parameters and buffers updated in place (never replaced),
and autocast without its weight cache (`cache_enabled=False`).

Not measured yet: no GPU was available when this was written. The tests that capture
(tests/test_graphs.py) skip without CUDA; on a CPU `fit_jobs` refuses the option with a usage error.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_map


class GraphedStep:
    """fn(*inputs) replayed from a CUDA graph after `warmup` eager calls (see the module docstring).

    Parameters
    ----------
    fn : callable
        fn(*tensors) -> a pytree of tensors (e.g. (list of losses, logged values)); the step.
    device : torch.device
        The CUDA device the step runs on.
    warmup : int
        Eager calls before the capture (default 3, as in PyTorch's recipe).

    Attributes
    ----------
    stats : dict
        "captured" (bool), "eager_steps" and "replayed_steps" (ints): how the steps ran, for the
        job's record.
    """

    def __init__(self, fn: Callable[..., Any], device: torch.device, warmup: int = 3) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.fn, self.device, self.warmup = fn, device, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_outputs: Any = None
        self.signature: Optional[tuple] = None
        self.stats = {"captured": False, "eager_steps": 0, "replayed_steps": 0}

    @staticmethod
    def _signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((tuple(t.shape), t.dtype) for t in inputs)

    def _eager(self, inputs: tuple[torch.Tensor, ...], side_stream: bool) -> Any:
        self.stats["eager_steps"] += 1
        if not side_stream:
            return self.fn(*inputs)
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            out = self.fn(*inputs)
        current.wait_stream(stream)
        return out

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """Run one step: eagerly while warming up, else by replaying the captured graph.

        Parameters
        ----------
        *inputs : torch.Tensor
            The step's inputs, on the device.

        Returns
        -------
        Any
            fn's outputs (copies of the static outputs after a replay, so the next replay cannot
            overwrite what the caller keeps).
        """
        if self.graph is None and self.stats["eager_steps"] < self.warmup:
            return self._eager(inputs, side_stream=True)
        if self.graph is None:
            self.signature = self._signature(inputs)
            self.static_inputs = [t.clone() for t in inputs]
            torch.cuda.synchronize(self.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_outputs = self.fn(*self.static_inputs)
            self.stats["captured"] = True
        if self._signature(inputs) != self.signature:
            return self._eager(inputs, side_stream=False)
        for static, new in zip(self.static_inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        self.stats["replayed_steps"] += 1
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.static_outputs)

