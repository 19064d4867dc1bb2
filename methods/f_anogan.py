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

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from methods.base import (
    check_choice,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
)
from methods.blocks import DCGANDecoder, DCGANFeatures, batch_norm, layer_norm
from methods.engine import Job, OptimiserSpec, ParamGroup, Phase, Stage, StagePlan, StageResult, in_vmap
from methods.preprocess import resize, to_minus_one_one
from methods.torch_base import TorchDetector, init_dcgan_weights

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

    # Measured (issue 20): reports/published/quick-bf16-fidelity-mnist (fp32 vs bf16 AUROC, quick MNIST, seeds
    # 0-2) and reports/published/speed-cpu (training img/s, 2 threads, idle machine).
    # bf16: AUROC within seed noise (-0.0003, p = 0.90); bf16 channels-last 1.17x over fp32 channels-last
    # (3866 vs 3313 img/s).
    default_precision = "bf16"
    default_memory_format = "channels_last"

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

    def _encoder_loss(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2's izi_f loss on a batch, and the logged [loss, img_mse, feat_mse]."""
        G, D, E = self.netG_, self.netD_, self.netE_
        rec = G(E(real))
        img, feat = izif_terms(real, rec, D(real)[1], D(rec)[1])
        img, feat = img.mean(), feat.mean()
        loss = img + self.kappa * feat
        return loss, torch.stack([loss, img, feat])

    # ---- the training, described once for the engine (methods/engine/) ----
    def _flipped(self, x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        return apply_flips(x, flip) if self.hflip else x

    def _critic_step(self, x: torch.Tensor, flip: torch.Tensor, z: torch.Tensor,
                     alpha: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], list]:
        loss_d, values = self._critic_loss(self._flipped(x, flip), z, alpha, functional=in_vmap())
        return [loss_d], dict(zip(self._gan_names[:3], values.unbind())), []

    def _generator_step(self, x: torch.Tensor, z: torch.Tensor) -> tuple[list[torch.Tensor], dict, list]:
        loss_g = self._generator_loss(z)
        return [loss_g], {"generator_loss": loss_g}, []

    def _encoder_step(self, x: torch.Tensor, flip: torch.Tensor) -> tuple[list[torch.Tensor], dict, list]:
        loss, values = self._encoder_loss(self._flipped(x, flip))
        return [loss], dict(zip(self._encoder_names, values.unbind())), []

    def _stage_plans(self, n_train: int) -> list[StagePlan]:
        """Both stages, described once for any number of jobs. Stage 1 per step: the critic update,
        then, on every n_critic-th critic step of the job, a generator update computed after it (a
        phase of its own: captured in its own CUDA graph, statistics under "gan_generator"). Stage 2:
        the izi_f step with RMSprop on E alone, epochs numbered on from the job's stage 1. Every
        random draw (flips, z, alpha) comes from the job's own generator in the solo order."""
        gan_stage, encoder_stage = self._stages(n_train)
        adam = OptimiserSpec("adam", self.gan_lr, (self.gan_beta1, self.gan_beta2))

        def begin_gan(job: Job) -> None:
            job.detector.training_log_ = {"stage1": {}, "stage2": {}}
            job.detector._stage_name = "gan"

        def gan_end_epoch(job: Job, result: StageResult) -> None:
            job.detector.training_log_["stage1"] = {**result.history, "epochs": result.epochs,
                                                    "critic_steps": result.steps,
                                                    "generator_steps": result.steps // self.n_critic}

        def begin_encoder(job: Job) -> None:
            job.detector._stage_name = "encoder"
            job.detector.netG_.requires_grad_(False)  # G and D frozen; the engine's modes keep them in eval
            job.detector.netD_.requires_grad_(False)

        def encoder_end_epoch(job: Job, result: StageResult) -> None:
            job.detector.training_log_["stage2"] = {**result.history, "epochs": result.epochs,
                                                    "iterations": result.steps}

        critic = Phase(type(self)._critic_step, (ParamGroup(("netD_",), adam),),
                       draws=lambda det, n: (det._draw_flips(n), *det._critic_draws(n)))
        generator = Phase(type(self)._generator_step, (ParamGroup(("netG_",), adam),),
                          draws=lambda det, n: (det._noise(det.batch_size),), every=self.n_critic,
                          names=("generator_loss",), label="generator")
        encoder = Phase(type(self)._encoder_step, (ParamGroup(("netE_",), OptimiserSpec("rmsprop", self.encoder_lr)),),
                        draws=lambda det, n: (det._draw_flips(n),))
        return [StagePlan(gan_stage, ("netG_", "netD_"), (critic, generator), begin=begin_gan,
                          end_epoch=gan_end_epoch),
                StagePlan(encoder_stage, ("netG_", "netD_", "netE_"), (encoder,), begin=begin_encoder,
                          end_epoch=encoder_end_epoch, continue_epochs=True)]

    # ---- score ----
    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        rec = self.netG_(self.netE_(x))
        img, feat = izif_terms(x, rec, self.netD_(x)[1], self.netD_(rec)[1])
        return img + self.kappa * feat
