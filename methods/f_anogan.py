"""f-AnoGAN (Schlegl et al. 2019) at 32 x 32 with DCGAN-sized networks (docs/baselines.md, f-AnoGAN).

Two stages, trained one after the other on the normal images (scaled to [-1, 1], MNIST-like
images resized 28 -> 32):

1. WGAN-GP (Gulrajani et al. 2017): generator G: z ~ N(0, I_128) -> image (the DCGAN decoder of
   methods/blocks.py) and critic D = DCGAN feature pyramid (LayerNorm or no normalisation, never
   BatchNorm: it couples the samples of a batch and breaks the per-sample gradient penalty)
   + one linear layer. Critic loss D(fake) - D(real) + 10 * (||grad D(x_interp)|| - 1)^2,
   5 critic steps per generator step, generator loss -D(G(z)); Adam lr 1e-4, betas (0, 0.9),
   batch 64. The budget is counted as the authors count it: epochs of CRITIC batches, so one
   epoch of N images is N / 64 critic steps and about N / 320 generator steps.
2. izi_f encoder: a separate, freshly initialised encoder E (the critic's pyramid with BatchNorm,
   then linear + tanh -> 128) trained with G (BatchNorm in inference mode) and D frozen on
   loss = MSE(x, G(E(x))) + kappa * MSE(f(x), f(G(E(x)))), f = the critic's features before
   its last linear layer; RMSProp lr 5e-5, 50,000 iterations at batch 64.

Score of an image: the same two terms for that image, MSE_img + kappa * MSE_feat.

Choices written down (the authors' TensorFlow code works at 64 x 64 with 4-block ResNets):
* DCGAN-sized networks at 32 x 32 (ngf = ndf = 64); init N(0, 0.02) for convs (DCGAN), PyTorch's
  default for the linear layers.
* Random horizontal flips (p 0.5) in both stages are the authors' augmentation; they are a
  constructor argument here (`hflip`) and OFF for digits (a mirrored digit is not a digit of the
  class: flipping would teach the model that mirrored shapes are normal), ON for Fashion-MNIST
  and CIFAR-10, whose objects are (roughly) mirror-symmetric classes.
* RMSProp with PyTorch's defaults (alpha 0.99, eps 1e-8) besides the learning rate.
* Stage 2's iterations run as consecutive shuffled epochs (last incomplete batch dropped),
  stopping after exactly `encoder_max_steps` steps.
* The per-epoch callback (a diagnostic) runs only in stage 2 (before it the encoder is
  untrained); epochs are numbered continuously over both stages (stage 2's first epoch is
  gan_epochs + 1).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from methods.base import (
    DivergedError,
    EpochCallback,
    check_choice,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
)
from methods.blocks import DCGANDecoder, DCGANFeatures, batch_norm, layer_norm
from methods.preprocess import resize, to_minus_one_one
from methods.stacking import StackedAdam, StackedModules, StackedRMSprop, graphed_step, job_draws, train_stacked_stage
from methods.torch_base import Stage, StageResult, TorchDetector, init_dcgan_weights

# paper: the authors' budgets, 7 critic-batch epochs of WGAN-GP and 50,000 encoder iterations,
# published for their retinal OCT data (far more images than one class here): at N = 6000 images,
# 7 epochs are only ~130 generator steps. Kept as published; `gan_max_steps` exists to cap,
# nothing to extend. Flips off for digits only (module doc).
# quick: a CPU budget for one MNIST class (~6000 train + ~6000 test images, 2 threads, target
# ~45 s): ngf = ndf = 16, 6 critic-batch epochs (~550 critic / ~110 generator steps), 600 encoder
# iterations. Measured on real MNIST with ONE thread on a loaded machine: class 0 58.8 s
# (fit 57.1 + score 1.7), class 8 62.3 s; two threads on an idle machine should be ~35-45 s.
PROFILES: dict = {
    "paper": {
        "mnist": {"hflip": False},
        "fashion_mnist": {"hflip": True},
        "cifar10": {"hflip": True},
        # "*" (methods.DEFAULT): unknown datasets get MNIST's setting, flips off: a flip can change
        # a class (a mirrored digit), so flipping is opted into per dataset.
        "*": {"hflip": False},
    },
    "quick": {
        "mnist": {"hflip": False, "ngf": 16, "ndf": 16, "gan_epochs": 6, "encoder_max_steps": 600},
        "fashion_mnist": {"hflip": True, "ngf": 16, "ndf": 16, "gan_epochs": 6, "encoder_max_steps": 600},
        "cifar10": {"hflip": True, "ngf": 16, "ndf": 16, "gan_epochs": 6, "encoder_max_steps": 600},
        "*": {"hflip": False, "ngf": 16, "ndf": 16, "gan_epochs": 6, "encoder_max_steps": 600},  # MNIST's
    },
    # Every dataset: narrow networks for a few steps, for the end-to-end tests.
    "smoke": {"*": {"ngf": 8, "ndf": 8, "latent_dim": 16, "batch_size": 16, "gan_epochs": 1,
                    "gan_max_steps": 10, "encoder_max_steps": 4}},
}


# ---- networks ------------------------------------------------------------------------------
class Critic(nn.Module):
    """WGAN critic: DCGAN feature pyramid (no BatchNorm) -> flatten -> linear.

    Parameters
    ----------
    isize : int
        Image size (a power of two).
    nc : int
        Input channels.
    ndf : int
        Base width of the pyramid.
    norm : str
        "layer_norm" or "none" (then the convs have their own bias).
    """

    def __init__(self, isize: int, nc: int, ndf: int, norm: str) -> None:
        super().__init__()
        # Without a normalisation layer the convs need their own bias.
        self.features = DCGANFeatures(isize, nc, ndf, norm=layer_norm if norm == "layer_norm" else None,
                                      bias=norm == "none")
        self.linear = nn.Linear(self.features.out_channels * 16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Critic value and features of a batch.

        Parameters
        ----------
        x : torch.Tensor
            (B, nc, isize, isize) images in [-1, 1].

        Returns
        -------
        (value, features) : tuple of torch.Tensor
            Critic value (B,) and features f(x) (B, C*4*4) before the last linear layer.
        """
        features = self.features(x).flatten(1)
        return self.linear(features).reshape(-1), features


