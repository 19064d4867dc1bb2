"""GEOM (methods/geom.py) and the shared transformations (methods/transformations.py): the 72
transformations against a hand-worked 4 x 4 example and against the authors' numpy / scipy
definition, the Dirichlet fit on samples of a known Dirichlet, the score on hand-made numbers, the
training budget, determinism and the score's direction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from methods.base import iterate_minibatches
from methods.geom import GEOM, dirichlet_normality, fit_dirichlet, geom_loss, inverse_digamma
from methods.transformations import (
    GeometricTransformer,
    Transformation,
    geometric_transformations,
    prepare_images,
    transform_image,
)
from methods.wrn import WideResNet

GRID = torch.arange(16).reshape(4, 4)


def authors_transform(image: np.ndarray, t: Transformation) -> np.ndarray:
    """GEOM's AffineTransformation on an H x W x C image, with scipy in place of Keras'
    apply_affine_transform (which calls scipy.ndimage.affine_transform on each channel with the
    identity and offset (tx, ty), order 1, the given fill mode)."""
    out = np.fliplr(image) if t.flip else image
    if t.tx or t.ty:
        out = np.stack([ndimage.affine_transform(out[:, :, c], np.eye(2), offset=(t.tx, t.ty), order=1,
                                                 mode="reflect") for c in range(out.shape[2])], axis=2)
    return np.rot90(out, t.k_rotate)


def test_the_list_is_geoms_product_in_its_order():
    ts = geometric_transformations()
    assert len(ts) == 72 and ts[0] == Transformation(False, 0, 0, 0)
    assert ts[1] == Transformation(False, 0, 0, 1) and ts[4] == Transformation(False, 0, -8, 0)
    assert ts[12] == Transformation(False, -8, 0, 0) and ts[36] == Transformation(True, 0, 0, 0)
    assert ts[71] == Transformation(True, 8, 8, 3)


@pytest.mark.parametrize("t, expected", [
    (Transformation(True, 0, 0, 0), [[3, 2, 1, 0], [7, 6, 5, 4], [11, 10, 9, 8], [15, 14, 13, 12]]),
    (Transformation(False, 1, 0, 0), [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [12, 13, 14, 15]]),
    (Transformation(False, -1, 0, 0), [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]),
    (Transformation(False, 0, 1, 0), [[1, 2, 3, 3], [5, 6, 7, 7], [9, 10, 11, 11], [13, 14, 15, 15]]),
    (Transformation(False, 0, 0, 1), [[3, 7, 11, 15], [2, 6, 10, 14], [1, 5, 9, 13], [0, 4, 8, 12]]),
    # flip -> rows +1 (reflect) -> columns -1 (reflect) -> rotate 90, worked by hand step by step
    (Transformation(True, 1, -1, 1), [[5, 9, 13, 13], [6, 10, 14, 14], [7, 11, 15, 15], [7, 11, 15, 15]]),
])
def test_hand_worked_4x4(t, expected):
    assert transform_image(GRID, t).tolist() == expected
    transformer = GeometricTransformer(geometric_transformations(max_shift=1))
    index = transformer.transformations.index(t)
    assert transformer.apply(GRID[None, None].float(), torch.tensor([index]))[0, 0].long().tolist() == expected


def test_shifts_larger_than_the_image_keep_reflecting():
    # scipy's "reflect" has period 2n: shifting a 4-pixel row by 6 reads columns 6, 7, 8, 9 -> 1, 0, 0, 1
    assert transform_image(GRID, Transformation(False, 0, 6, 0))[0].tolist() == [1, 0, 0, 1]


def test_all_72_match_the_authors_numpy_scipy_definition():
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].repeat(72, 1, 1, 1)
    transformer = GeometricTransformer()
    ours = transformer.apply(x, torch.arange(72)).numpy()
    for index, t in enumerate(transformer.transformations):
        np.testing.assert_array_equal(ours[index], authors_transform(image, t).transpose(2, 0, 1), err_msg=str(t))


def test_the_72_are_distinct_and_only_flips_and_rotations_invertible():
    maps = GeometricTransformer().source_maps(32, 32, torch.device("cpu"))
    assert len({tuple(m.tolist()) for m in maps}) == 72
    identity = torch.arange(32 * 32)
    for t, source in zip(geometric_transformations(), maps):
        is_permutation = torch.equal(source.sort().values, identity)
        assert is_permutation == (t.tx == 0 and t.ty == 0), t
        if is_permutation:  # its inverse is in the dihedral group: some other unshifted map undoes it
            assert any(torch.equal(source[other], identity) for other, u in zip(maps, geometric_transformations())
                       if u.tx == 0 and u.ty == 0)


def test_batched_apply_matches_one_by_one_and_apply_all_is_image_major():
    x = torch.rand(5, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    transformer = GeometricTransformer(geometric_transformations(max_shift=3))
    t_index = torch.tensor([0, 71, 5, 40, 13])
    batched = transformer.apply(x, t_index)
    for b in range(5):
        assert torch.equal(batched[b], transform_image(x[b], transformer.transformations[int(t_index[b])]))
    every = transformer.apply_all(x[:2])
    assert every.shape == (144, 2, 12, 12)
    assert torch.equal(every[72 + 13], transform_image(x[1], transformer.transformations[13]))
    with pytest.raises(ValueError, match="square"):
        transformer.apply(torch.zeros(1, 1, 4, 5), torch.tensor([0]))


def test_prepare_images_pads_mnist_to_32_like_geom():
    x = torch.ones(1, 1, 28, 28)
    out = prepare_images(x)
    assert out.shape == (1, 1, 32, 32)
    assert out[0, 0, 2:30, 2:30].eq(1).all() and out[0, 0, :2].eq(-1).all() and out[0, 0, :, 30:].eq(-1).all()
    assert prepare_images(torch.zeros(2, 3, 32, 32)).eq(-1).all()


def test_inverse_digamma_inverts_digamma():
    x = torch.tensor([0.01, 0.3, 1.0, 4.0, 250.0], dtype=torch.float64)
    torch.testing.assert_close(inverse_digamma(torch.digamma(x)), x, rtol=1e-10, atol=0)


def test_dirichlet_fit_recovers_known_alphas():
    alphas = torch.tensor([[2.0, 5.0, 1.0, 0.5], [30.0, 10.0, 3.0, 1.0]], dtype=torch.float64)
    torch.manual_seed(0)
    samples = torch.distributions.Dirichlet(alphas).sample((20000,))  # (N, 2, K)
    fitted = fit_dirichlet(samples.mean(0), samples.log().mean(0))
    torch.testing.assert_close(fitted, alphas, rtol=0.05, atol=0)
    # each row is its own fit
    torch.testing.assert_close(fit_dirichlet(samples[:, 1].mean(0), samples[:, 1].log().mean(0)), fitted[1])


def test_dirichlet_normality_by_hand():
    log_p = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64).log()
    expected = [math.log(0.25) + 2 * math.log(0.75), 3 * math.log(0.5)]
    torch.testing.assert_close(dirichlet_normality(torch.tensor([2.0, 3.0], dtype=torch.float64), log_p),
                               torch.tensor(expected, dtype=torch.float64))


def test_geom_loss_is_the_cross_entropy_of_the_applied_transformation():
    torch.manual_seed(0)
    net = WideResNet(10, 1, 72, 1).eval()
    transformer = GeometricTransformer()
    x = torch.rand(3, 1, 32, 32)
    t_index = torch.tensor([0, 17, 70])
    loss, accuracy = geom_loss(net, x, t_index, transformer)
    logits = torch.cat([net(transform_image(x[b:b + 1], transformer.transformations[int(t)]))[1]
                        for b, t in enumerate(t_index)])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, t_index))
    assert accuracy == (logits.argmax(1) == t_index).float().mean()
    torch.testing.assert_close(geom_loss(net, x, t_index, transformer)[0], loss, rtol=0, atol=0)


def test_the_budget_counts_image_transformation_pairs():
    assert GEOM().planned_steps(5000) == {"train": 3 * math.ceil(5000 * 72 / 128)}  # the authors' 8439 steps
    assert GEOM(max_steps=10).planned_steps(5000) == {"train": 10}


def pattern_and_noise(n_train: int = 48, n_test: int = 12, seed: int = 0):
    """An asymmetric pattern (a bright bar near the top-left, a vertical gradient) with mild noise;
    uniform noise as the anomalies."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.linspace(0.0, 0.5, 28, dtype=np.float32)[:, None], (1, 28))
    base[3:9, 4:16] = 1.0

    def draw(n: int) -> np.ndarray:
        return np.clip(base[None, None] + rng.normal(0, 0.03, (n, 1, 28, 28)), 0, 1).astype(np.float32)

    return draw(n_train), draw(n_test), rng.random((n_test, 1, 28, 28), dtype=np.float32)


