"""Speed benchmark of the registered detectors (a benchmark script, not a test).

    python -m benchmark.speed [--methods ganomaly mem_ganomaly] [--device cpu] [--threads 2]

For every method in `methods.REGISTRY` (or --methods) it builds the detector from its `quick`
settings for CIFAR-10 (32 x 32 x 3 input) with `batch_size` 64 and every training stage run for
exactly --steps optimiser steps (each stage's own step-cap and epoch arguments, as its `Stage`
names them: nothing guessed from argument names), and on synthetic 32 x 32 x 3 images in [0, 1]
measures, on the current device:

* training images/second: (optimiser steps x batch, over all stages) / the wall time of fit(),
  after a short warm-up fit;
* stacked training images/second at K = 1, 4, 10 (--stack): K jobs trained as one batched model
  (methods/stacking.py), for the detectors that support it; K x images / wall time;
* on a GPU, the same stacked fits with every training step replayed from a CUDA graph
  (methods/graphs.py; the capture and its 3 eager warm-up steps are inside the timed fit);
* the extrapolated wall time of the whole paper profile for the method (3 datasets x 10
  classes, one seed, jobs one after the other) on this device, from benchmark/estimate.py's
  calibration of the paper settings and the datasets' nominal sizes;
* scoring images/second: decision_function() on --n-score images with the method's own
  score batch size, and (`@64`) with `score_batch_size=64` where the method has that argument;
* FLOPs per training image, counted with torch.utils.flop_counter.FlopCounterMode over a
  1-epoch fit (matmuls and convolutions, forward and backward), and the achieved GFLOP/s
  against the machine's fp32 matmul peak, measured here with a big torch.mm.
Every time is the best of --repeats runs (default 3), the one least disturbed by other work;
run it with --threads 2 on an otherwise idle machine (check `uptime`).
A method whose module does not import (or cannot be built) is reported as unavailable.

When anomalib is importable, its GANomaly is timed in the same run: its Lightning module's own
training_step (G and D updates, with its optimisers, at batch 64, 32 x 32 x 3) and its scoring
(the torch model in eval mode under inference_mode). Data loading and Lightning's loop are left
out, which favours anomalib. Without anomalib the issue's reference figures are printed,
labelled as quoted, not measured.
"""
from __future__ import annotations

import argparse
import inspect
import time
import types
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmark.estimate import format_seconds
from methods import REGISTRY, get_method
from methods.torch_base import resolve_device

BATCH = 64
# anomalib GANomaly on this project's 2-core CPU machine type, from the issue: quoted, not measured.
ANOMALIB_QUOTED = {"train_img_s": 175.0, "peak_fraction": 0.83, "peak_gflops": 170.0, "score_img_s": 830.0}


