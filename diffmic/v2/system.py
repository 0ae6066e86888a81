"""DiffMIC-v2 as a LightningModule: the paper's path, top-down.

Training (SPEC 2, 3, 4, 5), one batch:
    image -> frozen DCG -> y_global, y_local, y_fusion, ROI patches
          -> guided prior map P (K x K)            label y0 -> Y_0 noised per cell at its own t -> Y_t
          -> denoiser(image, patches, concat[P, Y_t], t) -> eps_hat
          -> diffusion focal loss: mean of w (eps_hat - eps)^2, w from the DCG's confidence y_fusion
Evaluation (SPEC 6): the DCG, P and the condition x_w once per image; DDIM from S uniform starts Y_T;
the prediction is the mean of the final grids over the S samples and the K x K cells.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffmic.config import errors_of
from diffmic.evaluation.uncertainty import multilabel_sample_statistics, sample_statistics, simplex_probabilities
from diffmic.guided import ExplainedStep, GuidedSystem
from diffmic.precision import ieee_float32
from diffmic.seeding import start_noise
from diffmic.utils import build_optimizer
from diffmic.v2.model import build_denoiser
from diffmic.v2.pipeline import (
    DDIMScheduler,
    ddim_sample,
    diffusion_focal_loss,
    focal_weight,
    guided_prior_map,
    heterologous_noise,
    one_hot,
)
from pretraining.dcg import DCGOutput


class DiffMICv2(GuidedSystem):
    """Frozen DCG guidance + ConditionalModel denoiser + DDIM scheduler.

    The guidance model is anything that maps an image batch to a `DCGOutput`; this class calls it in
    one place, `guide` (for `training_loss` and `sample`), and never trains it.

    Checkpoints do not hold the frozen DCG: they name its file by path and SHA-256 (guided.py), and
    `load_dcg_file` must have loaded that file before a checkpoint is loaded or saved."""

    method = "diffmic_v2"
    title, sampler_name, step_score_name = "DiffMIC-v2", "DDIM", "Y_t"
    IMAGENET_WEIGHT_KEYS = ("model.patch_encoder_weights",)

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        d = cfg["diffusion"]
        self.denoiser = build_denoiser(cfg)
        self.scheduler = DDIMScheduler(d["timesteps"], d["beta_start"], d["beta_end"], d["clip_sample"])
        if cfg["trainer"]["compile"]:
            # in place (nn.Module.compile): the parameter names, and so the checkpoints, stay the same
            for module in (self.dcg, self.denoiser.image_encoder, self.denoiser.patch_encoder):
                module.compile()

    def load_initial_weights(
        self, parts: tuple[str, ...] = GuidedSystem.WEIGHTS_BEFORE_DCG + GuidedSystem.WEIGHTS_AFTER_DCG
    ) -> None:
        """EfficientSAM's image encoder and the ROI patch encoder, as model.efficientsam_weights and
        model.patch_encoder_weights say (random init where they are null); `parts`: which of the two."""
        model = self.cfg["model"]
        if "image_encoder" in parts:
            with errors_of("model.efficientsam_weights"):
                self.denoiser.load_image_encoder(model["efficientsam_weights"], self.cfg["data"]["image_size"])
        if "patch_encoder" in parts:  # may copy the trained DCG's local trunk (model.patch_encoder_weights: dcg)
            with errors_of("model.patch_encoder_weights"):
                self.denoiser.load_patch_encoder(model["patch_encoder_weights"], self.dcg.local_trunk)

    @torch.no_grad()
    def guide(self, image: torch.Tensor) -> DCGOutput:
        """The frozen DCG's outputs for an image batch, in float32 under bf16 autocast too, as it was pre-trained.
        [ours] So bf16 changes only the denoiser's arithmetic: the prior map, the forward process and the focal
        weight are float32's. It costs 4.1 of the 49.8 GFLOP of a training image at the paper's settings; its effect
        on the AUC was within 5-seed noise (benchmarks/README.md, "Precision")."""
        # the DCG's own dtype: float32, also under bf16-mixed (its weights stay float32 there); float64 under 64-true
        dtype = next(self.dcg.parameters()).dtype
        with torch.autocast(image.device.type, enabled=False), ieee_float32():
            return self.dcg(image.to(dtype))

    def prior(self, guide: DCGOutput) -> torch.Tensor:
        """The guided prior map P (B, C, K, K) of SPEC 3. The `ablation` section of the config switches
        parts off for the benchmark: no guided map gives P = 0, no ROI branch builds P from y_global alone."""
        ablation, grid = self.cfg["ablation"], self.denoiser.grid_size
        y_global = guide.y_global
        if not ablation["guided_map"]:
            b, c = y_global.shape
            return y_global.new_zeros(b, c, grid, grid)
        y_local = guide.y_local if ablation["roi_branch"] else y_global
        return guided_prior_map(y_global, y_local, grid)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def training_loss(self, batch: dict) -> torch.Tensor:
        """The diffusion focal loss of one batch (float32 under bf16 autocast too: the denoiser's output, the
        noise and the focal weight are cast up before the loss)."""
        image, d = batch["image"], self.cfg["diffusion"]
        y0 = one_hot(batch["label"], self.cfg["data"]["num_classes"]).to(image.dtype)
        guide = self.guide(image)
        prior = self.prior(guide)
        y_t, eps, t = heterologous_noise(self.scheduler, y0, self.denoiser.grid_size)
        eps_hat = self.denoiser(image, guide.patches, torch.cat([prior, y_t], dim=1), t)
        weight = focal_weight(
            guide.y_fusion,
            y0,
            d["focal_alpha"],
            d["focal_gamma"],
            multilabel=self.cfg["data"]["task"] == "multilabel",
        )
        return diffusion_focal_loss(eps_hat.float(), eps.float(), weight)

    def sample(self, image: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """DDIM label grids for an image batch, the mean over diffusion.eval_samples starts: (B, C, K, K)."""
        return self.sample_grids(image, index).mean(dim=0)

    def sample_grids(
        self, image: torch.Tensor, index: torch.Tensor, on_step: Callable[..., None] | None = None
    ) -> torch.Tensor:
        """The final DDIM label grid of each of the diffusion.eval_samples starts: (S, B, C, K, K).

        Y_T is the guided map of two uniform [0, 1) vectors that stand in for y_global and y_local (the
        authors' code), drawn for each image from `seed` and its dataset `index` (seeding.start_noise), so an image
        gets the same starts in any batch, on any process. `on_step`: pipeline.ddim_sample's read-only callback."""
        d, grid = self.cfg["diffusion"], self.denoiser.grid_size
        batch, classes = image.shape[0], self.cfg["data"]["num_classes"]
        noise = start_noise(self.cfg["seed"], index, (2, d["eval_samples"], classes))  # (B, 2, S, C)
        start = noise.permute(1, 2, 0, 3).to(image.device)  # (2, S, B, C)
        guide = self.guide(image)
        prior = self.prior(guide)
        y_start = guided_prior_map(start[0].flatten(0, 1).to(prior), start[1].flatten(0, 1).to(prior), grid)
        condition = self.denoiser.encode(image, guide.patches)
        with self.denoiser.reuse_pointwise_weights():  # bf16: the body's weights cast once for all DDIM steps
            return ddim_sample(
                self.denoiser,
                self.scheduler,
                condition,
                prior,
                y_start.view(d["eval_samples"], batch, classes, grid, grid),
                d["sampling_steps"],
                on_step,
            )

    @torch.no_grad()
    def evaluate_batch(self, batch: dict, on_step: Callable[..., None] | None = None) -> dict[str, torch.Tensor]:
        """Scores (the mean grid over samples and cells, SPEC 6), probabilities and per-image uncertainty.

        probs: the mean grid mapped to the simplex (uncertainty.simplex_probabilities; multi-label: each finding's
        mean clipped to [0, 1]). spread: the standard deviation of the predicted class over the K x K cells of the
        mean grid (multi-label: over cells, averaged over findings). agreement and sample_spread: over the S samples
        (uncertainty.sample_statistics), NaN when S = 1. A sample that is not finite scores 1 / C in every cell
        (GuidedSystem.replace_diverged), as in DiffMIC v1. `on_step`: pipeline.ddim_sample's read-only callback."""
        grids = self.replace_diverged(self.sample_grids(batch["image"], batch["index"], on_step))
        grid = grids.mean(dim=0)
        scores = grid.mean(dim=(2, 3))
        per_sample = grids.mean(dim=(3, 4))  # (S, B, C)
        if self.cfg["data"]["task"] == "multilabel":  # disagreement of the cells, averaged over findings
            probs = scores.clamp(0.0, 1.0)
            return {
                "scores": scores,
                "probs": probs,
                "spread": grid.flatten(2).std(dim=2).mean(dim=1),
                **multilabel_sample_statistics(per_sample, probs),
            }
        predicted = scores.argmax(dim=1)
        cells = grid.flatten(2)[torch.arange(grid.shape[0], device=grid.device), predicted]  # (B, K*K)
        # the share of the S x K x K cells whose argmax is each class: the alternative probability the uncertainty
        # benchmark measures against `probs`
        votes = torch.nn.functional.one_hot(grids.argmax(dim=2), scores.shape[1]).float().mean(dim=(0, 2, 3))
        return {
            "scores": scores,
            "probs": simplex_probabilities(scores),
            "votes": votes,
            "spread": cells.std(dim=1),
            **sample_statistics(per_sample, predicted),
        }

    def explain_step(self, x0_hat: torch.Tensor, y_next: torch.Tensor) -> ExplainedStep:
        """A DDIM step (ddim_sample's on_step outputs, (S, B, C, K, K)): the scores of the grid it leads to and of its
        clean-grid estimate, means over the samples and then the cells as `evaluate_batch` takes its scores, and the
        grids themselves."""
        return ExplainedStep(y_next.mean(dim=0).mean(dim=(2, 3)), x0_hat.mean(dim=0).mean(dim=(2, 3)), y_next)

    def explain_prior(self, guide: DCGOutput) -> torch.Tensor:
        return self.prior(guide)

    def configure_optimizers(self):
        optimizer, schedule = build_optimizer(
            self.denoiser.parameters(), self.cfg["optim"], self.cfg["trainer"]["max_epochs"]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
