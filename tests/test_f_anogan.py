"""f-AnoGAN: the gradient penalty on a hand-checkable critic, the izi_f terms, the two-stage
training (G and the critic frozen in stage 2, epochs numbered over both stages), determinism with
random flips, the score. The checks every detector passes (score shape, batch-independent scores,
determinism, direction, divergence, the epoch callback, hyperparameter errors) are in
tests/test_detector_contract.py."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods.f_anogan as fa
from methods.base import DivergedError, TrainOptions
from methods.engine import fit_jobs
from methods.f_anogan import Critic, FAnoGAN, gradient_penalty, izif_terms

# Tiny networks and steps; the larger learning rates only make the tiny runs learn in seconds.
TINY = dict(ngf=8, ndf=8, latent_dim=8, batch_size=16, device="cpu")
SEPARABLE = dict(TINY, gan_epochs=16, n_critic=1, gan_lr=2e-3, gan_beta1=0.5, encoder_lr=1e-3, encoder_max_steps=30)
SMOKE = dict(TINY, gan_epochs=1, encoder_max_steps=3)


def test_gradient_penalty_linear_critic() -> None:
    # f(x) = w . x has gradient w everywhere, so GP = 10 (||w|| - 1)^2 = 10 (3 - 1)^2 = 40.
    w = torch.tensor([1.0, 2.0, 2.0, 0.0]).reshape(1, 2, 2)
    critic = lambda x: (x * w).flatten(1).sum(dim=1)  # noqa: E731
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    alpha = torch.rand(5, 1, 1, 1)
    gp = gradient_penalty(critic, real, fake, alpha, weight=10.0)
    assert gp.item() == pytest.approx(40.0, rel=1e-6)
    # A unit-norm w gives no penalty; the weight scales linearly.
    unit_critic = lambda x: (x * w / 3).flatten(1).sum(1)  # noqa: E731
    assert gradient_penalty(unit_critic, real, fake, alpha).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_penalty(critic, real, fake, alpha, weight=1.0).item() == pytest.approx(4.0, rel=1e-6)


def test_gradient_penalty_per_sample_quadratic_critic() -> None:
    # f(x) = ||x||^2 / 2 has gradient x: at the interpolates alpha * r + (1 - alpha) * f the
    # penalty is the mean over samples of 10 (||x_interp|| - 1)^2.
    real = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    fake = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    alpha = torch.tensor([[0.5], [0.25]])       # interpolates (2, 0) and (0, 3): norms 2 and 3
    gp = gradient_penalty(lambda x: 0.5 * x.pow(2).sum(dim=1), real, fake, alpha)
    assert gp.item() == pytest.approx(10.0 * ((2 - 1) ** 2 + (3 - 1) ** 2) / 2)
    # The penalty's gradient reaches the critic's parameters (create_graph=True).
    weight = torch.tensor([1.0, 1.0], requires_grad=True)
    gradient_penalty(lambda x: (x * weight).sum(dim=1), real, fake, alpha).backward()
    # GP = 10 (||w|| - 1)^2, d/dw = 20 (||w|| - 1) w / ||w||
    expected = 20 * (np.sqrt(2) - 1) / np.sqrt(2)
    np.testing.assert_allclose(weight.grad.numpy(), [expected, expected], rtol=1e-5)


def test_izif_terms_by_hand() -> None:
    x = torch.tensor([[[[1.0, -1.0], [0.0, 0.5]]]])
    rec = torch.tensor([[[[0.0, -1.0], [0.0, 0.5]]]])
    f_x, f_rec = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    img, feat = izif_terms(x, rec, f_x, f_rec)
    assert img.tolist() == [pytest.approx(0.25)] and feat.tolist() == [pytest.approx(2.0)]


def test_critic_has_no_batch_norm_and_returns_features() -> None:
    for norm in ("layer_norm", "none"):
        critic = Critic(32, 3, 8, norm)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())
        value, features = critic(torch.randn(4, 3, 32, 32))
        assert value.shape == (4,) and features.shape == (4, 32 * 16)
    # LayerNorm is per sample: a sample's critic value does not depend on its batch.
    critic = Critic(32, 1, 8, "layer_norm")
    x = torch.randn(6, 1, 32, 32)
    torch.testing.assert_close(critic(x)[0][:2], critic(x[:2])[0])


# One critic step in stage 1, one encoder step in stage 2: the encoder-loss tests need the three
# networks, not well-trained ones.
ENCODER = dict(TINY, image_size=16, gan_max_steps=1, encoder_max_steps=1)


def _izif_loss_by_hand(G: torch.nn.Module, D: torch.nn.Module, E: torch.nn.Module,
                       x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two izi_f terms of a batch, MSE(x, G(E(x))) and MSE(f(x), f(G(E(x)))), f = D's features.

    Parameters
    ----------
    G, D, E : torch.nn.Module
        Generator, critic (returns (value, features)) and encoder, in the modes wanted.
    x : torch.Tensor
        (B, C, H, W) preprocessed images.

    Returns
    -------
    (img, feat) : tuple of torch.Tensor
        The two scalar mean squared errors, each over the whole batch.
    """
    rec = G(E(x))
    return F.mse_loss(rec, x), F.mse_loss(D(rec)[1], D(x)[1])


