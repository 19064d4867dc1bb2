"""GOAD (methods/goad.py): the triplet-centre loss and the score on hand-made features and centres,
the loss's terms, the WRN block of the authors' code, determinism and the score's direction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.base import iterate_minibatches
from methods.goad import GOAD, goad_loss, goad_scores, triplet_centre_loss
from methods.transformations import GeometricTransformer, geometric_transformations
from methods.wrn import WideResNet
from test_geom import pattern_and_noise


def test_triplet_centre_loss_by_hand():
    # 2 images x 2 transformations, 1-d features; batch centres c0 = (0 + 2) / 2 = 1, c1 = (1 + 3) / 2 = 2.
    features = torch.tensor([[[0.0], [1.0]], [[2.0], [3.0]]])
    # max(0, own + margin - other), squared distances: image 0, m=0 (f=0): own 1, other 4 -> 0;
    # m=1 (f=1): own 1, other 0 -> 2. Image 1, m=0 (f=2): own 1, other 0 -> 2; m=1 (f=3): own 1, other 4 -> 0.
    assert triplet_centre_loss(features, margin=1.0).item() == pytest.approx((0 + 2 + 2 + 0) / 4)
    assert triplet_centre_loss(features, margin=0.0).item() == pytest.approx((0 + 1 + 1 + 0) / 4)
    far_apart = torch.tensor([[[0.0], [10.0]], [[0.0], [10.0]]])  # each at its own centre, 100 from the other
    assert triplet_centre_loss(far_apart, margin=1.0).item() == 0.0


def test_goad_score_by_hand():
    centres = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    at_own_centres = torch.tensor([[[0.0], [2.0]]], dtype=torch.float64)  # distances m=0: (0, 4), m=1: (4, 0)
    swapped = torch.tensor([[[2.0], [0.0]]], dtype=torch.float64)  # m=0: (4, 0), m=1: (0, 4)
    own = 2 * math.log(1 + math.exp(-4))
    assert goad_scores(at_own_centres, centres).item() == pytest.approx(own)
    assert goad_scores(swapped, centres).item() == pytest.approx(8 + own)
    # eps floors the squared distances: (0, 4) -> (1, 4)
    assert goad_scores(at_own_centres, centres, eps=1.0).item() == pytest.approx(2 * math.log(1 + math.exp(-3)))
    both = goad_scores(torch.cat([at_own_centres, swapped]), centres)
    assert both[0] < both[1]


def test_goad_loss_adds_its_terms():
    torch.manual_seed(0)
    net = WideResNet(10, 1, 72, 1, mid_bn_relu=False, conv_init="fan_out").eval()
    transformer = GeometricTransformer()
    x = torch.rand(2, 1, 32, 32)
    loss, cross_entropy, triplet, mean_square, features = goad_loss(net, x, transformer, 0.1, 1.0, 10.0)
    assert features.shape == (2, 72, 64)
    torch.testing.assert_close(loss, cross_entropy + 0.1 * triplet + 10.0 * mean_square)
    torch.testing.assert_close(triplet, triplet_centre_loss(features, 1.0))
    torch.testing.assert_close(features[1, 5], net(transformer.apply(x[1:2], torch.tensor([5])))[0][0])


def test_goads_block_skips_the_middle_batchnorm():
    standard, goad = WideResNet(10, 1, 72, 3), WideResNet(10, 1, 72, 3, mid_bn_relu=False)
    n_bn = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) for net in (standard, goad)]
    assert n_bn == [7, 4]  # 3 blocks x 2 + the last one; GOAD's code: 3 x 1 + 1
    fan_out = WideResNet(10, 4, 72, 3, conv_init="fan_out").features[0].weight
    assert fan_out.std().item() == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.15)


def test_the_budget_is_in_images():
    assert GOAD().planned_steps(5000) == {"train": 16 * 1250}
    with pytest.raises(ValueError, match="centres"):
        GOAD(centres="median").check_params()


SMALL = dict(widen_factor=1, base_width=4, epochs=1, max_steps=8, batch_size=4, device="cpu")


def test_the_trained_pattern_scores_lower_than_noise_and_a_seed_repeats():
    x_train, x_normal, x_noise = pattern_and_noise(n_train=32)
    detector = GOAD(**SMALL, random_state=0).fit(x_train)
    assert detector.training_log_["steps"] == 8 and detector.centres_.shape == (72, 16)
    normal, noise = detector.decision_function(x_normal), detector.decision_function(x_noise)
    assert normal.max() < noise.min()
    again = GOAD(**SMALL, random_state=0).fit(x_train).decision_function(x_normal)
    np.testing.assert_array_equal(again, normal)
    other = GOAD(**SMALL, random_state=0, centres="train_pass").fit(x_train)
    assert normal.max() < other.decision_function(x_noise).min()
    assert not torch.equal(other.centres_, detector.centres_)  # eval-mode pass vs the last epoch's features


def test_a_solo_fit_is_the_hand_written_loop_with_per_epoch_centres_bit_for_bit():
    # 12 images, 3 steps of 4 per epoch, 5 steps: the centres are the mean features of the second
    # epoch's 2 steps (8 images), summed after each step from the features of its forward pass.
    x_train, x_normal, x_noise = pattern_and_noise(n_train=12)
    params = dict(SMALL, epochs=2, max_steps=5)
    engine = GOAD(**params).fit(x_train)
    by_hand = GOAD(**params)
    x = by_hand._begin_fit(x_train)
    by_hand._build_networks(x)
    by_hand.net_.train()
    adam = torch.optim.Adam(by_hand.net_.parameters(), lr=by_hand.lr)
    steps = 0
    for _ in range(2):
        sums, seen = torch.zeros(72, by_hand.net_.feature_dim), torch.zeros(())
        for idx in iterate_minibatches(len(x), 4, False, by_hand.generator_, by_hand.device_):
            if steps < 5:
                loss, *_, features = goad_loss(by_hand.net_, x[idx], by_hand.transformer_, by_hand.lmbda,
                                               by_hand.margin, by_hand.feature_reg)
                adam.zero_grad()
                loss.backward()
                adam.step()
                sums += features.detach().sum(0)
                seen += len(idx)
                steps += 1
        by_hand.centres_ = sums / seen
    by_hand._finish_fit()
    assert seen == 8 and torch.equal(engine.centres_, by_hand.centres_)
    x_test = np.concatenate([x_normal[:4], x_noise[:4]])
    np.testing.assert_array_equal(engine.decision_function(x_test), by_hand.decision_function(x_test))
    assert engine.training_log_["steps"] == 5 and len(engine.training_log_["epoch_mean_loss"]) == 2


def test_the_shift_is_a_hyperparameter():
    assert len(geometric_transformations(4)) == 72 and GOAD(max_shift=4).check_params()
