"""Speed benchmark of the registered detectors (a benchmark script, not a test).

    python -m benchmark.speed [--methods ganomaly mem_ganomaly] [--device cpu] [--threads 2]
                              [--variants fp32-nchw fp32-cl bf16-nchw bf16-cl]

For every method in `methods.REGISTRY` (or --methods) it builds the detector from its `quick`
settings for CIFAR-10 (32 x 32 x 3 input) with `batch_size` 64 and every training stage run for
exactly --steps optimiser steps (each stage's own step-cap and epoch arguments, as its `Stage`
names them: nothing guessed from argument names), and on synthetic 32 x 32 x 3 images in [0, 1]
measures, on the current device:

* per speed variant (--variants, default all four), for every deep (torch) detector, side by side:
  fp32-nchw, fp32-cl, bf16-nchw, bf16-cl. The precision is the fit's `TrainOptions.precision`
  ("bf16": each training step under torch.autocast(bfloat16), methods/engine/loop.py);
  the layout its `memory_format` ("nchw" or "channels_last": the networks' 4-D
  weights and the image batches in that layout, training and scoring). Each variant is timed
  solo (one job, no stacking), after a 1-step warm-up fit of the same variant:
  - training images/second: (optimiser steps x batch, over all stages) / the wall time of fit();
  - scoring images/second: decision_function() on --n-score images with the method's own score
    batch size, and (`score@64`) with `score_batch_size=64` where the method has that argument.
    The bf16 variants score under torch.autocast(bfloat16) put around decision_function() by this
    script (the training precision leaves the detectors' own scoring in fp32);
  a non-torch detector (iForest) gets one row (variant n/a);
* stacked training images/second at K = 1, 4, 10 (--stack): K jobs trained as one batched model
  (methods/engine/, `fit_jobs`), for the detectors that support it, fp32 in the detector's default
  layout (its `default_memory_format`), shown on the row of that variant; K x images / wall time;
  each deep detector's notes name its default variant (what `--precision auto` and the default layout
  train it in on this device: `TorchDetector.resolve_train_options`);
* on a GPU, the same stacked fits with every training step replayed from a CUDA graph
  (methods/engine/graphs.py; the capture and its 3 eager warm-up steps are inside the timed fit);
* the extrapolated wall time of the whole paper profile for the method (3 datasets x 10
  classes, one seed, jobs one after the other, default precision and layout) on this device,
  from benchmark/estimate.py's calibration of the paper settings and the datasets' nominal sizes;
* FLOPs per training image, counted with torch.utils.flop_counter.FlopCounterMode over a
  1-epoch fit (matmuls and convolutions, forward and backward; the same count for every
  variant), and the achieved GFLOP/s against the measured peak of the variant's precision.

The peak, per precision (fp32 and bf16), is the best of several large kernels timed here, each
the best of --repeats runs after one untimed call: square torch.mm products (on the CPU n = 2048
and 4096 in fp32, n = 2048, 4096 and 8192 in bf16; on a GPU n = 4096 and 8192, bf16 also 16384)
and one 3 x 3 conv2d forward (batch 64, 256 -> 256 channels, 32 x 32, padding 1: 77 GFLOP; on a
GPU batch 256 at 64 x 64) in NCHW and in channels_last, all on tensors of that dtype (PEAK_SIZES).
FLOPs: 2 n^3 for a product, 2 x output elements x input channels x kernel area for the
convolution. Every measurement is printed beside the peak, and a detector that achieves more
than its precision's peak is flagged (the peak's sizes did not saturate the machine).

When anomalib is importable, its GANomaly is timed in the same run at its default precision
(fp32) and at Lightning's "bf16-mixed" setting (what Lightning does on the CPU: every step under
torch.autocast(bfloat16, cache_enabled=False)): its Lightning module's own training_step (G and
D updates, with its optimisers, at batch 64, 32 x 32 x 3) and its scoring (the torch model in
eval mode under inference_mode, at batch 1024 and 64). Data loading and Lightning's loop are
left out, which favours anomalib. At the end GANomaly's training and scoring ratios, per
variant, against anomalib's default row (the issue's goal: 3x training, 2x scoring; scoring
against anomalib's faster batch) and against anomalib bf16-mixed. anomalib is not a dependency
of this project: install it in a separate environment that sees this one's torch, e.g.
`python -m venv --system-site-packages VENV && VENV/bin/pip install anomalib`, and run this
script with VENV/bin/python. Without anomalib the issue's reference figures are printed,
labelled as quoted, not measured.

Every time is the best of --repeats runs (default 3), the one least disturbed by other work;
run it with --threads 2 on an otherwise idle machine (check `uptime`).
A method whose module does not import (or cannot be built) is reported as unavailable, and a
variant that fails as failed.
"""
from __future__ import annotations

