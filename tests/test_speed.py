"""benchmark/speed.py on tiny settings (1 step, a few images, narrow networks, tiny peak kernels), and
the `memory_format` option of the torch detectors it times (`TrainOptions`, methods/torch_base.py). No timing is
asserted: only that the figures exist, are positive and finite, and that each variant really runs
in its precision and layout."""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from benchmark import speed
from methods import get_method
from methods.base import TrainOptions
from methods.engine import fit_jobs
from methods.torch_base import native_bf16

CPU = torch.device("cpu")
TINY_PEAK = {"mm": {"fp32": (16, 32), "bf16": (16, 32)}, "conv": (2, 4, 8, 3)}
# Narrow networks over the smoke settings (GANomaly's smoke profile keeps the paper's widths).
NARROW = {"ganomaly": dict(ngf=8, ndf=8, nz=8), "mem_ganomaly": dict(ngf=8, ndf=8, nz=8, memory_size=10)}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def smoke_detector(name: str, **overrides):
    spec = get_method(name)
    return spec.load()(**{**spec.settings("smoke", "cifar10"), **NARROW.get(name, {}), "device": "cpu",
                          **overrides})


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def tiny_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"device": "cpu", "steps": 1, "repeats": 1, "n_train": 64, "n_score": 16,
                                 "stack": [], "paper": False, "variants": list(speed.VARIANTS),
                                 "calibration_steps": 1, **overrides})


@pytest.fixture
def narrow_build(monkeypatch):
    """speed.build with GANomaly's networks narrowed, so its variants train in well under a second."""
    original = speed.build

    def build(name, *args, **kwargs):
        detector, overrides = original(name, *args, **kwargs)
        if name in NARROW:
            detector.set_params(**NARROW[name])
        return detector, overrides

    monkeypatch.setattr(speed, "build", build)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_peak_of_each_precision_is_positive_and_finite(precision):
    figures = speed.peak_gflops(CPU, precision, repeats=1, sizes=TINY_PEAK)
    assert set(figures) == {"mm 16", "mm 32", "conv NCHW", "conv channels_last"}
    assert all(math.isfinite(value) and value > 0 for value in figures.values())


def test_default_peak_sizes_are_big_kernels():
    # The peak must come from kernels large enough to saturate the machine, not toy sizes.
    cpu = speed.PEAK_SIZES["cpu"]
    assert max(cpu["mm"]["fp32"]) >= 4096 and max(cpu["mm"]["bf16"]) >= 4096
    batch, channels, size, kernel = cpu["conv"]
    assert 2 * batch * channels * channels * kernel ** 2 * size ** 2 > 5e10  # > 50 GFLOP per conv


def test_a_deep_detector_gets_all_four_variants(narrow_build):
    res = speed.bench_method("ganomaly", tiny_args(), CPU, np.random.default_rng(0))
    assert list(res["variants"]) == ["fp32-nchw", "fp32-cl", "bf16-nchw", "bf16-cl"]
    for name, var in res["variants"].items():
        assert "error" not in var, var
        assert (var["precision"], var["memory_format"]) == speed.VARIANTS[name]
        for key in ("train_img_s", "score_img_s", "score64_img_s"):
            assert math.isfinite(var[key]) and var[key] > 0
    assert res["train_gflop_per_img"] > 0 and res["score_gflop_per_img"] > 0
    assert res["default_layout"] == "cl"  # GANomaly's default_memory_format
    native = native_bf16(CPU)  # "auto": bf16 for GANomaly where the CPU has bf16 kernels (AMX here)
    assert res["default_variant"] == ("bf16-cl" if native else "fp32-cl")


def test_a_non_torch_detector_gets_one_row():
    res = speed.bench_method("iforest", tiny_args(), CPU, np.random.default_rng(0))
    assert list(res["variants"]) == ["n/a"] and res["variants"]["n/a"]["train_img_s"] > 0
    assert res["default_layout"] is None and res["default_variant"] is None and not res["deep"]


@pytest.mark.parametrize("name", ["ganomaly", "memae", "dsvdd"])
@pytest.mark.parametrize("variant", ["fp32-nchw", "fp32-cl", "bf16-cl"])
def test_variant_layout_reaches_weights_and_batches(name, variant):
    precision, layout_name = speed.VARIANTS[variant]
    layout = LAYOUTS[layout_name]
    detector = smoke_detector(name)
    options = TrainOptions(precision=precision, memory_format=layout_name)
    calls: list[tuple[str, bool, bool]] = []  # (phase, input in layout, weight in layout) per Conv2d call
    phase = ["fit"]

    def record(module, args):
        if isinstance(module, nn.Conv2d):
            calls.append((phase[0], args[0].is_contiguous(memory_format=layout),
                          module.weight.is_contiguous(memory_format=layout)))

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        assert fit_jobs([detector], [images(64)], options=options) == [None]
        phase[0] = "score"
        scores = detector.decision_function(images(8, seed=1))
    finally:
        handle.remove()
    assert np.isfinite(scores).all()
    fit_calls = [c for c in calls if c[0] == "fit"]
    score_calls = [c for c in calls if c[0] == "score"]
    assert fit_calls and score_calls
    assert all(weight for _, _, weight in calls)  # every convolution ran with weights in the layout
    assert fit_calls[0][1] and score_calls[0][1]  # the first one saw the batch itself in the layout
    weights = [p for net in detector._networks() for p in net.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=layout) for p in weights)
    if layout_name == "channels_last":
        assert not all(p.is_contiguous() for p in weights)  # really channels_last, not ambiguous shapes
    assert detector.run_info()["memory_format"] == layout_name
    assert detector.run_info()["precision"] == precision