def test_encoder_loss_is_image_mse_plus_kappa_feature_mse(separable_task) -> None:
    X_train, X_test, _ = separable_task(16, 8, 8, channels=1, size=28, seed=6)
    model = FAnoGAN(**ENCODER).fit(X_train)
    model._set_mode(train=False)  # E's BatchNorm on running statistics: the loss is a function of the batch
    x = model._preprocess(torch.from_numpy(X_test))
    with torch.no_grad():
        img, feat = (t.item() for t in _izif_loss_by_hand(model.netG_, model.netD_, model.netE_, x))
        losses = {}
        for kappa in (0.0, 1.0, 2.5):
            model.kappa = kappa
            loss, values = model._encoder_loss(x)
            losses[kappa] = loss.item()
            assert loss.item() == pytest.approx(img + kappa * feat, rel=1e-5)
            np.testing.assert_allclose(values.numpy(), [img + kappa * feat, img, feat], rtol=1e-5)
    assert losses[2.5] - losses[1.0] == pytest.approx(1.5 * feat, rel=1e-4)
    assert losses[1.0] - losses[0.0] == pytest.approx(feat, rel=1e-4)
    assert feat > 0.01 * img > 0  # the feature term is not negligible here


@pytest.mark.parametrize("kappa", [1.0, 4.0])
def test_encoder_step_follows_the_gradient_of_the_izif_loss(separable_task, monkeypatch, kappa) -> None:
    """The gradient RMSProp applies to E is that of img + kappa * feat, recomputed here from the
    networks as they were at that step (G and D frozen in eval mode, E in train mode)."""
    X_train, _, _ = separable_task(16, 0, 0, channels=1, size=28, seed=7)
    model = FAnoGAN(**ENCODER, kappa=kappa)
    seen: dict = {}
    rmsprop_step = torch.optim.RMSprop.step

    def spy(self, *args, **kwargs):
        seen["grads"] = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        seen["nets"] = copy.deepcopy((model.netG_, model.netD_, model.netE_))  # before the update
        return rmsprop_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.RMSprop, "step", spy)
    # stage 2: one step on a batch of all 16 images; in fp32, as the gradient recomputed below
    assert fit_jobs([model], [X_train], options=TrainOptions(precision="fp32")) == [None]
    G, D, E = seen["nets"]
    params = list(E.parameters())
    assert len(params) == len(seen["grads"])
    # The batch is every image; the loss (BatchNorm batch statistics included) does not depend on their order.
    x = model._preprocess(torch.from_numpy(X_train))
    img, feat = _izif_loss_by_hand(G.eval(), D.eval(), E.train(), x)
    grad_img = torch.autograd.grad(img, params, retain_graph=True)
    grad_feat = torch.autograd.grad(feat, params)

    def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
        return max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))

    full = [a + kappa * b for a, b in zip(grad_img, grad_feat)]
    assert relative_error(seen["grads"], full) < 1e-4
    assert relative_error(grad_img, full) > 0.05  # without the feature term the gradient is far off
    assert relative_error([a + (kappa + 1) * b for a, b in zip(grad_img, grad_feat)], full) > 0.01


