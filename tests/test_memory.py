"""The memory module (docs/method.md eqs. 15-21) and the addressing entropy (eqs. 28-30), checked
against hand-worked numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.memory import MemoryModule, addressing_entropy

# Three slots in 2-D. For z = (ln 4, ln 2): v = z M^T = (ln 4, ln 2, 0) (eq. 15), so
# w = softmax(v) = (4, 2, 1) / 7 = (0.571, 0.286, 0.143) (eq. 16).
SLOTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
QUERY = torch.tensor([[math.log(4.0), math.log(2.0)]])


def memory(shrink_threshold, slots=SLOTS, **kwargs) -> MemoryModule:
    module = MemoryModule(slots.shape[0], slots.shape[1], shrink_threshold=shrink_threshold, **kwargs)
    with torch.no_grad():
        module.memory.copy_(slots)
    return module


def test_softmax_weights_without_gate():
    z_hat, w = memory(0.0)(QUERY)
    np.testing.assert_allclose(w.detach().numpy(), [[4 / 7, 2 / 7, 1 / 7]], atol=1e-6)
    np.testing.assert_allclose(z_hat.detach().numpy(), [[4 / 7, 2 / 7]], atol=1e-6)  # eq. 21


@pytest.mark.parametrize("lam, expected_w", [
    (0.10, [4 / 7, 2 / 7, 1 / 7]),   # every slot above lambda: nothing cut
    (0.20, [2 / 3, 1 / 3, 0.0]),     # slot 2 (1/7 = 0.143) cut; (4/7, 2/7) renormalised
    (0.30, [1.0, 0.0, 0.0]),         # only slot 0 (0.571) survives
])
def test_hard_shrink_gate_and_renormalisation(lam, expected_w):
    z_hat, w = memory(lam)(QUERY)
    w = w.detach().numpy()
    np.testing.assert_allclose(w, [expected_w], atol=1e-6)                         # eqs. 18-20
    np.testing.assert_allclose(w.sum(axis=1), [1.0], atol=1e-6)
    np.testing.assert_allclose(z_hat.detach().numpy(), w @ SLOTS.numpy(), atol=1e-6)  # eq. 21


def test_all_slots_cut_gives_zero_not_nan():
    module = memory(0.6)  # lambda above the largest weight (0.571): every slot is cut
    z_hat, w = module(QUERY)
    assert torch.equal(w, torch.zeros_like(w))
    assert torch.equal(z_hat, torch.zeros_like(z_hat))
    (z_hat.sum() + addressing_entropy(w)).backward()
    assert torch.isfinite(module.memory.grad).all()


def test_default_threshold_is_one_over_n():
    assert MemoryModule(100, 8).shrink_threshold == pytest.approx(0.01)
    assert MemoryModule(1600, 8).shrink_threshold == pytest.approx(1 / 1600)


def test_gradients_reach_the_memory_and_the_query():
    module = memory(0.2)
    query = QUERY.clone().requires_grad_(True)
    z_hat, w = module(query)
    (z_hat.square().sum() + addressing_entropy(w)).backward()
    assert torch.isfinite(module.memory.grad).all() and module.memory.grad.abs().sum() > 0
    assert torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0


def test_entropy_hand_worked_and_zero_weights_contribute_zero():
    w = torch.tensor([[2 / 3, 1 / 3, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    h = addressing_entropy(w)
    expected = (-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3) + 0.0) / 2  # mean over samples
    assert h.item() == pytest.approx(expected, abs=1e-6)
    h.backward()
    assert torch.isfinite(w.grad).all()
    assert addressing_entropy(torch.zeros(2, 5)).item() == 0.0


def test_entropy_on_feature_maps_averages_over_positions():
    w = torch.zeros(1, 2, 1, 2)
    w[0, :, 0, 0] = torch.tensor([0.5, 0.5])  # entropy ln 2
    w[0, :, 0, 1] = torch.tensor([1.0, 0.0])  # entropy 0
    assert addressing_entropy(w).item() == pytest.approx(math.log(2) / 2, abs=1e-6)


@pytest.mark.parametrize("addressing", ["dot", "cosine"])
def test_feature_map_addressing_equals_per_position_vectors(addressing):
    torch.manual_seed(0)
    module = MemoryModule(7, 4, addressing=addressing, shrink_threshold=0.1)
    fmap = torch.randn(2, 4, 3, 5)
    z_hat, w = module(fmap)
    assert z_hat.shape == (2, 4, 3, 5) and w.shape == (2, 7, 3, 5)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                z_vec, w_vec = module(fmap[b, :, i, j][None])
                torch.testing.assert_close(z_hat[b, :, i, j], z_vec[0])
                torch.testing.assert_close(w[b, :, i, j], w_vec[0])


def test_cosine_addressing_uses_normalised_vectors():
    module = memory(0.0, addressing="cosine")
    _, w = module(QUERY * 10)  # cosine similarity ignores the query's length
    _, w_unit = module(QUERY)
    torch.testing.assert_close(w, w_unit)
    cos = torch.tensor([math.log(4) / math.hypot(math.log(4), math.log(2)),
                        math.log(2) / math.hypot(math.log(4), math.log(2)), 0.0])
    torch.testing.assert_close(w[0], torch.softmax(cos, dim=0))


def test_one_by_one_map_equals_vector():
    torch.manual_seed(1)
    module = MemoryModule(5, 3)
    z = torch.randn(4, 3)
    z_vec, w_vec = module(z)
    z_map, w_map = module(z[:, :, None, None])
    torch.testing.assert_close(z_map[:, :, 0, 0], z_vec)
    torch.testing.assert_close(w_map[:, :, 0, 0], w_vec)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_slots": 0, "dim": 4}, "num_slots"), ({"num_slots": 4, "dim": 0}, "dim"),
    ({"num_slots": 4, "dim": 4, "addressing": "l2"}, "addressing"),
    ({"num_slots": 4, "dim": 4, "shrink_threshold": -0.1}, "shrink_threshold"),
    ({"num_slots": 4, "dim": 4, "shrink_threshold": 1.0}, "shrink_threshold"),  # would cut every weight
    ({"num_slots": 4, "dim": 4, "eps": 0.0}, "eps"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MemoryModule(**kwargs)


def test_one_check_for_the_module_and_both_detectors():
    from methods.mem_ganomaly import MemGANomaly
    from methods.memae import MemAE

    for bad in ({"shrink_threshold": 1.0}, {"addressing": "l2"}):
        messages = set()
        for make in (lambda kw: MemoryModule(4, 4, **kw), lambda kw: MemAE(**kw).check_params(),
                     lambda kw: MemGANomaly(**kw).check_params()):
            with pytest.raises(ValueError) as info:
                make(bad)
            messages.add(str(info.value))
        assert len(messages) == 1  # the same words everywhere: one check, not three


def test_wrong_input_shape():
    with pytest.raises(ValueError):
        MemoryModule(4, 3)(torch.zeros(2, 5, 2, 2))