SMALL = dict(widen_factor=1, base_width=4, epochs=1, max_steps=10, batch_size=32, dirichlet_max_images=16,
             dirichlet_max_iter=50, device="cpu")


def test_the_trained_pattern_scores_lower_than_noise_and_a_seed_repeats():
    x_train, x_normal, x_noise = pattern_and_noise()
    detector = GEOM(**SMALL, random_state=0).fit(x_train)
    assert detector.training_log_["steps"] == 10 and detector.training_log_["dirichlet_images"] == 16
    normal, noise = detector.decision_function(x_normal), detector.decision_function(x_noise)
    assert normal.max() < noise.min()
    again = GEOM(**SMALL, random_state=0).fit(x_train).decision_function(x_normal)
    np.testing.assert_array_equal(again, normal)
    detector.score = "simple"  # the same network, scored by minus the mean probability of the applied transformation
    simple_normal, simple_noise = detector.decision_function(x_normal), detector.decision_function(x_noise)
    # After 10 steps the mean probability is still near 1/72 for both (it does not separate them yet, as the
    # Dirichlet score does); it must be a probability and a different score.
    for simple in (simple_normal, simple_noise):
        assert ((simple >= -1) & (simple <= 0)).all() and abs(simple.mean() + 1 / 72) < 0.01
    assert not np.allclose(simple_normal, normal)