class Encoder(nn.Module):
    """izi_f encoder: the critic's pyramid with BatchNorm -> flatten -> linear -> tanh.

    Parameters
    ----------
    isize : int
        Image size (a power of two).
    nc : int
        Input channels.
    ndf : int
        Base width of the pyramid.
    latent_dim : int
        Size of the code z.
    """

    def __init__(self, isize: int, nc: int, ndf: int, latent_dim: int) -> None:
        super().__init__()
        self.features = DCGANFeatures(isize, nc, ndf, norm=batch_norm)
        self.linear = nn.Linear(self.features.out_channels * 16, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a batch: (B, nc, isize, isize) images -> (B, latent_dim) codes in (-1, 1)."""
        return torch.tanh(self.linear(self.features(x).flatten(1)))


# ---- losses ----------------------------------------------------------------------------------
def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor, weight: float = 10.0, functional: bool = False) -> torch.Tensor:
    """WGAN-GP penalty weight * mean_i (||grad_x D(x_i)||_2 - 1)^2 (Gulrajani et al. 2017, eq. 3).

    Taken at x_i = alpha_i real_i + (1 - alpha_i) fake_i.

    Parameters
    ----------
    critic : callable
        Maps (B, ...) -> (B,).
    real, fake : torch.Tensor
        (B, ...) real and generated images (detached here).
    alpha : torch.Tensor
        Broadcasts against the images (e.g. (B, 1, 1, 1), drawn U[0, 1]).
    weight : float
        lambda_GP (default 10).
    functional : bool
        Take grad_x D with torch.func.grad (works inside torch.func.vmap, where torch.autograd.grad
        does not, and stays differentiable by the outer backward pass) instead of torch.autograd.grad.

    Returns
    -------
    torch.Tensor
        The scalar penalty (differentiable w.r.t. the critic's parameters).
    """
    interp = alpha * real.detach() + (1.0 - alpha) * fake.detach()
    if functional:
        grad = torch.func.grad(lambda v: critic(v).sum())(interp)
    else:
        (grad,) = torch.autograd.grad(critic(interp.requires_grad_(True)).sum(), interp, create_graph=True)
    return weight * ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def izif_terms(x: torch.Tensor, rec: torch.Tensor, f_x: torch.Tensor,
               f_rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample izi_f terms. Loss = batch mean of img + kappa * feat; score = per sample.

    Parameters
    ----------
    x, rec : torch.Tensor
        (B, C, H, W) images and their reconstructions G(E(x)).
    f_x, f_rec : torch.Tensor
        (B, F) the critic's features of both.

    Returns
    -------
    (img, feat) : tuple of torch.Tensor
        Each (B,): mean over pixels of (x - G(E(x)))^2, mean over features of (f(x) - f(G(E(x))))^2.
    """
    return (x - rec).pow(2).flatten(1).mean(dim=1), (f_x - f_rec).pow(2).flatten(1).mean(dim=1)


def apply_flips(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror (last axis) the images of a batch where `flip` (B,) is True.

    Parameters
    ----------
    x : torch.Tensor
        (B, C, H, W) images.
    flip : torch.Tensor
        (B,) bool.

    Returns
    -------
    torch.Tensor
        The batch, flipped images mirrored.
    """
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ---- detector ---------------------------------------------------------------------------------
class FAnoGAN(TorchDetector):
    """f-AnoGAN with the izi_f encoder.

    All defaults are the authors' published settings (docs/baselines.md) except the networks
    (DCGAN-sized for 32 x 32) and `hflip` (see the module docstring).

    Parameters
    ----------
    latent_dim : int
        Size of z, 128 (authors).
    ngf : int
        64 (DCGAN size, our choice at 32 x 32).
    ndf : int
        64 (idem; also the encoder's width).
    image_size : int
        32: MNIST-like images resized 28 -> 32 (a power of two >= 16).
    critic_norm : str
        "layer_norm" (authors' critic) or "none".
    batch_size : int
        64 (authors), both stages.
    gan_epochs : int
        7 epochs counted in critic batches (authors).
    gan_max_steps : int or None
        Optional cap on stage 1, in critic steps (None = no cap).
    n_critic : int
        5 critic steps per generator step.
    gp_weight : float
        lambda_GP = 10.
    gan_lr, gan_beta1, gan_beta2 : float
        Adam 1e-4, betas (0, 0.9).
    encoder_max_steps : int
        50,000 iterations at batch 64 (authors).
    encoder_lr : float
        RMSProp 5e-5 (authors).
    kappa : float
        1 (authors), weight of the feature term.
    hflip : bool
        Random horizontal flips (authors: True; here off for digits).
    random_state : int
        Seed of the initialisation and the shuffling (default 0).
    device : str
        'auto', 'cpu', 'cuda' or 'cuda:N' (default 'auto'; see `resolve_device`).
    score_batch_size : int
        Images per scoring batch (default 1024).
    """

    def __init__(self, latent_dim: int = 128, ngf: int = 64, ndf: int = 64, image_size: int = 32,
                 critic_norm: str = "layer_norm", batch_size: int = 64,
                 gan_epochs: int = 7, gan_max_steps: Optional[int] = None, n_critic: int = 5,
                 gp_weight: float = 10.0, gan_lr: float = 1e-4, gan_beta1: float = 0.0, gan_beta2: float = 0.9,
                 encoder_max_steps: int = 50_000, encoder_lr: float = 5e-5, kappa: float = 1.0,
                 hflip: bool = False, random_state: int = 0, device: str = "auto",
                 score_batch_size: int = 1024) -> None:
        self.latent_dim = latent_dim                    # 128 (authors)
        self.ngf = ngf                                  # 64 (DCGAN size, our choice at 32 x 32)
        self.ndf = ndf                                  # 64 (idem; also the encoder's width)
        self.image_size = image_size                    # 32: MNIST-like images resized 28 -> 32
        self.critic_norm = critic_norm                  # "layer_norm" (authors' critic) or "none"
        self.batch_size = batch_size                    # 64 (authors), both stages
        self.gan_epochs = gan_epochs                    # 7 epochs counted in critic batches (authors)
        self.gan_max_steps = gan_max_steps              # optional cap on stage 1, in critic steps (None = no cap)
        self.n_critic = n_critic                        # 5 critic steps per generator step
        self.gp_weight = gp_weight                      # lambda_GP = 10
        self.gan_lr = gan_lr                            # Adam 1e-4, betas (0, 0.9)
        self.gan_beta1 = gan_beta1
        self.gan_beta2 = gan_beta2
        self.encoder_max_steps = encoder_max_steps      # 50,000 iterations at batch 64 (authors)
        self.encoder_lr = encoder_lr                    # RMSProp 5e-5 (authors)
        self.kappa = kappa                              # 1 (authors), weight of the feature term
        self.hflip = hflip                              # authors: True; here off for digits
        self.random_state = random_state
        self.device = device
        self.score_batch_size = score_batch_size

    def _check_params(self) -> None:
        for name in ("latent_dim", "ngf", "ndf", "batch_size", "gan_epochs", "n_critic", "encoder_max_steps"):
            check_positive_int(name, getattr(self, name))
        if self.gan_max_steps is not None:
            check_positive_int("gan_max_steps", self.gan_max_steps)
        check_positive_int("image_size", self.image_size)
        if self.image_size < 16 or self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 16, got {self.image_size!r}")
        check_choice("critic_norm", self.critic_norm, ("layer_norm", "none"))
        check_nonneg_float("gp_weight", self.gp_weight)
        check_positive_float("gan_lr", self.gan_lr)
        check_positive_float("encoder_lr", self.encoder_lr)
        check_nonneg_float("kappa", self.kappa)
        for name in ("gan_beta1", "gan_beta2"):
            value = getattr(self, name)
            check_nonneg_float(name, value)
            if value >= 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"hflip must be True or False, got {self.hflip!r}")

    # ---- data ----
    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return to_minus_one_one(resize(x, self.image_size))

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hflip:
            return x
        return apply_flips(x, self._draw_flips(x.shape[0]))

    def _draw_flips(self, n: int) -> torch.Tensor:
        """(n,) bool, which images of a batch to mirror (p 0.5), from the shuffling generator; all
        False without `hflip` (then nothing is drawn)."""
        if not self.hflip:
            return torch.zeros(n, dtype=torch.bool, device=self.device_)
        return torch.rand(n, generator=self.generator_, device=self.device_) < 0.5

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=self.generator_, device=self.device_)

    def _networks(self) -> Iterable[nn.Module]:
        return [net for net in (getattr(self, name, None) for name in ("netG_", "netD_", "netE_")) if net is not None]

    # ---- training ----
    def _build_networks(self, x_train: torch.Tensor) -> None:
        """G, D and E, initialised (from the global RNG, seeded by fit) in that order, on the device."""
        nc = x_train.shape[1]
        self.netG_ = DCGANDecoder(self.image_size, nc, self.latent_dim, self.ngf).to(self.device_)
        self.netD_ = Critic(self.image_size, nc, self.ndf, self.critic_norm).to(self.device_)
        self.netE_ = Encoder(self.image_size, nc, self.ndf, self.latent_dim).to(self.device_)
        for net in self._networks():
            net.apply(init_dcgan_weights)

    def _fit(self, x_train: torch.Tensor, epoch_callback: Optional[EpochCallback]) -> None:
        self._build_networks(x_train)
        self.training_log_ = {"stage1": {}, "stage2": {}}
        gan_stage, encoder_stage = self._stages(len(x_train))
        self._stage_name = "gan"
        result = self._train_gan(x_train, gan_stage)
        self._stage_name = "encoder"
        self._train_encoder(x_train, Stage(**{**vars(encoder_stage), "first_epoch": result.last_epoch + 1}),
                            epoch_callback)

    def _stages(self, n_train: int) -> list[Stage]:
        # Stage 1 counts critic steps (5 per generator step); the callback runs in stage 2 only.
        return [Stage("gan", self.batch_size, epochs=self.gan_epochs, max_steps=self.gan_max_steps,
                      epoch_callback=False, max_steps_param="gan_max_steps", epochs_param="gan_epochs",
                      period=self.n_critic),
                Stage("encoder", self.batch_size, epochs=None, max_steps=self.encoder_max_steps,
                      max_steps_param="encoder_max_steps", epochs_param=None)]

    def _set_mode(self, train: bool) -> None:
        super()._set_mode(train)
        if train and getattr(self, "_stage_name", None) == "encoder":
            self.netG_.eval()  # stage 2: G stays in BatchNorm inference mode, D is frozen
            self.netD_.eval()

    def _train_gan(self, x: torch.Tensor, stage: Stage) -> StageResult:
        """Stage 1, WGAN-GP."""
        G, D = self.netG_, self.netD_
        G.train()
        D.train()
        opt_g = torch.optim.Adam(G.parameters(), lr=self.gan_lr, betas=(self.gan_beta1, self.gan_beta2))
        opt_d = torch.optim.Adam(D.parameters(), lr=self.gan_lr, betas=(self.gan_beta1, self.gan_beta2))
        generator_steps = [0, 0]  # in all, in this epoch
        zero = torch.zeros((), device=self.device_)

        def begin_epoch(epoch: int) -> None:
            generator_steps[1] = 0

        def step(idx: torch.Tensor, critic_steps: int) -> torch.Tensor:
            real = self._augment(x[idx])
            loss_d, values = self._critic_loss(real, *self._critic_draws(len(idx)))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            loss_g = zero
            if critic_steps % self.n_critic == 0:
                D.requires_grad_(False)
                loss_g = self._generator_loss(self._noise(self.batch_size))
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                D.requires_grad_(True)
                generator_steps[0] += 1
                generator_steps[1] += 1
            return torch.cat([values, loss_g.reshape(1)]).detach()

        def epoch_means(sums: torch.Tensor, n_d: int) -> list[float]:
            return self._gan_epoch_means(sums, n_d, generator_steps[1])

        result = self._train_stage(stage, len(x), step, self._gan_names, None, begin_epoch, epoch_means=epoch_means)
        self.training_log_["stage1"] = {**result.history, "epochs": result.epochs, "critic_steps": result.steps,
                                        "generator_steps": generator_steps[0]}
        return result

    _gan_names = ("critic_loss", "wasserstein", "gradient_penalty", "generator_loss")
    _encoder_names = ("loss", "img_mse", "feat_mse")

    def _critic_draws(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A critic step's draws after the flips, in the solo step's order: z for G, then alpha."""
        z = self._noise(n)
        return z, torch.rand(n, 1, 1, 1, generator=self.generator_, device=self.device_)

    def _critic_loss(self, real: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor,
                     functional: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """WGAN-GP critic loss on real images and G(z) (G under no_grad, BatchNorm in train mode),
        and the logged [loss, wasserstein, gradient penalty]; `functional` as gradient_penalty's."""
        G, D = self.netG_, self.netD_
        with torch.no_grad():
            fake = G(z)
        wasserstein = D(real)[0].mean() - D(fake)[0].mean()
        gp = gradient_penalty(lambda v: D(v)[0], real, fake, alpha, self.gp_weight, functional)
        loss_d = gp - wasserstein
        return loss_d, torch.stack([loss_d, wasserstein, gp])

    def _generator_loss(self, z: torch.Tensor) -> torch.Tensor:
        """WGAN generator loss -mean D(G(z))."""
        return -self.netD_(self.netG_(z))[0].mean()

    def _gan_epoch_means(self, sums: torch.Tensor, n_critic_steps: int, n_generator_steps: int) -> list[float]:
        """Stage 1's epoch means: the critic values per critic step, the generator loss per generator step."""
        n_d, n_g = n_critic_steps, max(n_generator_steps, 1)
        return (sums / torch.tensor([n_d, n_d, n_d, n_g], device=sums.device)).tolist()

    def _encoder_loss(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2's izi_f loss on a batch, and the logged [loss, img_mse, feat_mse]."""
        G, D, E = self.netG_, self.netD_, self.netE_
        rec = G(E(real))
        img, feat = izif_terms(real, rec, D(real)[1], D(rec)[1])
        img, feat = img.mean(), feat.mean()
        loss = img + self.kappa * feat
        return loss, torch.stack([loss, img, feat])

    def _train_encoder(self, x: torch.Tensor, stage: Stage, epoch_callback: Optional[EpochCallback]) -> None:
        """Stage 2, izi_f: only E learns; G stays in BatchNorm inference mode, D is frozen."""
        G, D, E = self.netG_, self.netD_, self.netE_
        G.requires_grad_(False)
        D.requires_grad_(False)
        self._set_mode(train=True)
        opt = torch.optim.RMSprop(E.parameters(), lr=self.encoder_lr)

        def step(idx: torch.Tensor, step_number: int) -> torch.Tensor:
            loss, values = self._encoder_loss(self._augment(x[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return values.detach()

        result = self._train_stage(stage, len(x), step, self._encoder_names, epoch_callback)
        self.training_log_["stage2"] = {**result.history, "epochs": result.epochs, "iterations": result.steps}

    # ---- stacked training (methods/stacking.py) ---------------------------------------------
    @classmethod
    def _fit_stacked(cls, detectors: list["FAnoGAN"], xs: list[torch.Tensor],
                     callbacks: list[Optional[EpochCallback]], rng: Any) -> list[Optional[DivergedError]]:
        """K jobs as one batched model, both stages as the solo fit.

        Stage 1 per step: the critic update of every active job, then, for the jobs whose critic
        step count (per job) is a multiple of n_critic, a generator update computed after it (the
        other jobs' G BatchNorm statistics restored); with `cuda_graphs`, each of the two phases is
        captured (graph statistics under "gan" and "gan_generator"). Stage 2: the izi_f step with
        a stacked RMSprop, jobs grouped by the epoch their stage 1 ended (epochs are numbered on).
        Every random draw (flips, z, alpha) comes from the job's own generator, in the solo step's
        order and shapes, made outside vmap and passed in.
        """
        first, k_jobs = detectors[0], len(detectors)
        for det in detectors:
            det.training_log_ = {"stage1": {}, "stage2": {}}
            det._stage_name = "gan"
            det.netG_.train()
            det.netD_.train()
        gan_stage, encoder_stage = first._stages(min(len(x) for x in xs))
        stacked = StackedModules([{"g": det.netG_, "d": det.netD_} for det in detectors])
        template = copy.copy(first)  # runs the detector's own loss code on the template modules
        template.netG_, template.netD_ = stacked.template["g"], stacked.template["d"]
        g_params, d_params = stacked.group_params("g"), stacked.group_params("d")
        betas = (first.gan_beta1, first.gan_beta2)
        opt_g, opt_d = StackedAdam(g_params, first.gan_lr, betas), StackedAdam(d_params, first.gan_lr, betas)
        generator_steps = np.zeros(k_jobs, dtype=np.int64)  # in all
        epoch_generator_steps = np.zeros(k_jobs, dtype=np.int64)
        last_epoch = [0] * k_jobs
        device = first.device_

        def critic_fn(modules: nn.ModuleDict, x: torch.Tensor, flip: torch.Tensor, z: torch.Tensor,
                      alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return template._critic_loss(apply_flips(x, flip), z, alpha, functional=True)

        def critic_update(x: torch.Tensor, active_t: torch.Tensor, *draws: torch.Tensor) -> torch.Tensor:
            with first._autocast():
                loss_d, values = stacked.call(critic_fn, x, *draws)
                opt_d.zero_grad()
                loss_d.sum().backward(inputs=d_params)
            opt_d.step(active_t)
            return values.detach()

        def generator_update(z: torch.Tensor, due_t: torch.Tensor) -> torch.Tensor:
            snapshot = stacked.buffers_snapshot()  # G's BatchNorm statistics move for the due jobs only
            with first._autocast():
                loss_g = stacked.call(lambda modules, zk: template._generator_loss(zk), z)
                opt_g.zero_grad()
                loss_g.sum().backward(inputs=g_params)
            opt_g.step(due_t)
            stacked.restore_buffers(snapshot, due_t)
            return torch.where(due_t, loss_g.detach(), torch.zeros_like(loss_g))

        # Each phase is one function of device tensors (a CUDA graph each with cuda_graphs).
        critic_phase = graphed_step(detectors, critic_update, gan_stage.name)
        generator_phase = graphed_step(detectors, generator_update, gan_stage.name + "_generator")

        def gan_step(x: torch.Tensor, active: np.ndarray, active_t: torch.Tensor,
                     steps: np.ndarray) -> tuple[list, torch.Tensor]:
            n = x.shape[1]
            draws = job_draws(active, lambda k: (detectors[k]._draw_flips(n), *detectors[k]._critic_draws(n)))
            values = critic_phase(x, active_t, *draws)
            due = active & ((steps + 1) % first.n_critic == 0)  # the job's critic step count, 1-based
            loss_g = torch.zeros(k_jobs, dtype=values.dtype, device=device)
            if due.any():  # decided on the host from host counts: no device sync
                (z,) = job_draws(due, lambda k: (detectors[k]._noise(first.batch_size),))
                loss_g = generator_phase(z, torch.from_numpy(due).to(device))
                generator_steps[:] += due
                epoch_generator_steps[:] += due
            return [], torch.cat([values, loss_g[:, None]], dim=1)

        def begin_epoch(epoch: int) -> None:
            epoch_generator_steps[:] = 0

        def gan_means(k: int, sums: torch.Tensor, n_steps: int) -> list[float]:
            return first._gan_epoch_means(sums, n_steps, int(epoch_generator_steps[k]))

        def gan_end_epoch(k: int, epoch: int, steps: int, history: dict) -> None:
            last_epoch[k] = epoch
            detectors[k].training_log_["stage1"] = {**history, "epochs": epoch - gan_stage.first_epoch + 1,
                                                    "critic_steps": steps, "generator_steps": int(generator_steps[k])}

        errors = train_stacked_stage(detectors, xs, callbacks, gan_stage, stacked, None, [], first._gan_names,
                                     gan_end_epoch, begin_epoch=begin_epoch, step=gan_step, epoch_means=gan_means)
        for epoch in sorted({last_epoch[k] for k in range(k_jobs) if errors[k] is None}):
            jobs = [k for k in range(k_jobs) if errors[k] is None and last_epoch[k] == epoch]
            stage = Stage(**{**vars(encoder_stage), "first_epoch": epoch + 1})
            for k, error in zip(jobs, cls._fit_stacked_encoder([detectors[k] for k in jobs], [xs[k] for k in jobs],
                                                              [callbacks[k] for k in jobs], stage)):
                errors[k] = error
        return errors

    @staticmethod
    def _fit_stacked_encoder(detectors: list["FAnoGAN"], xs: list[torch.Tensor],
                             callbacks: list[Optional[EpochCallback]], stage: Stage) -> list[Optional[DivergedError]]:
        """Stage 2 of `_fit_stacked` for jobs whose stage 1 ended in the same epoch."""
        first = detectors[0]
        for det in detectors:
            det._stage_name = "encoder"
            det.netG_.requires_grad_(False)
            det.netD_.requires_grad_(False)
            det._set_mode(train=True)  # E trains, G in BatchNorm inference mode, D frozen
        stacked = StackedModules([{"g": det.netG_, "d": det.netD_, "e": det.netE_} for det in detectors])
        for key, p in stacked.params.items():
            if not key.startswith("e."):
                p.requires_grad_(False)
        template = copy.copy(first)
        template.netG_, template.netD_, template.netE_ = (stacked.template[name] for name in ("g", "d", "e"))
        e_params = stacked.group_params("e")

        def flips(active: np.ndarray, idx: list[torch.Tensor]) -> list[torch.Tensor]:
            return job_draws(active, lambda k: (detectors[k]._draw_flips(len(idx[k])),))

        def forward(modules: nn.ModuleDict, x: torch.Tensor, flip: torch.Tensor) -> tuple[list, torch.Tensor]:
            loss, values = template._encoder_loss(apply_flips(x, flip))
            return [loss], values

        def end_epoch(k: int, epoch: int, steps: int, history: dict) -> None:
            detectors[k].training_log_["stage2"] = {**history, "epochs": epoch - stage.first_epoch + 1,
                                                    "iterations": steps}

        return train_stacked_stage(detectors, xs, callbacks, stage, stacked, forward,
                                   [(StackedRMSprop(e_params, first.encoder_lr), e_params)], first._encoder_names,
                                   end_epoch, inputs=flips)

    # ---- score ----
    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        rec = self.netG_(self.netE_(x))
        img, feat = izif_terms(x, rec, self.netD_(x)[1], self.netD_(rec)[1])
        return img + self.kappa * feat