import argparse
import inspect
import math
import time
import types
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmark.estimate import calibrate, format_seconds
from methods import REGISTRY, get_method
from methods.base import TrainOptions, supports_stacking
from methods.engine import fit_jobs
from methods.torch_base import TorchDetector, resolve_device

BATCH = 64
# anomalib GANomaly on this project's 2-core CPU machine type, from the issue: quoted, not measured.
ANOMALIB_QUOTED = {"train_img_s": 175.0, "peak_fraction": 0.83, "peak_gflops": 170.0, "score_img_s": 830.0}
# --variants: name -> (TrainOptions' `precision`, its `memory_format`), timed solo.
VARIANTS: dict[str, tuple[str, str]] = {
    "fp32-nchw": ("fp32", "nchw"), "fp32-cl": ("fp32", "channels_last"),
    "bf16-nchw": ("bf16", "nchw"), "bf16-cl": ("bf16", "channels_last"),
}
# The peak's kernels per device type: square torch.mm sizes n per precision, and one conv2d
# (batch, channels in = out, height = width, kernel size) timed in NCHW and in channels_last.
PEAK_SIZES: dict[str, dict] = {
    "cpu": {"mm": {"fp32": (2048, 4096), "bf16": (2048, 4096, 8192)}, "conv": (64, 256, 32, 3)},
    "cuda": {"mm": {"fp32": (4096, 8192), "bf16": (4096, 8192, 16384)}, "conv": (256, 256, 64, 3)},
}


def synchronize(device: torch.device) -> None:
    """Wait for the device's pending work (CUDA only; a no-op elsewhere).

    Parameters
    ----------
    device : torch.device
        The device.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gflops(device: torch.device, precision: str, repeats: int = 3, sizes: Optional[dict] = None) -> dict:
    """The peak of one precision: GFLOP/s of big torch.mm products and a big conv2d (NCHW and
    channels_last) on tensors of that dtype, each the best of `repeats` runs after one untimed call.

    Parameters
    ----------
    device : torch.device
        The device.
    precision : str
        "fp32" or "bf16".
    repeats : int, default=3
        Timed runs per kernel.
    sizes : dict, optional
        {"mm": {precision: (n, ...)}, "conv": (batch, channels, size, kernel)} (default: PEAK_SIZES
        of the device type).

    Returns
    -------
    dict of str to float
        GFLOP/s by kernel ("mm N", "conv NCHW", "conv channels_last"); the peak is the largest.
    """
    sizes = sizes or PEAK_SIZES["cuda" if device.type == "cuda" else "cpu"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    figures = {f"mm {n}": _mm_gflops(n, dtype, device, repeats) for n in sizes["mm"][precision]}
    for name, layout in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        figures[f"conv {name}"] = _conv_gflops(sizes["conv"], layout, dtype, device, repeats)
    return figures


def _mm_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """GFLOP/s of torch.mm on two n x n matrices (2 n^3 FLOPs), best of `repeats` after one untimed call."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    return 2 * n ** 3 / timed(lambda: torch.mm(a, b), device, repeats) / 1e9