def test_a_solo_fit_is_the_hand_written_loop_over_pairs_bit_for_bit():
    # 8 images x 72 = 576 pairs, 9 steps of 64 per epoch: 12 steps cross an epoch boundary. Written out
    # by hand: one shuffle of the pairs per epoch, pair p = (image p // 72, transformation p % 72),
    # Keras' Adam, zero_grad, backward, step; then the Dirichlets on the training images.
    x_train, x_normal, x_noise = pattern_and_noise(n_train=8)
    params = dict(SMALL, batch_size=64, epochs=2, max_steps=12)
    engine = GEOM(**params).fit(x_train)
    by_hand = GEOM(**params)
    x = by_hand._begin_fit(x_train)
    by_hand._build_networks(x)
    by_hand.net_.train()
    adam = torch.optim.Adam(by_hand.net_.parameters(), lr=by_hand.lr, eps=1e-7, weight_decay=by_hand.weight_decay)
    steps = 0
    for _ in range(2):
        for pairs in iterate_minibatches(len(x) * 72, 64, False, by_hand.generator_, by_hand.device_):
            if steps < 12:
                loss, _ = geom_loss(by_hand.net_, x[pairs // 72], pairs % 72, by_hand.transformer_)
                adam.zero_grad()
                loss.backward()
                adam.step()
                steps += 1
    by_hand._fit_score_model(x)
    by_hand._finish_fit()
    x_test = np.concatenate([x_normal[:4], x_noise[:4]])
    np.testing.assert_array_equal(engine.decision_function(x_test), by_hand.decision_function(x_test))
    assert engine.training_log_["steps"] == 12 and len(engine.training_log_["epoch_mean_loss"]) == 2
    assert engine.planned_steps(8) == {"train": 12}


def test_bad_hyperparameters_are_named():
    for bad in ({"depth": 12}, {"widen_factor": 0}, {"score": "max"}, {"dirichlet_max_images": 0},
                {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GEOM(**bad).check_params()
