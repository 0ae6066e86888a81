"""DiffMIC (v1, MICCAI 2023) as a LightningModule, beside DiffMIC-v2 with the same DCG, data and evaluation
(SPEC 9; the authors' v1 code, diffusion_trainer.py, where it and the paper differ).

Training, one batch:
    image -> DCG (eval mode) -> softmax priors y_hat (fused), y_hat_global, y_hat_local
    label y_0, one eps, antithetic t -> three y_t, one per prior (diffmic_v1/card.py)
    image -> encoder once -> x;  eps_hat, eps_hat_global, eps_hat_local = denoise(x, y_t, prior, t)
    loss = MSE(eps, eps_hat) + v1.mmd_weight (MMD(eps, eps_hat_global) + MMD(eps, eps_hat_local))
    v1.joint_train: the DCG also takes a cross-entropy step on y_fusion (train mode, dcg.lr, AMSGrad)
    after the optimiser step: the EMA of the denoiser's weights (v1.ema_decay)
Evaluation: the DCG and the encoder once per image; ancestral sampling of v1.sampling_steps steps from
y_hat + N(0, I); the scores are softmax(y_0), averaged over diffusion.eval_samples samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling

from diffmic.evaluation.uncertainty import sample_statistics
from diffmic.guided import ExplainedStep, GuidedSystem
from diffmic.precision import ieee_float32
from diffmic.seeding import start_noise
from diffmic.utils import adam
from diffmic.v1.card import CARDScheduler, card_sample, dual_guidance_loss
from diffmic.v1.ema import EMA
from diffmic.v1.model import build_denoiser_v1
from diffmic.v2.pipeline import one_hot


class DiffMICv1(GuidedSystem):
    """The DCG's three priors + DenoiserV1 + CARD's diffusion of the label vector.

    With v1.joint_train false the DCG is frozen as for DiffMIC-v2 and checkpoints name its file; with true it is
    fine-tuned here, as the authors' code does, and checkpoints hold the fine-tuned DCG (the DCG file stays the
    shared pre-trained start, untouched)."""

    method = "diffmic_v1"
    title, sampler_name, step_score_name = "DiffMIC v1", "ancestral", "softmax(y_t)"
    EVAL_MODE_PARTS = (*GuidedSystem.EVAL_MODE_PARTS, "ema")  # the EMA copy is only ever evaluated (ema.py)

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        v1, d = cfg["v1"], cfg["diffusion"]
        self.denoiser = build_denoiser_v1(cfg)
        self.ema = EMA(self.denoiser, v1["ema_decay"])
        self.scheduler = CARDScheduler(d["timesteps"], d["beta_start"], d["beta_end"])
        if cfg["trainer"]["compile"]:  # in place, as DiffMIC-v2: checkpoint names stay the same
            for module in (self.dcg, self.denoiser.trunk):
                module.compile()
        if v1["joint_train"]:
            self.dcg.requires_grad_(True)
            self.dcg_frozen = False

    def load_initial_weights(self, parts: tuple[str, ...] = ()) -> None:
        """Nothing to load: the authors' v1 encoder starts from random weights."""

    def priors(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """softmax of the DCG's y_fusion, y_global and y_local, each (B, C), without gradients."""
        with torch.no_grad(), ieee_float32():  # the frozen DCG's float32 layers whatever the float32 policy
            guide = self.dcg(image)
        # float32 under bf16 autocast too; float64 under 64-true, where the denoiser's weights are float64
        return tuple(
            g.to(torch.promote_types(g.dtype, torch.float32)).softmax(dim=1)
            for g in (guide.y_fusion, guide.y_global, guide.y_local)
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        y0 = one_hot(label, self.cfg["data"]["num_classes"]).float()
        y_hat, y_hat_global, y_hat_local = self.priors(image)
        t = self.scheduler.timesteps_antithetic(image.shape[0], image.device)
        eps = torch.randn_like(y0)
        x = self.denoiser.encode(image)
        eps_hats = [
            self.denoiser.denoise(x, self.scheduler.add_noise(y0, prior, eps, t), prior, t).float()
            for prior in (y_hat, y_hat_global, y_hat_local)
        ]
        loss = dual_guidance_loss(eps, *eps_hats, weight=self.cfg["v1"]["mmd_weight"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        if self.dcg_frozen:
            return loss
        self.dcg.train()  # the authors' joint training: a cross-entropy step of the DCG on the same batch
        dcg_loss = F.cross_entropy(self.dcg(image).y_fusion.float(), label)
        self.dcg.eval()
        self.log("train/dcg_loss", dcg_loss, on_step=True, on_epoch=True)
        return loss + dcg_loss  # the two losses share no parameter: one backward updates both

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.ema.update(self.denoiser)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # under 16-mixed Lightning leaves the gradients of a fused optimiser scaled (fused Adam unscales inside its
        # step): unscale them first, so the clip applies to the true gradient norm (the scaler's step then skips its
        # own unscaling and still skips a step whose gradients are not finite)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and _optimizer_handles_unscaling(optimizer):
            scaler.unscale_(getattr(optimizer, "_optimizer", optimizer))
        # the authors clip the denoiser's gradient norm only, not the DCG's
        torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.cfg["v1"]["grad_clip"])

    def sample(
        self, image: torch.Tensor, index: torch.Tensor, on_step: Callable[..., None] | None = None
    ) -> torch.Tensor:
        """Class probabilities softmax(y_0) of diffusion.eval_samples samples per image: (S, B, C). The noise of an
        image depends on `seed` and its dataset `index` only (seeding.start_noise). `on_step`: card.card_sample's
        read-only callback."""
        steps, samples = self.cfg["v1"]["sampling_steps"], self.cfg["diffusion"]["eval_samples"]
        classes = self.cfg["data"]["num_classes"]
        noise = start_noise(self.cfg["seed"], index, (steps, samples, classes), normal=True)  # (B, steps, S, C)
        y_hat, _, _ = self.priors(image)
        denoiser = self.ema.average if self.cfg["v1"]["evaluate_ema"] else self.denoiser
        x = denoiser.encode(image)
        y0 = card_sample(denoiser, self.scheduler, x, y_hat, noise.permute(1, 2, 0, 3).to(y_hat), on_step)
        return y0.softmax(dim=-1)

    @torch.no_grad()
    def evaluate_batch(self, batch: dict, on_step: Callable[..., None] | None = None) -> dict[str, torch.Tensor]:
        # v1's chain has no clipping: an undertrained denoiser (eval-mode BatchNorm statistics far from the batch
        # statistics it trained with) can make y_t grow without bound (GuidedSystem.replace_diverged)
        probabilities = self.replace_diverged(self.sample(batch["image"], batch["index"], on_step))
        scores = probabilities.mean(dim=0)
        predicted = scores.argmax(dim=1)
        chosen = probabilities[:, torch.arange(scores.shape[0], device=scores.device), predicted]  # (S, B)
        # v1 has no grid: its spread is over the S samples, undefined (NaN, not 0) with one
        spread = chosen.std(dim=0) if chosen.shape[0] > 1 else torch.full_like(chosen[0], float("nan"))
        # the scores are already probabilities (the mean of S softmax vectors); agreement and sample_spread as v2's
        votes = F.one_hot(probabilities.argmax(dim=2), scores.shape[1]).float().mean(dim=0)
        return {
            "scores": scores,
            "probs": scores,
            "votes": votes,
            "spread": spread,
            **sample_statistics(probabilities, predicted),
        }

    def explain_step(self, y: torch.Tensor) -> ExplainedStep:
        """An ancestral step (card_sample's on_step output y_t, (S, B, C)): softmax(y_t), averaged over the samples
        as `evaluate_batch` averages softmax(y_0); v1 has no clean estimate to show and no grid."""
        return ExplainedStep(y.softmax(dim=-1).mean(dim=0), None, None)

    def configure_optimizers(self):
        """Adam for the denoiser with the authors' per-step schedule: linear warm-up over v1.warmup_epochs, then a
        half cosine to optim.min_lr_ratio * lr; with joint training, the DCG in its own group (dcg.lr, AMSGrad,
        constant), as the authors' aux optimiser."""
        optim, v1, dcg = self.cfg["optim"], self.cfg["v1"], self.cfg["dcg"]
        groups = [{"params": list(self.denoiser.parameters()), "amsgrad": False}]
        if not self.dcg_frozen:
            groups.append({"params": list(self.dcg.parameters()), "lr": dcg["lr"], "amsgrad": True})
        optimizer = adam(groups, optim["lr"], tuple(optim["betas"]), optim["eps"], optim["weight_decay"])
        per_epoch = max(1, self.trainer.estimated_stepping_batches // self.trainer.max_epochs)
        epochs, warmup, floor = self.trainer.max_epochs, v1["warmup_epochs"], optim["min_lr_ratio"]

        def factor(step: int) -> float:
            epoch = step / per_epoch
            if epoch < warmup:
                return epoch / warmup
            progress = min(1.0, (epoch - warmup) / max(epochs - warmup, 1e-8))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        schedules = [factor] + [lambda step: 1.0] * (len(groups) - 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
