"""Mem_GANomaly (Zhou & Xing 2022), docs/method.md "Mem_GANomaly": GANomaly's generator with the
memory module M (eqs. 15-21, methods/memory.py) between the encoder G_E and the decoder G_D:

    x -> G_E -> z -> M -> z' -> G_D -> x_hat -> E -> z_hat;   D(x), D(x_hat) as in GANomaly.

Everything but the bottleneck, the losses and the score is GANomaly's (subclassed, not copied):
networks, DCGAN init, [-1, 1] inputs resized to 32 x 32, the training loop with one shared D
pass on real and on fake images, D re-initialisation on a collapsed D loss, eval-mode scoring.

Losses (eqs. 22-32), `reduction="mean"` (the documented default, GANomaly's code):
    L_adv = mean (f(x) - f(x_hat))^2      feature matching on D's last feature layer (22)
    L_con = mean (x - x_hat)^2            l2, where GANomaly uses l1 (24)
    L_enc = mean |z - z_hat|              l1, where GANomaly uses l2 (26)
    L_w   = mean over the batch of sum_i -w'_i log w'_i, 0 log 0 = 0 (28-30)
    L_G   = eta_adv L_adv + eta_con L_con + eta_enc L_enc + eta_w L_w [+ eta_gan (-log D(x_hat))] (31)
    L_D   = -log D(x) - log(1 - D(x_hat)), batch means (32)
`reduction="norm"` uses the norms as the equations write them instead: per-sample unsquared
l2 norms for L_adv and L_con and the l1 norm (sum) for L_enc, averaged over the batch.
Score (eq. 33): the l1 distance between z = G_E(t) and z_hat, here its mean over the nz
entries (a constant 1/nz factor: the same ranks and AUROC; the min-max scaling of eq. 34 is
the evaluator's).

The eta weights are not given (docs/method.md); two named presets, recorded in training_log_:
    "ganomaly" (default): eta_adv 1, eta_con 50, eta_enc 1 (GANomaly's), eta_w 0.0002 (MemAE's),
        eta_gan 0 (G's adversarial term is the feature matching only, as GANomaly);
    "algorithm1": every weight 1, plus the -log D(x_hat) term of Algorithm 1.
Any eta_* given explicitly overrides its preset value.

Training: Algorithm 1's steps 2 and 3 (G_E, G_D, M on L_G; then E, and M again, on
-log D(x_hat) + L_enc) are ONE joint Adam step over G_E, M, G_D and E on L_G: every parameter
group gets the gradient it gets in Algorithm 1 (x_hat does not depend on E), but M is updated
once per iteration, not twice (docs/method.md: an acceptable implementation). As in GANomaly's
loop, the G and D gradients are taken from the same forward pass (D's step sees the fakes and
D weights of before G's step); Algorithm 1 lists the D step first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import check_choice, check_nonneg_float
from methods.ganomaly import GANomaly
from methods.memory import MemoryModule, addressing_entropy, check_memory_params, memory_health

# The eta weights of eq. 31 (and of the -log D(x_hat) term) for each preset.
PRESETS: dict[str, dict[str, float]] = {
    "ganomaly": {"eta_adv": 1.0, "eta_con": 50.0, "eta_enc": 1.0, "eta_w": 0.0002, "eta_gan": 0.0},
    "algorithm1": {"eta_adv": 1.0, "eta_con": 1.0, "eta_enc": 1.0, "eta_w": 1.0, "eta_gan": 1.0},
}

# paper: Adam lr 2e-3 and, per dataset, memory size N and epochs (section 4.1).
# quick: the paper's settings on a 1-epoch budget (~92 steps). Measured on real MNIST, 2 threads,
# this 2-core machine, idle: class 0 (5923 train / 5980 test images) fit 23.3 s + scoring 3.8 s
# = 27.1 s, AUROC 0.355 (inverted); class 8: 27.9 s, AUROC 0.519. Two epochs would not fit the
# ~45 s per-class budget.
# smoke: a few steps on a small batch, for the end-to-end tests.
# "*" (methods.DEFAULT) is each profile's budget for a dataset without an entry of its own.
PROFILES: dict = {
    "paper": {
        "mnist": {"memory_size": 100, "epochs": 60},
        "fashion_mnist": {"memory_size": 1600, "epochs": 100},
        "cifar10": {"memory_size": 1400, "epochs": 150},
        # Unknown datasets get MNIST's budget: the smallest memory and the fewest epochs published.
        "*": {"memory_size": 100, "epochs": 60},
    },
    "quick": {
        "mnist": {"memory_size": 100, "epochs": 1},
        "fashion_mnist": {"memory_size": 1600, "epochs": 1},
        "cifar10": {"memory_size": 1400, "epochs": 1},
        "*": {"memory_size": 100, "epochs": 1},  # MNIST's, as under paper
    },
    "smoke": {"*": {"memory_size": 100, "epochs": 1, "max_steps": 4, "batch_size": 16}},  # every dataset
}


class MemGANomaly(GANomaly):
    """Mem_GANomaly. Values the paper leaves open carry docs/method.md's documented defaults.

    Parameters
    ----------
    epochs : int
        Training epochs (paper: 60 MNIST, 100 Fashion-MNIST, 150 CIFAR-10).
    batch_size : int
        Not given; GANomaly's 64 (last incomplete batch dropped).
    lr : float
        Adam learning rate (paper: 2e-3).
    beta1, beta2 : float
        Not given; GANomaly's 0.5, 0.999.
    nz : int
        Bottleneck size C, not given; GANomaly's 100.
    ngf, ndf : int
        GANomaly's 64.
    memory_size : int
        N memory slots (paper: 100 MNIST, 1600 Fashion-MNIST, 1400 CIFAR-10).
    shrink_threshold : float or None
        lambda of eq. 18, not given; None = 1/N (MemAE's range is [1/N, 3/N]).
    addressing : str
        "dot" (eq. 15, default) or "cosine" (the MemAE background's eq. 10).
    eps : float
        Epsilon of eq. 18 and of the renormalisation, not given; MemAE's 1e-12.
    preset : str
        "ganomaly" (default) or "algorithm1", the eta weights of `PRESETS` (module docstring).
    eta_adv, eta_con, eta_enc, eta_w, eta_gan : float or None
        The eta weights of eq. 31 (eta_gan: of -log D(x_hat)); None = the preset's value.
    reduction : str
        "mean" (default, GANomaly's code) or "norm" (the norms as eqs. 22-26 write).
    d_reinit_threshold, max_steps, random_state, device, score_batch_size :
        As GANomaly.
    """

    # Measured (issue 20): reports/published/quick-bf16-fidelity-mnist (fp32 vs bf16 AUROC, quick MNIST, seeds
    # 0-2) and reports/published/speed-cpu (training img/s, 2 threads, idle machine).
    # bf16: AUROC within seed noise (+0.008, p = 0.56; its pairs differ by up to 0.45 either way, as its
    # seeds do at the quick budget); bf16 channels-last 1.58x over fp32 channels-last (580 vs 368 img/s).
    default_precision = "bf16"
    default_memory_format = "channels_last"

    _d_loss_scale = 1.0  # eq. 32 sums the two BCE terms (GANomaly halves them)
    _epoch_facts_sample_size = 512  # the memory's health per epoch, on the first 512 training images

    memory_size_param = "memory_size"

    def __init__(self, epochs: int = 60, batch_size: int = 64, lr: float = 2e-3, beta1: float = 0.5,
                 beta2: float = 0.999, nz: int = 100, ngf: int = 64, ndf: int = 64,
                 memory_size: int = 100, shrink_threshold: Optional[float] = None, addressing: str = "dot",
                 eps: float = 1e-12, preset: str = "ganomaly", eta_adv: Optional[float] = None,
                 eta_con: Optional[float] = None, eta_enc: Optional[float] = None,
                 eta_w: Optional[float] = None, eta_gan: Optional[float] = None, reduction: str = "mean",
                 d_reinit_threshold: float = 1e-5, max_steps: Optional[int] = None,
                 random_state: int = 0, device: str = "auto", score_batch_size: int = 256) -> None:
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, beta1=beta1, beta2=beta2, nz=nz,
                         ngf=ngf, ndf=ndf, d_reinit_threshold=d_reinit_threshold, max_steps=max_steps,
                         random_state=random_state, device=device, score_batch_size=score_batch_size)
        del self.w_adv, self.w_con, self.w_enc  # GANomaly's weights; the etas replace them
        self.memory_size = memory_size
        self.shrink_threshold = shrink_threshold
        self.addressing = addressing
        self.eps = eps
        self.preset = preset
        self.eta_adv = eta_adv
        self.eta_con = eta_con
        self.eta_enc = eta_enc
        self.eta_w = eta_w
        self.eta_gan = eta_gan
        self.reduction = reduction

    def _check_params(self) -> None:
        self._check_common_params()
        check_memory_params(self.memory_size, self.shrink_threshold, self.addressing, self.eps, "memory_size")
        check_choice("preset", self.preset, tuple(PRESETS))
        for name in PRESETS["ganomaly"]:
            if getattr(self, name) is not None:
                check_nonneg_float(name, getattr(self, name))
        check_choice("reduction", self.reduction, ("mean", "norm"))

    def loss_weights(self) -> dict[str, float]:
        """The eta weights in use: the preset's, with any explicit eta_* on top.

        Returns
        -------
        dict of str to float
            eta_adv, eta_con, eta_enc, eta_w and eta_gan.
        """
        return {name: float(value if getattr(self, name) is None else getattr(self, name))
                for name, value in PRESETS[self.preset].items()}

    # ---- network ------------------------------------------------------------------------------
    def _build_generator(self, nc: int) -> nn.ModuleDict:
        generator = super()._build_generator(nc)
        generator["memory"] = MemoryModule(self.memory_size, self.nz, self.shrink_threshold,
                                           self.addressing, self.eps)
        return generator

    def _bottleneck(self, z: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.netg_["memory"](z)  # (z', w'), eqs. 15-21

    # ---- losses and score ---------------------------------------------------------------------
    def _generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, z_hat: torch.Tensor,
                        feat_real: torch.Tensor, feat_fake: torch.Tensor, logit_fake: torch.Tensor,
                        weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        eta = self.loss_weights()
        if self.reduction == "mean":
            parts = {"adv": F.mse_loss(feat_fake, feat_real),                                   # (22)
                     "con": F.mse_loss(x_hat, x),                                               # (24)
                     "enc": F.l1_loss(z_hat, z)}                                                # (26)
        else:
            parts = {"adv": (feat_fake - feat_real).flatten(1).norm(dim=1).mean(),
                     "con": (x_hat - x).flatten(1).norm(dim=1).mean(),
                     "enc": (z_hat - z).abs().sum(dim=1).mean()}
        parts["w"] = addressing_entropy(weights, self.eps)                                      # (28-30)
        total = (eta["eta_adv"] * parts["adv"] + eta["eta_con"] * parts["con"]
                 + eta["eta_enc"] * parts["enc"] + eta["eta_w"] * parts["w"])                  # (31)
        if eta["eta_gan"] > 0:  # Algorithm 1's -log D(x_hat)
            parts["gan"] = F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))
            total = total + eta["eta_gan"] * parts["gan"]
        return total, parts

    def _latent_distance(self, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """Eq. 33: l1 latent distance (mean over the nz entries)."""
        return (z - z_hat).abs().mean(dim=1)

    @torch.no_grad()
    def _epoch_facts(self) -> dict[str, float]:
        """The memory's health (methods.memory.memory_health) on the fixed sample, eval mode."""
        self._set_mode(train=False)
        x = self._facts_sample_
        z = torch.cat([self.netg_["encoder"](x[i:i + self.score_batch_size]).flatten(1)
                       for i in range(0, len(x), self.score_batch_size)])
        self._set_mode(train=True)
        return memory_health(self.netg_["memory"], z)

    def _training_facts(self) -> dict:
        return {"preset": self.preset, "loss_weights": self.loss_weights(),
                "shrink_threshold_used": self.netg_["memory"].shrink_threshold}
