"""GANomaly (Akcay et al. 2018), docs/baselines.md "GANomaly": the authors' architecture, losses and
settings, written anew on the shared DCGAN blocks (methods/blocks.py).

Network (32 x 32 input; MNIST / Fashion-MNIST are resized 28 -> 32, every input is scaled to
[-1, 1] to match the Tanh decoder; the authors' code uses mean/std normalisation for MNIST):
    generator      x -> G_E -> z -> G_D -> x_hat -> E -> z_hat   (docs/method.md eqs. 1-3)
    discriminator  x -> (logit, f(x)), f = the 256 x 4 x 4 map before the last conv
Losses (authors' code): L_G = w_adv * mse(f(x), f(x_hat)) + w_con * l1(x, x_hat)
+ w_enc * mse(z, z_hat); L_D = (BCE(D(x), 1) + BCE(D(x_hat), 0)) / 2. Score = mean((z - z_hat)^2).

Per iteration, as the authors: one G step, then one D step on the fakes made before the G
update; D is re-initialised (its optimiser state kept) when its loss falls under 1e-5.
Because the D step uses the fakes and D weights of before the G step, both gradients come
from ONE forward pass: D runs once on x and once on x_hat. The real pass gives L_D(real) and,
detached, the feature-matching target f(x); the fake pass gives f(x_hat) for L_G (gradient to
G only) and L_D(fake) (gradient to D only). `backward(inputs=...)` keeps each loss's
gradient in its own network and skips the weight gradients nobody uses. anomalib's
training_step instead runs D three times (real, fake, fake again), back-propagates the G loss
through D's real pass and D's weights, and pads the first conv by 4 instead of 1.

Deliberately NOT copied from the authors' scripts (docs/baselines.md): the reverse protocol, picking
the best epoch by test AUC, and scoring in train mode. Here: a fixed budget, the final model,
scored once, in eval mode, so a score never depends on which images share its batch.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import (
    check_images,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
)
from methods.blocks import DCGANDecoder, DCGANDiscriminator, DCGANEncoder
from methods.engine import Job, OptimiserSpec, ParamGroup, Phase, Stage, StagePlan, StageResult, StepEvent
from methods.preprocess import resize, to_minus_one_one
from methods.torch_base import TorchDetector, init_dcgan_weights

IMAGE_SIZE = 32  # the authors' isize; MNIST and Fashion-MNIST are resized 28 -> 32

# GANomaly's budget is the authors' 15 epochs on every dataset (docs/baselines.md).
# quick: one epoch (~92 steps). Measured on real MNIST, 2 threads, this 2-core machine, idle:
# class 0 (5923 train / 5980 test images) fit 28.4 s + scoring 4.1 s = 32.5 s, AUROC 0.987;
# class 8: 33.7 s, AUROC 0.809. A second epoch would not fit the ~45 s per-class budget.
# smoke: a few steps on a small batch, for the end-to-end tests.
# Each profile has only the "*" default (methods.DEFAULT): the budget does not depend on the dataset.
PROFILES: dict = {
    "paper": {"*": {}},  # every dataset: the authors' 15 epochs (the constructor's defaults)
    "quick": {"*": {"epochs": 1}},  # every dataset: the one epoch measured on MNIST above
    "smoke": {"*": {"epochs": 1, "max_steps": 4, "batch_size": 16}},  # every dataset
}


class GANomaly(TorchDetector):
    """GANomaly with the authors' defaults.

    Parameters
    ----------
    epochs : int
        Training epochs (authors: 15), a fixed budget.
    batch_size : int
        Minibatch size (authors: 64); the last incomplete batch is dropped.
    lr, beta1, beta2 : float
        Adam settings of both G and D (authors: 2e-4, 0.5, 0.999).
    nz : int
        Bottleneck size (authors: 100).
    ngf, ndf : int
        Base widths of G and D (authors: 64).
    w_adv, w_con, w_enc : float
        Generator loss weights (authors: 1, 50, 1).
    d_reinit_threshold : float
        D is re-initialised when its loss falls below this (authors: 1e-5; 0 disables it).
    max_steps : int or None
        Optional cap on the total number of iterations (None: the full epochs); only the smoke
        profile uses it.
    random_state : int
        Seed of the initialisation and the shuffling (default 0; see TorchDetector).
    device : str
        'auto', 'cpu', 'cuda' or 'cuda:N' (default 'auto'; see `resolve_device`).
    score_batch_size : int
        Images per scoring batch; 256, because on the CPU 64-256 scored fastest (measured: ~1.3x
        faster than 2048); raise it on a GPU.
    """

    # Measured (issue 20): reports/published/quick-bf16-fidelity-mnist (fp32 vs bf16 AUROC, quick MNIST, seeds
    # 0-2) and reports/published/speed-cpu (training img/s, 2 threads, idle machine).
    # bf16: AUROC within seed noise (+0.009, Wilcoxon p = 0.17); channels-last: fp32 1.07x over NCHW, with
    # bf16 1.70x over fp32 channels-last (646 vs 381 img/s).
    default_precision = "bf16"
    default_memory_format = "channels_last"

    # Weight of L_D: GANomaly halves the sum of its two BCE terms.
    _d_loss_scale = 0.5
    # How often (in steps) to look at D's loss for the re-initialisation rule. Looking needs a
    # host sync: free on the CPU, so every step as the authors; on a GPU every 20 steps, on the
    # smallest D loss seen since the last look (so a collapse is never missed, only acted on
    # up to 19 steps later).
    _d_check_every = {"cpu": 1, "cuda": 20}

    def __init__(self, epochs: int = 15, batch_size: int = 64, lr: float = 2e-4, beta1: float = 0.5,
                 beta2: float = 0.999, nz: int = 100, ngf: int = 64, ndf: int = 64,
                 w_adv: float = 1.0, w_con: float = 50.0, w_enc: float = 1.0,
                 d_reinit_threshold: float = 1e-5, max_steps: Optional[int] = None,
                 random_state: int = 0, device: str = "auto", score_batch_size: int = 256) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.nz = nz
        self.ngf = ngf
        self.ndf = ndf
        self.w_adv = w_adv
        self.w_con = w_con
        self.w_enc = w_enc
        self.d_reinit_threshold = d_reinit_threshold
        self.max_steps = max_steps
        self.random_state = random_state
        self.device = device
        self.score_batch_size = score_batch_size

    # ---- hyperparameters ----------------------------------------------------------------------
    def _check_common_params(self) -> None:
        """Checks shared with Mem_GANomaly."""
        for name in ("epochs", "batch_size", "nz", "ngf", "ndf"):
            check_positive_int(name, getattr(self, name))
        check_positive_float("lr", self.lr)
        for name in ("beta1", "beta2"):
            check_nonneg_float(name, getattr(self, name))
            if getattr(self, name) >= 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        check_nonneg_float("d_reinit_threshold", self.d_reinit_threshold)
        if self.max_steps is not None:
            check_positive_int("max_steps", self.max_steps)

    def _check_params(self) -> None:
        self._check_common_params()
        for name in ("w_adv", "w_con", "w_enc"):
            check_nonneg_float(name, getattr(self, name))

    # ---- network ------------------------------------------------------------------------------
    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return to_minus_one_one(resize(x, IMAGE_SIZE))

    def _build_generator(self, nc: int) -> nn.ModuleDict:
        return nn.ModuleDict({
            "encoder": DCGANEncoder(IMAGE_SIZE, nc, self.nz, self.ndf),    # G_E (eq. 1)
            "decoder": DCGANDecoder(IMAGE_SIZE, nc, self.nz, self.ngf),    # G_D (eq. 2)
            "encoder2": DCGANEncoder(IMAGE_SIZE, nc, self.nz, self.ndf),   # E   (eq. 3)
        })

    def _networks(self) -> Iterable[nn.Module]:
        return (self.netg_, self.netd_)

    def _bottleneck(self, z: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What the decoder receives, and the memory addressing weights (none here)."""
        return z, None

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x -> (x_hat, z, z_hat, addressing weights or None); z, z_hat of shape (B, nz)."""
        z = self.netg_["encoder"](x).flatten(1)
        z_decoded, weights = self._bottleneck(z)
        x_hat = self.netg_["decoder"](z_decoded)
        z_hat = self.netg_["encoder2"](x_hat).flatten(1)
        return x_hat, z, z_hat, weights

    # ---- losses and score ---------------------------------------------------------------------
    def _generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, z_hat: torch.Tensor,
                        feat_real: torch.Tensor, feat_fake: torch.Tensor, logit_fake: torch.Tensor,
                        weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GANomaly's L_G; returns (total, the weighted-sum's terms unweighted, for the log)."""
        parts = {"adv": F.mse_loss(feat_fake, feat_real),
                 "con": F.l1_loss(x_hat, x),
                 "enc": F.mse_loss(z_hat, z)}
        total = self.w_adv * parts["adv"] + self.w_con * parts["con"] + self.w_enc * parts["enc"]
        return total, parts

    def _discriminator_loss(self, logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
        real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
        fake = F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
        return self._d_loss_scale * (real + fake)

    def _latent_distance(self, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """GANomaly's score: mean squared latent distance per sample."""
        return (z - z_hat).square().mean(dim=1)

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        _, z, z_hat, _ = self._reconstruct(x)
        return self._latent_distance(z, z_hat)

    # ---- inspection (figures) --------------------------------------------------------------------
    def _outputs(self, X: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(x_hat, z, z_hat) of a fitted model on [0, 1] images, eval mode, in score batches."""
        X = check_images(X)
        if tuple(X.shape[1:]) != getattr(self, "input_shape_", None):
            raise ValueError(f"images of shape {X.shape[1:]} do not match the training images "
                             f"{getattr(self, 'input_shape_', None)}; call fit first")
        self._set_mode(train=False)
        parts: list[tuple[torch.Tensor, ...]] = []
        with torch.inference_mode():
            for start in range(0, len(X), self.score_batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(X[start:start + self.score_batch_size])).to(self.device_)
                x_hat, z, z_hat, _ = self._reconstruct(self._preprocess(chunk))
                parts.append((x_hat.float().cpu(), z.float().cpu(), z_hat.float().cpu()))
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    def latents(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The latent codes of eq. 1 and eq. 3 of a fitted model.

        Parameters
        ----------
        X : np.ndarray
            float32 images (N, C, H, W) in [0, 1], of the training images' shape.

        Returns
        -------
        (z, z_hat) : tuple of np.ndarray
            Each (N, nz): z = G_E(x), z_hat = E(G_D(z')) (eval mode).

        Raises
        ------
        ValueError
            If the images are invalid or do not match the training images' shape (or not fitted).
        """
        _, z, z_hat = self._outputs(X)
        return z.numpy(), z_hat.numpy()

    def reconstruct(self, X: np.ndarray) -> np.ndarray:
        """The reconstructions x_hat of a fitted model, mapped from [-1, 1] back to [0, 1].

        Parameters
        ----------
        X : np.ndarray
            float32 images (N, C, H, W) in [0, 1], of the training images' shape.

        Returns
        -------
        np.ndarray
            (N, C, 32, 32) float32 in [0, 1] (the network works at 32 x 32).

        Raises
        ------
        ValueError
            If the images are invalid or do not match the training images' shape (or not fitted).
        """
        x_hat, _, _ = self._outputs(X)
        return ((x_hat.clamp(-1, 1) + 1) / 2).numpy()

    def _training_facts(self) -> dict:
        """Extra facts for training_log_ (Mem_GANomaly adds its preset)."""
        return {}

    # ---- training -----------------------------------------------------------------------------
    def _forward_losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass for both updates: (L_G, L_D, L_G's terms). D runs once on x and
        once on x_hat; f(x) is detached (it is the target of G's feature matching)."""
        x_hat, z, z_hat, weights = self._reconstruct(x)
        logit_real, feat_real = self.netd_(x)
        logit_fake, feat_fake = self.netd_(x_hat)
        g_loss, parts = self._generator_loss(x, x_hat, z, z_hat, feat_real.detach(), feat_fake, logit_fake, weights)
        return g_loss, self._discriminator_loss(logit_real, logit_fake), parts

    def _stages(self, n_train: int) -> list[Stage]:
        return [Stage("train", self.batch_size, epochs=self.epochs, max_steps=self.max_steps, drop_last=True)]

    def _build_networks(self, x_train: torch.Tensor) -> None:
        """G and D, DCGAN-initialised (draws from the global RNG, seeded by fit), on the device."""
        nc = x_train.shape[1]
        self.netg_ = self._build_generator(nc)
        self.netd_ = DCGANDiscriminator(IMAGE_SIZE, nc, self.ndf)
        for net in self._networks():
            net.apply(init_dcgan_weights)  # the memory keeps its own uniform init
            net.to(self.device_)  # the layout is set as each stage starts (TorchDetector._begin_stage)

    def _training_log(self, epoch: int, steps: int, history: dict, reinit_epochs: list[int], check_every: int) -> dict:
        return {"epochs_run": epoch, "steps": steps, "epoch_mean_losses": history,
                "d_reinit_count": len(reinit_epochs), "d_reinit_epochs": reinit_epochs,
                "d_collapse_check_every_steps": check_every, **self._training_facts()}

    def _step_losses(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], list]:
        """The step's loss function for the engine (methods/engine/): [L_G, L_D] from one forward pass,
        each trained into its own network, and the logged values (both losses, then L_G's terms)."""
        g_loss, d_loss, parts = self._forward_losses(x)
        return [g_loss, d_loss], {"g": g_loss, "d": d_loss, **parts}, []

    def _stage_plans(self, n_train: int) -> list[StagePlan]:
        """The training, described once for any number of jobs: one stage; per step one shared forward
        pass, G's and D's Adam steps (`_step_losses`), then the D re-initialisation rule: every
        `check_every` steps, D is re-initialised (from the job's global RNG stream; its optimiser
        state kept) when its smallest loss since the last look fell under `d_reinit_threshold`."""
        adam = OptimiserSpec("adam", self.lr, (self.beta1, self.beta2))
        check_every = self._d_check_every.get(self.device_.type, 20)
        threshold = self.d_reinit_threshold
        d_min: list[torch.Tensor] = []  # (K,) each job's smallest D loss since the last look

        def begin(job: Job) -> None:
            job.detector.reinit_epochs_ = []

        def after_step(event: StepEvent) -> None:
            d_loss = event.outputs[1]
            if not d_min:
                d_min.append(torch.full_like(d_loss, float("inf")))
            d_min[0] = torch.where(event.active_t, torch.minimum(d_min[0], d_loss), d_min[0])
            due = event.active & (event.steps % check_every == 0)
            if threshold > 0 and due.any():
                low = (d_min[0] < threshold).cpu().numpy()  # one host sync per look
                for k in np.flatnonzero(due):
                    if low[k]:
                        job = event.jobs[k]
                        with torch.no_grad():
                            job.with_own_rng(lambda: job.detector.netd_.apply(init_dcgan_weights))
                        event.modules.load_params_from(k, "netd_")
                        job.detector.reinit_epochs_.append(event.epoch)
                    d_min[0][k] = float("inf")

        def end_epoch(job: Job, result: StageResult) -> None:
            det = job.detector
            det.training_log_ = det._training_log(result.last_epoch, result.steps, result.history,
                                                  det.reinit_epochs_, check_every)

        (stage,) = self._stages(n_train)
        phase = Phase(type(self)._step_losses, (ParamGroup(("netg_",), adam), ParamGroup(("netd_",), adam)))
        return [StagePlan(stage, ("netg_", "netd_"), (phase,), begin=begin, after_step=after_step,
                          end_epoch=end_epoch)]
