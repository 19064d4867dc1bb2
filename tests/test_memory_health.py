"""The memory-health facts (methods.memory.memory_health) against hand-worked numbers, and the
per-epoch hook (`TorchDetector._epoch_facts`): recorded for MemAE and Mem_GANomaly, and
without any effect on training (bit-identical scores with the hook disabled)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.mem_ganomaly import MemGANomaly
from methods.memae import MemAE
from methods.memory import MemoryModule, memory_health
from methods.torch_base import TorchDetector

HEALTH_KEYS = {"memory_slots_in_use", "memory_slots_per_query", "memory_max_weight", "query_norm", "memory_row_norm"}


def test_memory_health_hand_worked():
    # Slots (1, 0), (0, 1), (0, 0); row norms 1, 1, 0 -> mean 2/3.
    module = MemoryModule(3, 2, shrink_threshold=0.2)
    with torch.no_grad():
        module.memory.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    # Query 1 (ln 4, ln 2): softmax (4, 2, 1) / 7, lambda 0.2 cuts slot 2 -> (2/3, 1/3, 0).
    # Query 2 (0, ln 8): softmax (1, 8, 1) / 10 -> (0.1, 0.8, 0.1), slots 0 and 2 cut -> (0, 1, 0).
    queries = torch.tensor([[math.log(4.0), math.log(2.0)], [0.0, math.log(8.0)]])
    facts = memory_health(module, queries)
    assert facts["memory_slots_in_use"] == 2.0                     # slots 0 and 1; slot 2 never
    assert facts["memory_slots_per_query"] == pytest.approx(1.5)   # 2 slots, then 1
    assert facts["memory_max_weight"] == pytest.approx((2 / 3 + 1.0) / 2, abs=1e-6)
    norms = [math.hypot(math.log(4.0), math.log(2.0)), math.log(8.0)]
    assert facts["query_norm"] == pytest.approx(sum(norms) / 2, rel=1e-6)
    assert facts["memory_row_norm"] == pytest.approx(2 / 3, rel=1e-6)
    # A (B, C, H, W) map addresses every position: the same two queries as a 1 x 2 map.
    as_map = queries.t().reshape(1, 2, 1, 2)
    assert memory_health(module, as_map) == pytest.approx(facts)


def _fit_scores(cls, params, X, disable_hook: bool, monkeypatch):
    if disable_hook:
        monkeypatch.setattr(cls, "_epoch_facts", TorchDetector._epoch_facts)
    detector = cls(**params).fit(X)
    monkeypatch.undo()
    return detector


@pytest.mark.parametrize("cls, params", [
    (MemGANomaly, dict(epochs=2, batch_size=16, max_steps=6, nz=16, ngf=8, ndf=8, memory_size=20)),
    (MemAE, dict(epochs=2, batch_size=16, max_steps=6, widths=(4, 8), num_slots=10,
                 memory_layout="position")),
])
def test_hook_records_health_and_leaves_training_unchanged(cls, params, separable_task, monkeypatch):
    X_train, X_test, _ = separable_task(n_train=48, n_test_normal=8, n_test_anomalous=8)
    params = {**params, "random_state": 3, "device": "cpu"}
    with_hook = _fit_scores(cls, params, X_train, False, monkeypatch)
    without = _fit_scores(cls, params, X_train, True, monkeypatch)
    per_epoch = with_hook.training_log_["per_epoch"]
    assert set(per_epoch) == HEALTH_KEYS
    epochs = 2
    assert all(len(values) == epochs for values in per_epoch.values())
    n_slots = params[cls.memory_size_param]  # the detector says which argument sizes its memory
    assert all(1 <= v <= n_slots for v in per_epoch["memory_slots_in_use"])
    assert all(0 < v <= 1 for v in per_epoch["memory_max_weight"])
    assert "per_epoch" not in without.training_log_
    np.testing.assert_array_equal(with_hook.decision_function(X_test), without.decision_function(X_test))
    assert not hasattr(with_hook, "_facts_sample_")  # the training images are not kept after fit


def test_image_layout_queries_one_per_image(separable_task):
    X_train, _, _ = separable_task(n_train=40)
    detector = MemAE(epochs=1, batch_size=16, max_steps=2, widths=(4, 8), num_slots=10,
                     memory_layout="image", random_state=0, device="cpu").fit(X_train)
    facts = detector.training_log_["per_epoch"]
    assert len(facts["memory_slots_in_use"]) == 1
    # one 8 x 7 x 7 query per image: its norm is that of the flattened encoding
    with torch.no_grad():
        detector.net_.eval()
        x = detector._preprocess(torch.from_numpy(X_train))
        expected = detector.net_.encoder(x).flatten(1).norm(dim=1).mean().item()
    assert facts["query_norm"][0] == pytest.approx(expected, rel=1e-5)