@pytest.mark.parametrize("name, own", [("ganomaly", "channels_last"), ("memae", "channels_last"), ("dagmm", "nchw")])
def test_default_memory_format_is_the_detectors_declared_layout_bit_for_bit(name, own):
    X, X_test = images(64), images(16, seed=1)
    untouched = smoke_detector(name, random_state=2)
    assert TrainOptions().memory_format == "default" and type(untouched).default_memory_format == own
    reference = untouched.fit(X).decision_function(X_test)
    explicit = smoke_detector(name, random_state=2)
    assert fit_jobs([explicit], [X], options=TrainOptions(memory_format="default")) == [None]
    np.testing.assert_array_equal(explicit.decision_function(X_test), reference)
    # The detector's own layout named explicitly computes the same thing (the switch adds nothing else).
    same_layout = smoke_detector(name, random_state=2)
    assert fit_jobs([same_layout], [X], options=TrainOptions(memory_format=own)) == [None]
    np.testing.assert_array_equal(same_layout.decision_function(X_test), reference)
    weights = [p for net in untouched._networks() for p in net.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=LAYOUTS[own]) for p in weights)
    assert untouched.run_info()["memory_format"] == own and untouched.run_info()["memory_format_asked"] == "default"


def test_unknown_memory_format_is_rejected():
    with pytest.raises(ValueError, match="memory_format"):
        TrainOptions(memory_format="nhwc")


def test_anomalib_absent_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "anomalib", None)  # any import of it fails
    assert speed.bench_anomalib(tiny_args(), CPU, np.random.default_rng(0)) is None
    assert "anomalib not importable" in capsys.readouterr().out


def _variant(train: float, score: float) -> dict:
    return {"train_img_s": train, "score_img_s": score, "precision": "fp32"}


def test_ratios_against_both_anomalib_rows(capsys):
    results = {"ganomaly": {"variants": {"fp32-nchw": _variant(600.0, 2000.0), "bf16-cl": _variant(300.0, 900.0)},
                            "train_gflop_per_img": 0.5}}
    anomalib = {"fp32": {"train_img_s": 200.0, "score_img_s": 800.0, "score_big_img_s": 1000.0,
                         "train_gflop_per_img": 1.0},
                "bf16-mixed": {"train_img_s": 300.0, "score_img_s": 1000.0, "score_big_img_s": 500.0,
                               "train_gflop_per_img": 1.0}}
    speed.print_ratios(results, anomalib, no_anomalib=False)
    out = capsys.readouterr().out
    fp32_part, bf16_part = out.split("anomalib GANomaly bf16-mixed")
    assert "goal 3x training, 2x scoring" in fp32_part and "faster batch, 1024" in fp32_part
    assert "fp32-nchw  training  3.00x, scoring  2.00x (2.50x against its batch 64)  goal met" in fp32_part
    assert "bf16-cl    training  1.50x, scoring  0.90x" in fp32_part and "goal not met" in fp32_part
    assert "faster batch, 64" in bf16_part and "goal" not in bf16_part
    assert "fp32-nchw  training  2.00x, scoring  2.00x (4.00x against its batch 1024)" in bf16_part
    assert "FLOPs per training image, GANomaly / anomalib: 0.50x" in out


def test_ratios_against_quoted_figures_without_anomalib(capsys):
    results = {"ganomaly": {"variants": {"fp32-nchw": _variant(350.0, 830.0)}, "train_gflop_per_img": 0.5}}
    speed.print_ratios(results, {}, no_anomalib=False)
    out = capsys.readouterr().out
    assert "QUOTED" in out and "GANomaly fp32-nchw / quoted anomalib: training 2.00x, scoring 1.00x" in out
    speed.print_ratios(results, {}, no_anomalib=True)
    assert "anomalib" not in capsys.readouterr().out


def test_main_prints_the_variants_side_by_side(narrow_build, monkeypatch, capsys):
    monkeypatch.setattr(speed, "PEAK_SIZES", {"cpu": TINY_PEAK, "cuda": TINY_PEAK})
    speed.main(["--device", "cpu", "--methods", "ganomaly", "iforest", "--steps", "1", "--repeats", "1",
                "--n-train", "64", "--n-score", "16", "--stack", "1", "--no-paper", "--no-anomalib",
                "--variants", "fp32-nchw", "bf16-cl"])
    out = capsys.readouterr().out
    assert "fp32 peak" in out and "bf16 peak" in out and "conv channels_last" in out
    rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    assert {("ganomaly", "fp32-nchw"), ("ganomaly", "bf16-cl"), ("iforest", "n/a")} <= rows
    assert ("ganomaly", "fp32-cl") not in rows and "failed" not in out and "anomalib" not in out