def synchronize(device: torch.device) -> None:
    """Wait for the device's pending work (CUDA only; a no-op elsewhere).

    Parameters
    ----------
    device : torch.device
        The device.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, repeats: int = 5) -> float:
    """fp32 torch.mm peak: the best of `repeats` products of two n x n matrices.

    Parameters
    ----------
    device : torch.device
        The device.
    repeats : int, default=5
        Number of timed products.

    Returns
    -------
    float
        The peak in GFLOP/s.
    """
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


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


def build(name: str, device: str, steps: int, n_train: int, random_state: int = 0) -> tuple[Any, dict]:
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
    return cls(**{**settings, **overrides}), overrides


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
    from benchmark.estimate import calibrate

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


def bench_method(name: str, args: argparse.Namespace, device: torch.device, rng: np.random.Generator) -> dict:
    """Measure one method's training and scoring throughput and FLOPs on random CIFAR-sized images.

    Parameters
    ----------
    name : str
        Registry name of the method.
    args : argparse.Namespace
        The command line (n_train, n_score, steps, repeats, stack, device).
    device : torch.device
        The device.
    rng : numpy.random.Generator
        Source of the random images.

    Returns
    -------
    dict
        Images per second and GFLOP per image of training and scoring.
    """
    from methods.stacking import fit_stacked, supports_stacking

    x_train = rng.random((args.n_train, 3, 32, 32), dtype=np.float32)
    x_score = rng.random((args.n_score, 3, 32, 32), dtype=np.float32)
    # Warm-up (allocator, oneDNN primitives, lazy CUDA init), also the short fit for the FLOPs.
    warm, _ = build(name, args.device, 1, args.n_train)
    flop_images = x_train[:4 * BATCH]
    train_flops = count_flops(lambda: warm.fit(flop_images))
    score_flops = count_flops(lambda: warm.decision_function(x_score[:BATCH]))

    detector, overrides = build(name, args.device, args.steps, args.n_train)
    images = trained_images(detector, args.n_train)
    fit_s = timed(lambda: detector.fit(x_train), device, args.repeats)
    detector.decision_function(x_score[:BATCH])
    score_s = timed(lambda: detector.decision_function(x_score), device, args.repeats)
    result = {
        "overrides": overrides, "fit_s": fit_s,
        "train_img_s": images / fit_s,
        "score_img_s": args.n_score / score_s,
        "train_gflop_per_img": train_flops / trained_images(warm, len(flop_images)) / 1e9,
        "score_gflop_per_img": score_flops / BATCH / 1e9,
        "score_batch": getattr(detector, "score_batch_size", None),
        "stacked_img_s": {},
    }
    if "score_batch_size" in detector.get_params():
        detector.set_params(score_batch_size=BATCH)
        score_seconds = timed(lambda: detector.decision_function(x_score), device, args.repeats)
        result["score64_img_s"] = args.n_score / score_seconds
    if supports_stacking(detector):
        graph_modes = (False, True) if device.type == "cuda" else (False,)
        result["graphed_img_s"] = {}
        for graphs in graph_modes:
            for k in args.stack:
                dets = [build(name, args.device, args.steps, args.n_train, random_state=s)[0] for s in range(k)]
                for det in dets:
                    det.cuda_graphs = graphs
                seconds = timed(lambda: fit_stacked(dets, [x_train] * k), device, args.repeats)
                result["graphed_img_s" if graphs else "stacked_img_s"][k] = k * images / seconds
    if args.paper:
        result["paper_s"] = paper_profile_seconds(name, args.device, args.calibration_steps)
    return result


def bench_anomalib(args: argparse.Namespace, device: torch.device, rng: np.random.Generator) -> Optional[dict]:
    """anomalib's GANomaly: its own training_step and its torch model's scoring.

    Parameters
    ----------
    args : argparse.Namespace
        The command line.
    device : torch.device
        The device.
    rng : numpy.random.Generator
        Source of the random images.

    Returns
    -------
    dict or None
        Throughputs and FLOPs as `bench_method` returns them; None if anomalib is absent.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from anomalib.models import Ganomaly
            from anomalib.pre_processing import PreProcessor
            from torchvision.transforms.v2 import Resize
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"anomalib not importable ({type(exc).__name__}: {exc})")
        return None
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
    for batch in batches[:2]:
        module.training_step(batch, 0)
    train_flops = count_flops(lambda: module.training_step(batches[0], 0))

    def train() -> None:
        for i in range(args.steps):
            module.training_step(batches[i % len(batches)], i)

    train_s = timed(train, device, args.repeats)
    model = module.model.eval()
    x_score = torch.from_numpy(rng.random((args.n_score, 3, 32, 32), dtype=np.float32)).to(device) * 2 - 1

    def score(batch_size: int) -> float:
        def run() -> None:
            with torch.inference_mode():
                for i in range(0, len(x_score), batch_size):
                    model(x_score[i:i + batch_size]).pred_score.cpu()
        run()
        return len(x_score) / timed(run, device, args.repeats)

    with torch.inference_mode():
        score_flops = count_flops(lambda: model(x_score[:BATCH]))
    return {"train_img_s": args.steps * BATCH / train_s, "score_img_s": score(BATCH),
            "score_big_img_s": score(1024), "train_gflop_per_img": train_flops / BATCH / 1e9,
            "score_gflop_per_img": score_flops / BATCH / 1e9}


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
    parser.add_argument("--stack", type=int, nargs="*", default=[1, 4, 10],
                        help="stack sizes K to time (default 1 4 10)")
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
    peak = matmul_peak_gflops(device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s")
    print(f"synthetic 32x32x3 data: {args.n_train} training images, {args.steps} steps per stage at batch {BATCH}, "
          f"{args.n_score} images scored; CUDA graphs (the G columns: stacked fits with each step replayed "
          f"from a graph, capture and 3 warm-up steps included): "
          f"{'timed' if device.type == 'cuda' else 'CUDA only, n/a here'}")
    graph_stack = args.stack if device.type == "cuda" else []
    stack_cols = "".join(f"{'K=' + str(k) + ' img/s':>12}" for k in args.stack)
    stack_cols += "".join(f"{'G K=' + str(k):>12}" for k in graph_stack)
    header = (f"{'method':<16}{'train img/s':>12}{stack_cols}{'score img/s':>12}{'score@64':>10}"
              f"{'GFLOP/img':>11}{'GFLOP/s':>9}{'% peak':>8}{'paper prof.':>12}  notes")
    rows, results = [], {}
    for name in args.methods:
        rng = np.random.default_rng(0)
        try:
            get_method(name).load()
        except (ImportError, AttributeError, KeyError) as exc:
            rows.append(f"{name:<16}unavailable ({type(exc).__name__}: {exc})")
            continue
        try:
            res = bench_method(name, args, device, rng)
        except Exception as exc:  # noqa: BLE001 - report it and go on with the other methods
            rows.append(f"{name:<16}failed ({type(exc).__name__}: {exc})")
            continue
        results[name] = res
        score64 = f"{res['score64_img_s']:>10.0f}" if "score64_img_s" in res else f"{'-':>10}"
        if res["train_gflop_per_img"]:
            achieved = res["train_gflop_per_img"] * res["train_img_s"]
            flops = f"{res['train_gflop_per_img']:>11.3f}{achieved:>9.1f}{100 * achieved / peak:>7.0f}%"
        else:  # no torch matmuls or convolutions (e.g. iForest through scikit-learn)
            flops = f"{'n/a':>11}{'n/a':>9}{'n/a':>8}"
        stacked = "".join(f"{res['stacked_img_s'][k]:>12.1f}" if k in res["stacked_img_s"] else f"{'-':>12}"
                          for k in args.stack)
        graphed = res.get("graphed_img_s", {})
        stacked += "".join(f"{graphed[k]:>12.1f}" if k in graphed else f"{'-':>12}" for k in graph_stack)
        paper = f"{format_seconds(res['paper_s']):>12}" if "paper_s" in res else f"{'-':>12}"
        rows.append(f"{name:<16}{res['train_img_s']:>12.1f}{stacked}{res['score_img_s']:>12.0f}"
                    f"{score64}{flops}{paper}  "
                    f"score batch {res['score_batch']}, fit {res['fit_s']:.1f} s, {res['overrides']}")
    anomalib = (None if args.no_anomalib or "ganomaly" not in results
                else bench_anomalib(args, device, np.random.default_rng(0)))
    if anomalib is not None:
        achieved = anomalib["train_gflop_per_img"] * anomalib["train_img_s"]
        rows.append(f"{'anomalib GANomaly':<16}{anomalib['train_img_s']:>12.1f}"
                    f"{'':>{12 * (len(args.stack) + len(graph_stack))}}"
                    f"{anomalib['score_big_img_s']:>12.0f}"
                    f"{anomalib['score_img_s']:>10.0f}{anomalib['train_gflop_per_img']:>11.3f}{achieved:>9.1f}"
                    f"{100 * achieved / peak:>7.0f}%  measured: training_step at batch 64; scoring at batch 1024 / 64")
    print(header)
    print("\n".join(rows))
    paper = [res["paper_s"] for res in results.values() if "paper_s" in res]
    if paper:
        print(f"paper profile of the methods above (3 datasets x 10 classes, one seed, one job at a time) on this "
              f"device: about {format_seconds(sum(paper))} (benchmark/estimate.py's calibration; nominal sizes)")

    gan, mem = results.get("ganomaly"), results.get("mem_ganomaly")
    if gan is not None:
        if anomalib is not None:
            print("GANomaly / anomalib (measured, same run): "
                  f"training {gan['train_img_s'] / anomalib['train_img_s']:.2f}x, "
                  f"scoring {gan['score_img_s'] / anomalib['score_img_s']:.2f}x against anomalib at batch 64 "
                  f"({gan['score_img_s'] / anomalib['score_big_img_s']:.2f}x against anomalib at batch 1024); "
                  f"FLOPs per training image {gan['train_gflop_per_img'] / anomalib['train_gflop_per_img']:.2f}x")
        elif not args.no_anomalib:
            q = ANOMALIB_QUOTED
            print(f"anomalib GANomaly, QUOTED from the issue (not measured here; 2-core CPU machine): training about "
                  f"{q['train_img_s']:.0f} images/s (~{100 * q['peak_fraction']:.0f}% of a "
                  f"~{q['peak_gflops']:.0f} GFLOP/s peak), scoring about {q['score_img_s']:.0f} images/s")
            print(f"GANomaly / quoted anomalib: training {gan['train_img_s'] / q['train_img_s']:.2f}x, "
                  f"scoring {gan['score_img_s'] / q['score_img_s']:.2f}x (different runs: indicative only)")
        if mem is not None:
            print(f"Mem_GANomaly / GANomaly training throughput: {mem['train_img_s'] / gan['train_img_s']:.2f}")


if __name__ == "__main__":
    main()
