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

from pathlib import Path
from typing import Any

import torch

from checkpoints import dcg_reference, find_dcg_file, read_checkpoint, with_run_folder
from config import ConfigError, dcg_ckpt_path
from evaluation import EvaluatedSystem
from model import build_denoiser, reuse_pointwise_weights
from pipeline import (
    DDIMScheduler,
    ddim_sample,
    diffusion_focal_loss,
    focal_weight,
    guided_prior_map,
    heterologous_noise,
    one_hot,
)
from pretraining.dcg import DCGOutput, build_dcg
from pretraining.dcg_file import load_dcg
from seeding import start_noise
from utils import build_optimizer


class DiffMICv2(EvaluatedSystem):
    """Frozen DCG guidance + ConditionalModel denoiser + DDIM scheduler.

    The guidance model is anything that maps an image batch to a `DCGOutput`; this class calls it in
    exactly two places, `training_step` and `sample`, and never trains it.

    Checkpoints do not hold the frozen DCG: they name its file by path and SHA-256 (checkpoints.py), and
    `load_dcg_file` must have loaded that file before a checkpoint is loaded or saved."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.save_hyperparameters({"cfg": cfg})
        d = cfg["diffusion"]
        self.dcg = build_dcg(cfg).requires_grad_(False).eval()  # frozen, in eval mode (SPEC 5)
        self.denoiser = build_denoiser(cfg)
        self.scheduler = DDIMScheduler(d["timesteps"], d["beta_start"], d["beta_end"], d["clip_sample"])
        self.dcg_file: dict[str, str] | None = None  # the DCG file loaded into self.dcg: path and SHA-256
        if cfg["trainer"].get("compile", False):  # configs stored before the key: not compiled
            # in place (nn.Module.compile): the parameter names, and so the checkpoints, stay the same
            for module in (self.dcg, self.denoiser.image_encoder, self.denoiser.patch_encoder):
                module.compile()

    def train(self, mode: bool = True) -> DiffMICv2:
        super().train(mode)
        self.dcg.eval()  # frozen guidance: BatchNorm keeps its pre-trained statistics
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning does not call train() when fitting starts, and after each validation it restores the modes
        # of the submodules one by one; so the DCG's eval mode is set here too, not only in train().
        self.dcg.eval()

    def prior(self, guide: DCGOutput) -> torch.Tensor:
        """The guided prior map P (B, C, K, K) of SPEC 3. The `ablation` section of the config switches
        parts off for the benchmark: no guided map gives P = 0, no ROI branch builds P from y_global alone."""
        ablation, grid = self.cfg["ablation"], self.denoiser.grid_size
        # float32 even where the DCG ran under bf16 autocast: P is an input of the sampler's float32 arithmetic
        y_global = guide.y_global.float()
        if not ablation["guided_map"]:
            b, c = y_global.shape
            return y_global.new_zeros(b, c, grid, grid)
        y_local = guide.y_local.float() if ablation["roi_branch"] else y_global
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
        with torch.no_grad():
            guide = self.dcg(image)
        prior = self.prior(guide)
        y_t, eps, t = heterologous_noise(self.scheduler, y0, self.denoiser.grid_size)
        eps_hat = self.denoiser(image, guide.patches, torch.cat([prior, y_t], dim=1), t)
        weight = focal_weight(
            guide.y_fusion.float(),
            y0,
            d["focal_alpha"],
            d["focal_gamma"],
            multilabel=self.cfg["data"]["task"] == "multilabel",
        )
        return diffusion_focal_loss(eps_hat.float(), eps.float(), weight)

    def sample(self, image: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """DDIM label grids for an image batch, the mean over diffusion.eval_samples starts: (B, C, K, K).

        Y_T is the guided map of two uniform [0, 1) vectors that stand in for y_global and y_local (the
        authors' code), drawn for each image from `seed` and its dataset `index` (seeding.start_noise), so an image
        gets the same starts in any batch, on any process."""
        d, grid = self.cfg["diffusion"], self.denoiser.grid_size
        batch, classes = image.shape[0], self.cfg["data"]["num_classes"]
        noise = start_noise(self.cfg["seed"], index, (2, d["eval_samples"], classes))  # (B, 2, S, C)
        start = noise.permute(1, 2, 0, 3).to(image.device)  # (2, S, B, C)
        guide = self.dcg(image)
        prior = self.prior(guide)
        y_start = guided_prior_map(start[0].flatten(0, 1).to(prior), start[1].flatten(0, 1).to(prior), grid)
        condition = self.denoiser.encode(image, guide.patches)
        with reuse_pointwise_weights():  # bf16: the body's weights cast once for all DDIM steps
            grids = ddim_sample(
                self.denoiser,
                self.scheduler,
                condition,
                prior,
                y_start.view(d["eval_samples"], batch, classes, grid, grid),
                d["sampling_steps"],
            )
        return grids.mean(dim=0)

    @torch.no_grad()
    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        grid = self.sample(batch["image"], batch["index"])
        scores = grid.mean(dim=(2, 3))
        if self.cfg["data"]["task"] == "multilabel":  # disagreement of the cells, averaged over findings
            return {"scores": scores, "spread": grid.flatten(2).std(dim=2).mean(dim=1)}
        predicted = scores.argmax(dim=1)
        cells = grid.flatten(2)[torch.arange(grid.shape[0], device=grid.device), predicted]  # (B, K*K)
        return {"scores": scores, "spread": cells.std(dim=1)}

    def configure_optimizers(self):
        optimizer, schedule = build_optimizer(
            self.denoiser.parameters(), self.cfg["optim"], self.cfg["trainer"]["max_epochs"]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    # ------------------------------------------------------------------ the DCG file and checkpoints

    def load_dcg_file(self, path: str | Path, train_set=None) -> None:
        """Load the frozen DCG from its file (with `train_set`, a new run: checked against what it was trained
        from) and remember the file, which every checkpoint of this model names."""
        load_dcg(self.dcg, self.cfg, Path(path), train_set)
        self.dcg_file = dcg_reference(path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # random states, for a resume
        assert self.dcg_file is not None, "load_dcg_file first: a checkpoint names the DCG file it was trained with"
        for key in [k for k in checkpoint["state_dict"] if k.startswith("dcg.")]:
            del checkpoint["state_dict"][key]  # kept once per run, in the DCG file
        run_dir = self.trainer.log_dir if self._trainer is not None else None
        checkpoint["dcg_file"] = with_run_folder(self.dcg_file, run_dir)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        reference = checkpoint.get("dcg_file")
        if reference is None:  # an older checkpoint that holds the DCG itself
            return
        if self.dcg_file is None or self.dcg_file["sha256"] != reference["sha256"]:
            raise ConfigError(
                f"the checkpoint was trained with the DCG file {reference['path']} (SHA-256 "
                f"{reference['sha256'][:12]}...); load that file with load_dcg_file before the checkpoint"
            )
        checkpoint["state_dict"].update({f"dcg.{k}": v for k, v in self.dcg.state_dict().items()})

    def load_checkpoint_file(
        self, path: str | Path, dcg_path: str | Path | None = None, checkpoint: dict[str, Any] | None = None
    ) -> None:
        """Load a checkpoint of this project into this model, its DCG from the DCG file the checkpoint names (the
        recorded path, the same place relative to the run folder, or `dcg_path` / the config's DCG path). A file
        that is unsafe, damaged, or does not fit this model's config is a ConfigError naming it. `checkpoint`:
        the file's content when the caller has read it already."""
        checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
        if "state_dict" not in checkpoint:
            raise ConfigError(f"checkpoint {path} holds no state_dict: not a checkpoint written by this project")
        if "dcg_file" in checkpoint:
            self.load_dcg_file(find_dcg_file(checkpoint["dcg_file"], path, dcg_path or dcg_ckpt_path(self.cfg)))
        self.on_load_checkpoint(checkpoint)
        try:
            self.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise ConfigError(f"checkpoint {path} does not fit the config's model ({first})") from None

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: str | Path, dcg_path: str | Path | None = None, **unused: Any
    ) -> DiffMICv2:
        """The trained model of a checkpoint, in eval mode, built from the config stored in it (for notebooks):
        `DiffMICv2.load_from_checkpoint("logs/demo/version_0/checkpoints/best.ckpt")`. Loads as weights only, on
        the CPU (move it with `.to(device)`); the DCG comes from the run's DCG file (see `load_checkpoint_file`).
        Lightning's other arguments (map_location, strict, hparams overrides) do not apply and are ignored."""
        checkpoint = read_checkpoint(checkpoint_path)
        hparams = checkpoint.get("hyper_parameters", {})
        cfg = hparams.get("cfg", hparams.get("config"))
        if not isinstance(cfg, dict):
            raise ConfigError(f"checkpoint {checkpoint_path} stores no DiffMIC-v2 config (hyper_parameters.cfg)")
        system = cls(cfg)
        system.load_checkpoint_file(checkpoint_path, dcg_path, checkpoint)
        return system.eval()