def _conv_gflops(shape: tuple[int, int, int, int], layout: torch.memory_format, dtype: torch.dtype,
                 device: torch.device, repeats: int) -> float:
    """GFLOP/s of a conv2d forward, shape = (batch, channels in = out, height = width, kernel), padding
    kernel // 2, input and weight in `layout` (2 x output elements x input channels x kernel area FLOPs)."""
    batch, channels, size, kernel = shape
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(channels, channels, kernel, kernel, device=device, dtype=dtype).contiguous(memory_format=layout)
    flops = 2 * F.conv2d(x, w, padding=kernel // 2).numel() * channels * kernel * kernel
    return flops / timed(lambda: F.conv2d(x, w, padding=kernel // 2), device, repeats) / 1e9


class _PlainFlopCounter(TorchDispatchMode):
    """FlopCounterMode's per-op formulas without its module tracking, whose hooks break
    autograd.grad(create_graph=True) (a WGAN-GP gradient penalty): the same totals."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.registry = FlopCounterMode().flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in self.registry:
            self.total += self.registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of fn() (matmuls and convolutions, forward and backward) by FlopCounterMode.

    Parameters
    ----------
    fn : callable
        Called once without arguments.

    Returns
    -------
    int
        The FLOP count.
    """
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()
    except RuntimeError:
        with _PlainFlopCounter() as counter:
            fn()
        return counter.total


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """The best wall time of `repeats` calls (the least disturbed by other work on the machine).

    Parameters
    ----------
    fn : callable
        Called without arguments.
    device : torch.device
        The device, synchronised around each call.
    repeats : int, default=1
        Number of calls.

    Returns
    -------
    float
        Seconds.
    """
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


# Nominal task sizes of one class, paper protocol: (training images, test images, image shape).
NOMINAL = {"mnist": (6000, 64000, (1, 28, 28)), "fashion_mnist": (6000, 64000, (1, 28, 28)),
           "cifar10": (5000, 55000, (3, 32, 32))}


def build(name: str, device: str, steps: int, n_train: int, random_state: int = 0,
          variant: Optional[str] = None) -> tuple[Any, dict]:
    """The method's quick CIFAR-10 settings at batch 64, every stage run for `steps` steps.

    Parameters
    ----------
    name : str
        Registry name of the method.
    device : str
        Torch device.
    steps : int
        Optimiser steps of every training stage.
    n_train : int
        Number of training images.
    random_state : int, default=0
        Seed.
    variant : str, optional
        Unused (the variant's precision and memory format reach training as `variant_options`); kept so
        callers name the variant they build for.

    Returns
    -------
    detector : Any
        The detector, not fitted.
    overrides : dict
        The overrides applied to the quick settings.
    """
    spec = get_method(name)
    cls = spec.load()
    settings = spec.settings("quick", "cifar10")
    accepted = inspect.signature(cls).parameters
    overrides: dict = {"batch_size": BATCH} if "batch_size" in accepted else {}
    probe = cls(**{**settings, **overrides})
    for stage in getattr(probe, "_stages", lambda n: [])(n_train):
        overrides[stage.max_steps_param] = steps
        if stage.epochs_param is not None:
            overrides[stage.epochs_param] = steps  # >= 1 step per epoch: the cap ends the stage
    for key, value in (("device", device), ("random_state", random_state)):
        if key in accepted:
            overrides[key] = value
    detector = cls(**{**settings, **overrides})
    return detector, overrides


def variant_options(variant: Optional[str]) -> TrainOptions:
    """The training options of a VARIANTS name (None: the defaults).

    Parameters
    ----------
    variant : str or None
        A VARIANTS name.

    Returns
    -------
    TrainOptions
    """
    if variant is None:
        return TrainOptions()
    precision, layout = VARIANTS[variant]
    return TrainOptions(precision=precision, memory_format=layout)


def fit_with(detector: Any, X: np.ndarray, options: TrainOptions) -> None:
    """Fit one detector: a torch detector through the engine with `options`, another as it fits.

    Parameters
    ----------
    detector : Any
        The detector.
    X : np.ndarray
        Training images.
    options : TrainOptions
        The training options (torch detectors only).
    """
    if not isinstance(detector, TorchDetector):
        detector.fit(X)
        return
    (error,) = fit_jobs([detector], [X], options=options)
    if error is not None:
        raise error


def trained_images(detector: Any, n_train: int) -> int:
    """Images seen by fit's optimiser steps (all stages).

    Parameters
    ----------
    detector : Any
        The detector.
    n_train : int
        Number of training images.

    Returns
    -------
    int
        The images seen; n_train for detectors without stages.
    """
    if not hasattr(detector, "_stages"):
        return n_train
    return sum(stage.planned_steps(n_train) * stage.batch_size for stage in detector._stages(n_train))


def paper_profile_seconds(name: str, device: str, steps: int) -> float:
    """Expected seconds of the method's paper profile (3 datasets x 10 classes, one seed) here.

    Parameters
    ----------
    name : str
        Registry name of the method.
    device : str
        Torch device.
    steps : int
        Training steps timed per stage in the calibration.

    Returns
    -------
    float
        Seconds.
    """
    spec = get_method(name)
    total = 0.0
    for dataset, (n_train, n_test, shape) in NOMINAL.items():
        params = {**spec.settings("paper", dataset)}
        accepted = inspect.signature(spec.load()).parameters
        if "device" in accepted:
            params["device"] = device
        cal = calibrate(spec.target, params, shape, steps)
        if cal["kind"] == "linear":
            job = cal["fit_seconds_per_image"] * n_train + cal["score_seconds_per_image"] * n_test
        else:
            planned = spec.load()(**params).planned_steps(n_train)
            job = (sum(n * cal["step_seconds"].get(stage, 0.0) for stage, n in planned.items())
                   + cal["score_seconds_per_image"] * n_test + cal["overhead_seconds"])
        total += 10 * job
    return total


def default_variant(detector: Any) -> str:
    """The VARIANTS name a fitted torch detector trained in with the default options (precision "auto"
    and its own layout, resolved on its device), e.g. "bf16-cl"."""
    options = detector.train_options_
    return f"{options.precision}-{'cl' if options.memory_format == 'channels_last' else 'nchw'}"

def scoring_context(device: torch.device, precision: Optional[str]) -> Any:
    """The scoring context of a variant: torch.autocast(bfloat16) for bf16, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def bench_variant(name: str, variant: Optional[str], args: argparse.Namespace, device: torch.device,
                  x_train: np.ndarray, x_score: np.ndarray) -> dict:
    """One variant of one method, solo: training and scoring images/second.

    Parameters
    ----------
    name : str
        Registry name of the method.
    variant : str or None
        A VARIANTS name (None: the detector as built, for non-torch detectors).
    args : argparse.Namespace
        The command line (n_score, steps, repeats, device).
    device : torch.device
        The device.
    x_train, x_score : np.ndarray
        The synthetic training and scoring images.

    Returns
    -------
    dict
        precision, memory_format, fit_s, train_img_s, score_img_s, score64_img_s (where the method
        has `score_batch_size`), overrides, score_batch.
    """
    precision, layout = VARIANTS[variant] if variant is not None else (None, None)
    # Warm-up of this variant (allocator, oneDNN primitives of this layout and dtype, lazy CUDA init).
    options = variant_options(variant)
    fit_with(build(name, args.device, 1, len(x_train), variant=variant)[0], x_train, options)
    detector, overrides = build(name, args.device, args.steps, len(x_train), variant=variant)
    fit_s = timed(lambda: fit_with(detector, x_train, options), device, args.repeats)

    def score_rate() -> float:
        def run() -> None:
            with scoring_context(device, precision):
                detector.decision_function(x_score)
        with scoring_context(device, precision):
            detector.decision_function(x_score[:2 * getattr(detector, "score_batch_size", BATCH)])
        return len(x_score) / timed(run, device, args.repeats)

    result = {"precision": precision, "memory_format": layout, "fit_s": fit_s,
              "train_img_s": trained_images(detector, len(x_train)) / fit_s, "score_img_s": score_rate(),
              "overrides": overrides, "score_batch": getattr(detector, "score_batch_size", None)}
    if "score_batch_size" in detector.get_params():
        detector.set_params(score_batch_size=BATCH)
        result["score64_img_s"] = score_rate()
    return result


def bench_method(name: str, args: argparse.Namespace, device: torch.device, rng: np.random.Generator) -> dict:
    """Measure one method's speed variants, stacked training, FLOPs and paper-profile time.

    Parameters
    ----------
    name : str
        Registry name of the method.
    args : argparse.Namespace
        The command line (n_train, n_score, steps, repeats, stack, variants, paper, device).
    device : torch.device
        The device.
    rng : numpy.random.Generator
        Source of the random images.

    Returns
    -------
    dict
        "variants": {variant name ("n/a" for a non-torch detector): bench_variant's dict, or
        {"error": message}}; GFLOP per training and scoring image; "default_variant" (e.g. "bf16-cl"),
        "default_layout" ("nchw" / "cl");
        stacked (and on a GPU graphed) images/second by K; "paper_s" with --paper.
    """
    x_train = rng.random((args.n_train, 3, 32, 32), dtype=np.float32)
    x_score = rng.random((args.n_score, 3, 32, 32), dtype=np.float32)
    # A short fit at the defaults for the FLOPs (the same count for every variant).
    warm, _ = build(name, args.device, 1, args.n_train)
    flop_images = x_train[:4 * BATCH]
    train_flops = count_flops(lambda: warm.fit(flop_images))
    score_flops = count_flops(lambda: warm.decision_function(x_score[:BATCH]))
    deep = isinstance(warm, TorchDetector)
    result: dict = {
        "deep": deep, "variants": {},
        "default_variant": default_variant(warm) if deep else None,
        "default_layout": default_variant(warm).split("-")[1] if deep else None,
        "train_gflop_per_img": train_flops / trained_images(warm, len(flop_images)) / 1e9,
        "score_gflop_per_img": score_flops / BATCH / 1e9,
        "stacked_img_s": {},
    }
    for variant in (args.variants if deep else [None]):
        try:
            result["variants"][variant or "n/a"] = bench_variant(name, variant, args, device, x_train, x_score)
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other variants
            result["variants"][variant or "n/a"] = {"error": f"{type(exc).__name__}: {exc}"}
    detector, _ = build(name, args.device, args.steps, args.n_train)
    images = trained_images(detector, args.n_train)
    if supports_stacking(detector):  # fp32 and the detector's default layout (the stacked engine's)
        graph_modes = (False, True) if device.type == "cuda" else (False,)
        result["graphed_img_s"] = {}
        for graphs in graph_modes:
            for k in args.stack:
                dets = [build(name, args.device, args.steps, args.n_train, random_state=s)[0] for s in range(k)]
                options = TrainOptions(precision="fp32", cuda_graphs=graphs)
                seconds = timed(lambda: fit_jobs(dets, [x_train] * k, options=options), device, args.repeats)
                result["graphed_img_s" if graphs else "stacked_img_s"][k] = k * images / seconds
    if args.paper:
        result["paper_s"] = paper_profile_seconds(name, args.device, args.calibration_steps)
    return result


ANOMALIB_VARIANTS = {"fp32": "fp32", "bf16-mixed": "bf16"}  # anomalib row name -> precision


def bench_anomalib(args: argparse.Namespace, device: torch.device, rng: np.random.Generator,
                   precision: str = "fp32") -> Optional[dict]:
    """anomalib's GANomaly: its own training_step and its torch model's scoring.

    Parameters
    ----------
    args : argparse.Namespace
        The command line.
    device : torch.device
        The device.
    rng : numpy.random.Generator
        Source of the random images.
    precision : str, default="fp32"
        "fp32" (anomalib's default) or "bf16": Lightning's "bf16-mixed", i.e. every training step
        and every scoring batch under torch.autocast(bfloat16, cache_enabled=False), as Lightning's
        MixedPrecision plugin runs them.

    Returns
    -------
    dict or None
        train_img_s, score_img_s (batch 64), score_big_img_s (batch 1024), GFLOP per training and
        scoring image, version; None if anomalib is not importable (the reason is printed).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import anomalib
            from anomalib.models import Ganomaly
            from anomalib.pre_processing import PreProcessor
            from torchvision.transforms.v2 import Resize
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"anomalib not importable ({type(exc).__name__}: {exc})")
        return None

    def context() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)

    torch.manual_seed(0)
    module = Ganomaly(batch_size=BATCH, pre_processor=PreProcessor(transform=Resize((32, 32))),
                      post_processor=False, evaluator=False, visualizer=False).to(device)
    d_opt, g_opt = module.configure_optimizers()
    # Stand-ins for the Lightning trainer's plumbing that training_step calls.
    module.optimizers = lambda *a, **k: (d_opt, g_opt)
    module.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)
    module.log_dict = lambda *a, **k: None
    module.train()
    images = torch.from_numpy(rng.random((args.n_train, 3, 32, 32), dtype=np.float32)).to(device) * 2 - 1
    batches = [types.SimpleNamespace(image=images[i:i + BATCH]) for i in range(0, args.n_train - BATCH + 1, BATCH)]

    def step(i: int) -> None:
        with context():
            module.training_step(batches[i % len(batches)], i)

    for i in range(2):
        step(i)
    train_flops = count_flops(lambda: step(0))

    def train() -> None:
        for i in range(args.steps):
            step(i)

    train_s = timed(train, device, args.repeats)
    model = module.model.eval()
    x_score = torch.from_numpy(rng.random((args.n_score, 3, 32, 32), dtype=np.float32)).to(device) * 2 - 1

    def score(batch_size: int) -> float:
        def run() -> None:
            with torch.inference_mode(), context():
                for i in range(0, len(x_score), batch_size):
                    model(x_score[i:i + batch_size]).pred_score.cpu()
        run()
        return len(x_score) / timed(run, device, args.repeats)

    with torch.inference_mode(), context():
        score_flops = count_flops(lambda: model(x_score[:BATCH]))
    return {"train_img_s": args.steps * BATCH / train_s, "score_img_s": score(BATCH),
            "score_big_img_s": score(1024), "train_gflop_per_img": train_flops / BATCH / 1e9,
            "score_gflop_per_img": score_flops / BATCH / 1e9, "precision": precision,
            "version": getattr(anomalib, "__version__", "?")}


def _fraction(gflops: float, peak: float) -> str:
    return f"{100 * gflops / peak:>7.0f}%" if peak > 0 and math.isfinite(gflops) else f"{'n/a':>8}"


def main(argv: Optional[list[str]] = None) -> None:
    """Run the throughput benchmark and print its numbers.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default: sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(REGISTRY), help="registry names (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=20,
                        help="optimiser steps of every training stage in the timed fit")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="precision and layout variants timed solo for the deep detectors (default: all)")
    parser.add_argument("--stack", type=int, nargs="*", default=[1, 4, 10],
                        help="stack sizes K to time (default 1 4 10; none: no stacked fits)")
    parser.add_argument("--no-paper", dest="paper", action="store_false",
                        help="skip the extrapolated paper-profile time (it calibrates the paper settings)")
    parser.add_argument("--calibration-steps", type=int, default=3, help="steps per stage of that calibration")
    parser.add_argument("--n-train", type=int, default=1024, help="synthetic training images")
    parser.add_argument("--n-score", type=int, default=4096, help="synthetic images to score")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best counts")
    parser.add_argument("--no-anomalib", action="store_true", help="skip the anomalib comparison")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    peak_parts = {precision: peak_gflops(device, precision, args.repeats) for precision in ("fp32", "bf16")}
    peaks = {precision: max(parts.values()) for precision, parts in peak_parts.items()}
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for precision, parts in peak_parts.items():
        print(f"{precision} peak {peaks[precision]:.1f} GFLOP/s, the best of: "
              + ", ".join(f"{kernel} {gflops:.1f}" for kernel, gflops in parts.items()))
    print(f"synthetic 32x32x3 data: {args.n_train} training images, {args.steps} steps per stage at batch {BATCH}, "
          f"{args.n_score} images scored; variants timed solo ({', '.join(args.variants)}; bf16 scoring under "
          f"autocast); K columns: stacked fits, fp32 in the detector's default layout, on that variant's row; "
          f"CUDA graphs (the G columns: stacked fits with each step replayed from a graph, capture and 3 warm-up "
          f"steps included): {'timed' if device.type == 'cuda' else 'CUDA only, n/a here'}")
    graph_stack = args.stack if device.type == "cuda" else []
    stack_cols = "".join(f"{'K=' + str(k) + ' img/s':>12}" for k in args.stack)
    stack_cols += "".join(f"{'G K=' + str(k):>12}" for k in graph_stack)
    no_stack = f"{'-':>12}" * (len(args.stack) + len(graph_stack))
    header = (f"{'method':<18}{'variant':<11}{'train img/s':>12}{stack_cols}{'score img/s':>12}{'score@64':>10}"
              f"{'GFLOP/img':>11}{'GFLOP/s':>9}{'% peak':>8}{'paper prof.':>12}  notes")
    rows, results, over_peak = [], {}, []
    for name in args.methods:
        rng = np.random.default_rng(0)
        try:
            get_method(name).load()
        except (ImportError, AttributeError, KeyError) as exc:
            rows.append(f"{name:<18}unavailable ({type(exc).__name__}: {exc})")
            continue
        try:
            res = bench_method(name, args, device, rng)
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other methods
            rows.append(f"{name:<18}failed ({type(exc).__name__}: {exc})")
            continue
        results[name] = res
        stack_variant = f"fp32-{res['default_layout']}"
        if stack_variant not in res["variants"]:
            stack_variant = next(iter(res["variants"]))
        for i, (variant, var) in enumerate(res["variants"].items()):
            if "error" in var:
                rows.append(f"{name:<18}{variant:<11}failed ({var['error']})")
                continue
            score64 = f"{var['score64_img_s']:>10.0f}" if "score64_img_s" in var else f"{'-':>10}"
            if res["train_gflop_per_img"]:
                achieved = res["train_gflop_per_img"] * var["train_img_s"]
                peak = peaks[var["precision"] or "fp32"]
                flops = f"{res['train_gflop_per_img']:>11.3f}{achieved:>9.1f}{_fraction(achieved, peak)}"
                if achieved > peak:
                    over_peak.append(f"{name} {variant}")
            else:  # no torch matmuls or convolutions (e.g. iForest through scikit-learn)
                flops = f"{'n/a':>11}{'n/a':>9}{'n/a':>8}"
            stacked = no_stack
            if variant == stack_variant and res["stacked_img_s"]:
                stacked = "".join(f"{res['stacked_img_s'][k]:>12.1f}" if k in res["stacked_img_s"] else f"{'-':>12}"
                                  for k in args.stack)
                graphed = res.get("graphed_img_s", {})
                stacked += "".join(f"{graphed[k]:>12.1f}" if k in graphed else f"{'-':>12}" for k in graph_stack)
            paper = f"{format_seconds(res['paper_s']):>12}" if i == 0 and "paper_s" in res else f"{'-':>12}"
            notes = f"fit {var['fit_s']:.1f} s"
            if i == 0:
                if var["score_batch"] is not None:
                    notes += f", score batch {var['score_batch']}"
                if res["default_variant"] is not None:
                    notes += f", default {res['default_variant']}"
                notes += f", {var['overrides']}"
            rows.append(f"{name:<18}{variant:<11}{var['train_img_s']:>12.1f}{stacked}{var['score_img_s']:>12.0f}"
                        f"{score64}{flops}{paper}  {notes}")
    anomalib: dict[str, dict] = {}
    if not args.no_anomalib and "ganomaly" in results:
        for row_name, precision in ANOMALIB_VARIANTS.items():
            measured = bench_anomalib(args, device, np.random.default_rng(0), precision)
            if measured is None:
                break
            anomalib[row_name] = measured
    for row_name, ano in anomalib.items():
        achieved = ano["train_gflop_per_img"] * ano["train_img_s"]
        if achieved > peaks[ano["precision"]]:
            over_peak.append(f"anomalib GANomaly {row_name}")
        rows.append(f"{'anomalib GANomaly':<18}{row_name:<11}{ano['train_img_s']:>12.1f}{no_stack}"
                    f"{ano['score_big_img_s']:>12.0f}{ano['score_img_s']:>10.0f}{ano['train_gflop_per_img']:>11.3f}"
                    f"{achieved:>9.1f}{_fraction(achieved, peaks[ano['precision']])}{'-':>12}  "
                    f"anomalib {ano['version']}, measured: training_step at batch 64; scoring at batch 1024 / 64")
    print(header)
    print("\n".join(rows))
    if over_peak:
        print(f"NOTE: above the measured peak of their precision: {', '.join(over_peak)} (the peak's kernels "
              f"did not saturate this machine; the % peak column is then an upper bound)")
    paper = [res["paper_s"] for res in results.values() if "paper_s" in res]
    if paper:
        print(f"paper profile of the methods above (3 datasets x 10 classes, one seed, one job at a time) on this "
              f"device: about {format_seconds(sum(paper))} (benchmark/estimate.py's calibration; nominal sizes)")
    print_ratios(results, anomalib, args.no_anomalib)


def print_ratios(results: dict, anomalib: dict, no_anomalib: bool) -> None:
    """Print GANomaly's ratios against anomalib (measured rows, else the quoted figures) and
    Mem_GANomaly's training throughput against GANomaly's, per variant.

    Parameters
    ----------
    results : dict
        bench_method's results by method name.
    anomalib : dict
        bench_anomalib's results by row name ("fp32", "bf16-mixed"); empty when not measured.
    no_anomalib : bool
        --no-anomalib (then no anomalib line at all).
    """
    gan, mem = results.get("ganomaly"), results.get("mem_ganomaly")
    if gan is None:
        return
    ours = {variant: var for variant, var in gan["variants"].items() if "error" not in var}
    if anomalib:
        fp32 = anomalib.get("fp32")
        if fp32 is not None:
            print(f"FLOPs per training image, GANomaly / anomalib: "
                  f"{gan['train_gflop_per_img'] / fp32['train_gflop_per_img']:.2f}x")
        for row_name, ano in anomalib.items():
            scores = {64: ano["score_img_s"], 1024: ano["score_big_img_s"]}
            best_batch = max(scores, key=scores.get)
            other_batch = 1024 if best_batch == 64 else 64
            goal = row_name == "fp32"
            print(f"GANomaly / anomalib GANomaly {row_name} (measured, same run; scoring against anomalib's faster "
                  f"batch, {best_batch}){'; goal 3x training, 2x scoring' if goal else ''}:")
            for variant, var in ours.items():
                train, score = var["train_img_s"] / ano["train_img_s"], var["score_img_s"] / scores[best_batch]
                verdict = f"  goal {'met' if train >= 3 and score >= 2 else 'not met'}" if goal else ""
                print(f"  GANomaly {variant:<10} training {train:5.2f}x, scoring {score:5.2f}x "
                      f"({var['score_img_s'] / scores[other_batch]:.2f}x against its batch {other_batch}){verdict}")
    elif not no_anomalib:
        q = ANOMALIB_QUOTED
        print(f"anomalib GANomaly, QUOTED from the issue (not measured here; 2-core CPU machine): training about "
              f"{q['train_img_s']:.0f} images/s (~{100 * q['peak_fraction']:.0f}% of a "
              f"~{q['peak_gflops']:.0f} GFLOP/s peak), scoring about {q['score_img_s']:.0f} images/s")
        for variant, var in ours.items():
            print(f"GANomaly {variant} / quoted anomalib: training {var['train_img_s'] / q['train_img_s']:.2f}x, "
                  f"scoring {var['score_img_s'] / q['score_img_s']:.2f}x (different runs: indicative only)")
    if mem is not None:
        both = [v for v in ours if "error" not in mem["variants"].get(v, {"error": ""})]
        if both:
            print("Mem_GANomaly / GANomaly training throughput: " + ", ".join(
                f"{v} {mem['variants'][v]['train_img_s'] / ours[v]['train_img_s']:.2f}" for v in both))


if __name__ == "__main__":
    main()