@pytest.fixture(scope="module", params=[(1, 28), (3, 32)], ids=["1x28x28", "3x32x32"])
def fitted(request):
    from conftest import make_separable_task

    channels, size = request.param
    X_train, _, _ = make_separable_task(48, 0, 0, channels, size, seed=0)
    return FAnoGAN(**SEPARABLE).fit(X_train)


def test_training_log(fitted) -> None:
    model = fitted
    log = model.training_log_
    # 48 images at batch 16: 3 critic batches per epoch, each followed by a generator step
    assert log["stage1"]["critic_steps"] == log["stage1"]["generator_steps"] == 16 * 3
    assert log["stage2"]["iterations"] == 30 and len(log["stage2"]["loss"]) == log["stage2"]["epochs"] == 10


def test_deterministic_under_seed_with_hflip(separable_task) -> None:
    X_train, X_test, _ = separable_task(32, 4, 4, channels=1, size=28, seed=1)
    runs = [FAnoGAN(**SMOKE, hflip=True, random_state=3).fit(X_train).decision_function(X_test) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    other = FAnoGAN(**SMOKE, hflip=True, random_state=4).fit(X_train).decision_function(X_test)
    assert not np.array_equal(runs[0], other)


def test_stage_two_freezes_generator_and_critic(separable_task, monkeypatch) -> None:
    X_train, _, _ = separable_task(32, 4, 4, channels=3, size=32, seed=2)
    snapshots = {}
    original = FAnoGAN._stage_plans

    def plans_with_a_snapshot(self, n_train):
        gan_plan, encoder_plan = original(self, n_train)

        def begin(job):  # as the encoder stage starts: G and D as stage 1 left them
            snapshots["before"] = {k: v.clone() for net in (job.detector.netG_, job.detector.netD_)
                                   for k, v in net.state_dict().items()}
            encoder_plan.begin(job)

        return [gan_plan, dataclasses.replace(encoder_plan, begin=begin)]

    monkeypatch.setattr(FAnoGAN, "_stage_plans", plans_with_a_snapshot)
    model = FAnoGAN(**SMOKE).fit(X_train)
    after = {k: v for net in (model.netG_, model.netD_) for k, v in net.state_dict().items()}
    assert snapshots["before"]
    for key, value in snapshots["before"].items():  # weights AND BatchNorm running statistics
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)


def test_divergence_in_the_encoder_stage_is_numbered_after_the_gan_epochs(separable_task, monkeypatch) -> None:
    # (A non-finite loss in the first stage, and a huge learning rate in either: the contract tests.)
    X_train, _, _ = separable_task(32, 4, 4, channels=1, size=28, seed=0)
    monkeypatch.setattr(fa, "izif_terms", lambda x, rec, *a: ((rec - x).flatten(1).mean(1) * float("nan"),) * 2)
    with pytest.raises(DivergedError) as info:
        FAnoGAN(**SMOKE).fit(X_train)
    assert info.value.epoch == 2


@pytest.mark.parametrize("kappa", [1.0, 2.5])
def test_score_is_image_residual_plus_kappa_feature_residual(separable_task, kappa) -> None:
    """The izi_f score recomputed by hand from the trained networks: dropping (or mis-weighting)
    the feature-residual term fails this test."""
    X_train, X_test, _ = separable_task(32, 4, 4, channels=1, size=28, seed=0)
    model = FAnoGAN(**SMOKE, kappa=kappa).fit(X_train)
    scores = model.decision_function(X_test)
    with torch.inference_mode():
        x = model._preprocess(torch.from_numpy(X_test))
        rec = model.netG_(model.netE_(x))
        image_residual = ((x - rec) ** 2).flatten(1).mean(dim=1).double().numpy()
        feature_residual = ((model.netD_(x)[1] - model.netD_(rec)[1]) ** 2).flatten(1).mean(dim=1).double().numpy()
    assert (feature_residual > 1e-6).all()  # the feature term is not negligible here
    np.testing.assert_allclose(scores, image_residual + kappa * feature_residual, rtol=1e-5)
    assert not np.allclose(scores, image_residual, rtol=1e-3)
