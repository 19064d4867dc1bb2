"""Deep SVDD: preprocessing and centre rule against hand-worked values, the authors' MNIST
min-max constants, weight + BatchNorm-statistics copy, the centre and the score of both objectives,
its settings. The checks every detector passes (score shape, determinism, direction, divergence in
either stage, the epoch callback, hyperparameter errors) are in tests/test_detector_contract.py.
Tiny data, CPU, seconds."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from methods.dsvdd import (
    PROFILES,
    CIFARLeNet,
    CIFARLeNetAE,
    DeepSVDD,
    MNISTLeNet,
    MNISTLeNetAE,
    copy_encoder_state,
    init_center,
    lr_factor,
    min_max_constants,
)
from methods.preprocess import global_contrast_normalization

TINY = dict(epochs=1, ae_epochs=1, batch_size=16, ae_batch_size=16, lr_milestones=(), ae_lr_milestones=(),
            device="cpu")


def test_gcn_on_a_hand_worked_2x2_image():
    # mean 0.3; centred (-0.3, -0.1, 0.1, 0.3); mean |.| = 0.2 -> (-1.5, -0.5, 0.5, 1.5).
    x = torch.tensor([[[[0.0, 0.2], [0.4, 0.6]]]])
    expected = torch.tensor([[[[-1.5, -0.5], [0.5, 1.5]]]])
    torch.testing.assert_close(global_contrast_normalization(x), expected)


def test_min_max_is_computed_from_the_training_images_and_reused_on_test():
    # Two 2x2 training images: GCN gives (-1.5 .. 1.5) and (-1 .. 1), so (min, max) = (-1.5, 1.5).
    det = DeepSVDD(device="cpu")
    det.minmax_ = None
    train = torch.tensor([[[[0.0, 0.2], [0.4, 0.6]]], [[[0.0, 0.0], [1.0, 1.0]]]])
    out = det._preprocess(train)
    assert det.minmax_ == pytest.approx((-1.5, 1.5))
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    torch.testing.assert_close(out[1].flatten(), torch.tensor([1 / 6, 1 / 6, 5 / 6, 5 / 6]))
    # A later (test) batch reuses the training constants, whatever its own range.
    test = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])  # its own GCN range is (-2/3, 2)
    gcn = global_contrast_normalization(test)
    torch.testing.assert_close(det._preprocess(test), (gcn + 1.5) / 3.0)
    assert det.minmax_ == pytest.approx((-1.5, 1.5))
    # Fixed constants can be given instead.
    fixed = DeepSVDD(minmax=(-0.8827, 9.0015), device="cpu")
    fixed.minmax_ = None
    fixed._preprocess(train)
    assert fixed.minmax_ == (-0.8827, 9.0015)


def test_mnist_class0_min_max_reproduces_the_authors_constants(shared_data):
    raw = (shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    labels = np.frombuffer((shared_data / "MNIST" / "raw" / "train-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)[labels == 0]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    lo, hi = min_max_constants(global_contrast_normalization(x))
    assert round(lo, 4) == -0.8827 and round(hi, 4) == 9.0015


def test_centre_eps_rule_on_a_hand_made_example():
    phi = torch.tensor([[0.05, -0.05, 0.5, 0.0, 0.3],
                        [0.03, -0.01, 0.0, 0.0, -0.5]])
    # means: 0.04 -> 0.1, -0.03 -> -0.1, 0.25 kept, exactly 0 kept (no sign, as the authors'), -0.1 kept.
    c = init_center(phi, eps=0.1)
    torch.testing.assert_close(c, torch.tensor([0.1, -0.1, 0.25, 0.0, -0.1]))


def test_centre_is_the_mean_embedding_of_every_training_image(separable_task, monkeypatch):
    """c = mean of phi(x) over ALL training images (eval mode, the network as it is right after
    pretraining and the encoder copy), then the eps rule; recomputed here from a snapshot of that network."""
    normal, others, _ = separable_task(n_train=16, n_test_normal=0, n_test_anomalous=32, seed=3)
    # 48 images; the 32 after the first 16 show the inverted pattern, so a centre taken over a
    # prefix of the set is far from the full-set centre.
    X_train = np.concatenate([normal, others])
    snapshot: dict = {}
    original = DeepSVDD._init_center

    def spy(self, x_train):
        snapshot["net"] = copy.deepcopy(self.net_)
        original(self, x_train)

    monkeypatch.setattr(DeepSVDD, "_init_center", spy)
    eps = 1e-3  # the embeddings here are ~0.05: a small eps leaves most entries to the mean
    det = DeepSVDD(**TINY, max_steps=2, ae_max_steps=2, center_eps=eps).fit(X_train)

    net = snapshot["net"].eval()
    with torch.no_grad():
        phi = net(det._preprocess(torch.from_numpy(X_train)))
    assert phi.shape == (48, 32)

    def centre(rows: torch.Tensor) -> torch.Tensor:
        c = rows.mean(dim=0)
        return torch.where(c.abs() < eps, torch.sign(c) * eps, c)  # sign(0) = 0: an exact 0 stays 0

    expected = centre(phi)
    assert (centre(phi[:16]) - expected).abs().max() > 1e-3  # 1000 x atol: a prefix's centre cannot pass
    torch.testing.assert_close(det.c_, expected, rtol=1e-5, atol=1e-6)


def test_scheduler_quirk():
    # The authors step the scheduler at the start of each epoch: milestone 50 decays in epoch 50.
    assert lr_factor(49, (50,), True) == 1.0 and lr_factor(50, (50,), True) == pytest.approx(0.1)
    assert lr_factor(50, (50,), False) == 1.0 and lr_factor(51, (50,), False) == pytest.approx(0.1)
    assert lr_factor(300, (50, 250), True) == pytest.approx(0.01)


@pytest.mark.parametrize("net_cls,ae_cls,shape,rep_dim", [(MNISTLeNet, MNISTLeNetAE, (1, 28, 28), 32),
                                                          (CIFARLeNet, CIFARLeNetAE, (3, 32, 32), 128)])
def test_networks_and_encoder_copy_with_batchnorm_statistics(net_cls, ae_cls, shape, rep_dim):
    torch.manual_seed(0)
    ae, net = ae_cls(), net_cls()
    x = torch.rand(8, *shape)
    ae.train()
    x_hat = ae(x)  # also moves the BatchNorm running statistics away from (0, 1)
    assert x_hat.shape == x.shape and ((x_hat > 0) & (x_hat < 1)).all()  # sigmoid output
    assert all(p.dim() > 1 for p in net.parameters())  # bias-free, BN without affine parameters
    copy_encoder_state(ae, net)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, ae.state_dict()[name])
    running_means = [v for k, v in net.state_dict().items() if k.endswith("running_mean")]
    assert len(running_means) == (2 if rep_dim == 32 else 3)
    assert all(v.abs().sum() > 0 for v in running_means)
    ae.eval(), net.eval()
    assert net(x).shape == (8, rep_dim)
    expected = ae.features(x) if hasattr(ae, "features") else MNISTLeNet.forward(ae, x)
    torch.testing.assert_close(net(x), expected)


@pytest.mark.parametrize("channels,size,objective", [(1, 28, "one-class"), (3, 32, "one-class"),
                                                     (1, 28, "soft-boundary")])
def test_centre_and_score_of_both_objectives(separable_task, channels, size, objective):
    X_train, X_test, _ = separable_task(n_train=32, n_test_normal=5, n_test_anomalous=5, channels=channels, size=size)
    det = DeepSVDD(**TINY, objective=objective, warm_up_epochs=0).fit(X_train)
    scores = det.decision_function(X_test)
    assert det.c_.shape == ((32,) if channels == 1 else (128,))
    assert (det.c_.abs() >= 0.1).all()
    x = det._preprocess(torch.from_numpy(X_test))
    with torch.no_grad():
        dist = ((det.net_(x) - det.c_) ** 2).sum(dim=1)
    if objective == "soft-boundary":
        assert det.R_.item() > 0
        dist = dist - det.R_ ** 2
    else:
        assert (scores >= 0).all()
    np.testing.assert_allclose(scores, dist.double().numpy(), rtol=1e-5)


def test_unsupported_image_shape_is_a_value_error(separable_task):
    X_train, _, _ = separable_task(n_train=8, size=32)  # 1 x 32 x 32: no authors' network
    with pytest.raises(ValueError, match="1x28x28 and 3x32x32"):
        DeepSVDD(**TINY).fit(X_train)


def test_profiles_and_defaults():
    paper = DeepSVDD(**PROFILES["paper"]["cifar10"])
    assert (paper.ae_epochs, paper.ae_lr_milestones, paper.ae_weight_decay) == (350, (250,), 5e-7)
    default = DeepSVDD()
    assert (default.lr, default.batch_size, default.weight_decay, default.epochs) == (1e-4, 200, 5e-7, 150)
