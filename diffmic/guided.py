"""What DiffMIC-v2 and DiffMIC (v1) share around their denoisers: the DCG guidance model, the file it was
pre-trained into, and checkpoints that name that file instead of holding a second copy of a frozen DCG.

A method that fine-tunes the DCG while its denoiser trains (v1's `joint_train`) sets `dcg_frozen = False`: its
checkpoints then hold the fine-tuned DCG, and the DCG file only records where the fine-tuning started."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from diffmic.checkpoints import checkpoint_config, dcg_reference, find_dcg_file, read_checkpoint, with_run_folder
from diffmic.config import ConfigError, dcg_ckpt_path
from diffmic.evaluation.evaluator import EvaluatedSystem
from pretraining.dcg import DCGOutput, build_dcg
from pretraining.dcg_file import load_dcg

logger = logging.getLogger(__name__)


class ExplainedStep(NamedTuple):
    """What an explanation (explain/explanation.py) keeps of one sampling step, for B images and C classes."""

    scores: torch.Tensor  # (B, C) the class scores the step leads to, taken as evaluation takes its scores
    estimate: torch.Tensor | None  # (B, C) the scores of the step's clean estimate; None where a method has none
    grids: torch.Tensor | None  # (S, B, C, K, K) the label grids the step leads to; None for a method without a grid


class GuidedSystem(EvaluatedSystem):
    """An EvaluatedSystem with a DCG (`self.dcg`, kept in eval mode) loaded from a DCG file. Subclasses set
    `method` (the config's model.method) and the names an explanation's figure gives the method, and implement the
    training step, `evaluate_batch(batch, on_step=None)` (on_step: their sampler's read-only step callback),
    `explain_step` and `load_initial_weights` (the denoiser's pre-trained parts for a new run)."""

    method = ""
    title = ""  # the method's name in an explanation's figure
    sampler_name = ""  # its evaluation sampler, as the figure names it
    step_score_name = ""  # what the figure's score trajectory shows at each step
    # the submodules in eval mode through a fit by design (train() keeps them there): the frozen DCG, whose BatchNorm
    # keeps its pre-trained statistics
    EVAL_MODE_PARTS: tuple[str, ...] = ("dcg",)

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.save_hyperparameters({"cfg": cfg})
        self.dcg = build_dcg(cfg).requires_grad_(False).eval()  # frozen, in eval mode (SPEC 5)
        self.dcg_frozen = True
        self.dcg_file: dict[str, str] | None = None  # the DCG file loaded into self.dcg: path and SHA-256
        self._diverged = 0  # samples of the split being evaluated that were not finite (replace_diverged)

    def train(self, mode: bool = True) -> GuidedSystem:
        super().train(mode)
        self.dcg.eval()  # the guidance: BatchNorm keeps its pre-trained statistics
        return self

    def eval_by_design(self, name: str) -> bool:
        """Whether the submodule `name` is in eval mode on purpose (a part of EVAL_MODE_PARTS)."""
        return any(name == p or name.startswith(f"{p}.") for p in self.EVAL_MODE_PARTS)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # Lightning warns of every module in eval mode when training starts, with their count, which the frozen DCG's
        # modules are at every fit by design. The message with exactly that count is hidden (from here on in this
        # process: another model, or this one with more modules in eval mode, still gets it), and on_train_start
        # names the modules that are not meant to be in eval mode
        expected = sum(1 for name, _ in self.named_modules() if self.eval_by_design(name))
        warnings.filterwarnings(
            "ignore",
            message=rf"Found {expected} module\(s\) in eval mode at the start of training\.",
            category=PossibleUserWarning,
        )

    def on_train_start(self) -> None:
        others = [
            name for name, module in self.named_modules() if not module.training and not self.eval_by_design(name)
        ]
        if others and self.trainer.is_global_zero:
            logger.warning(
                "%d module(s) besides %s are in eval mode at the start of training (e.g. %s): their BatchNorm and "
                "dropout will not train",
                len(others),
                ", ".join(self.EVAL_MODE_PARTS),
                others[0] or "the model itself",
            )

    def on_train_epoch_start(self) -> None:
        # Lightning does not call train() when fitting starts, and after each validation it restores the modes
        # of the submodules one by one; so the DCG's eval mode is set here too, not only in train().
        self.dcg.eval()

    # ------------------------------------------------------------------ diverged samples

    def replace_diverged(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples (S, B, C, ...) of which any value is not finite score 1 / C for every class (and cell), and the
        split's count of them is logged once at its end, instead of failing inside the metrics. A diverged sample says
        nothing of its image; an undertrained or diverged denoiser makes them (README, "Command line", exit codes)."""
        finite = torch.isfinite(samples.flatten(2)).all(dim=2)  # (S, B)
        if bool(finite.all()):
            return samples
        self._diverged += int((~finite).sum())
        mask = finite.view(*finite.shape, *([1] * (samples.dim() - 2)))
        return torch.where(mask, samples, torch.full_like(samples, 1.0 / samples.shape[2]))

    def _start(self) -> None:
        super()._start()
        self._diverged = 0

    def _finish(self, stage: str) -> None:
        diverged = self._diverged
        if self._distributed():
            diverged = int(self.all_gather(torch.tensor(diverged, device=self.device)).sum())
        if diverged and self.trainer.is_global_zero:
            logger.warning(
                "%s: %d sample(s) were not finite (a diverged or undertrained denoiser) and scored 1 / C for every "
                "class; the metrics count them as such",
                stage,
                diverged,
            )
        super()._finish(stage)

    # ------------------------------------------------------------------ explanations (explain/explanation.py)

    def explain_step(self, *outputs: torch.Tensor) -> ExplainedStep:
        """What an explanation keeps of a sampling step, from the outputs the sampler hands its on_step callback."""
        raise NotImplementedError

    def explain_prior(self, guide: DCGOutput) -> torch.Tensor | None:
        """The prior map (B, C, K, K) an explanation shows beside the final grid; None: the method has none."""
        return None

    # the parts of load_initial_weights: those that need nothing of the DCG (loaded, and so checked, before the DCG
    # pre-trains: a bad file is refused before any work), and those made from the trained DCG
    WEIGHTS_BEFORE_DCG = ("image_encoder",)
    WEIGHTS_AFTER_DCG = ("patch_encoder",)
    # the keys of load_initial_weights that may name torchvision's ImageNet weights (config.check_imagenet_weights)
    IMAGENET_WEIGHT_KEYS: tuple[str, ...] = ()

    def load_initial_weights(self, parts: tuple[str, ...] = WEIGHTS_BEFORE_DCG + WEIGHTS_AFTER_DCG) -> None:
        """A new run: load the pre-trained weights the config names into the denoiser (`parts` of them)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the DCG file and checkpoints

    def load_dcg_file(self, path: str | Path, train_set=None) -> None:
        """Load the DCG from its file (with `train_set`, a new run: checked against what it was trained
        from) and remember the file, which every checkpoint of this model names."""
        load_dcg(self.dcg, self.cfg, Path(path), train_set)
        self.dcg_file = dcg_reference(path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # random states, for a resume
        assert self.dcg_file is not None, "load_dcg_file first: a checkpoint names the DCG file it was trained with"
        if self.dcg_frozen:
            for key in [k for k in checkpoint["state_dict"] if k.startswith("dcg.")]:
                del checkpoint["state_dict"][key]  # kept once per run, in the DCG file
        run_dir = self.trainer.log_dir if self._trainer is not None else None
        checkpoint["dcg_file"] = with_run_folder(self.dcg_file, run_dir)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        reference = checkpoint.get("dcg_file")
        if reference is None or _holds_dcg(checkpoint):  # an older checkpoint, or a fine-tuned DCG: it is in there
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
        """Load a checkpoint of this project into this model, a frozen DCG from the DCG file the checkpoint names
        (the recorded path, the same place relative to the run folder, or `dcg_path` / the config's DCG path). A
        file that is unsafe, damaged, or does not fit this model's config is a ConfigError naming it. `checkpoint`:
        the file's content when the caller has read it already."""
        checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
        if "state_dict" not in checkpoint:
            raise ConfigError(f"checkpoint {path} holds no state_dict: not a checkpoint written by this project")
        stored_cfg = checkpoint_config(checkpoint, path)
        stored = stored_cfg["model"]["method"]
        if stored != self.method:
            raise ConfigError(
                f"checkpoint {path} is a {stored} model, the config's model.method is {self.method}: "
                f"set model.method={stored}"
            )
        trunk, wanted = stored_cfg["dcg"]["backbone"], self.cfg["dcg"]["backbone"]
        if trunk != wanted:  # said here, not as a state dict of other widths (or by its DCG file)
            raise ConfigError(
                f"config key dcg.backbone: checkpoint {path} was trained with a {trunk} DCG, the config asks for "
                f"{wanted}: set dcg.backbone={trunk}"
            )
        if "dcg_file" in checkpoint and not _holds_dcg(checkpoint):
            self.load_dcg_file(find_dcg_file(checkpoint["dcg_file"], path, dcg_path or dcg_ckpt_path(self.cfg)))
        elif "dcg_file" in checkpoint:
            self.dcg_file = checkpoint["dcg_file"]  # where its fine-tuned DCG started; later saves name it again
        self.on_load_checkpoint(checkpoint)
        try:
            self.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise ConfigError(f"checkpoint {path} does not fit the config's model ({first})") from None
        self.weights_epoch = checkpoint.get("epoch")  # what an evaluation of these weights is logged with

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: str | Path, dcg_path: str | Path | None = None, **unused: Any
    ) -> GuidedSystem:
        """The trained model of a checkpoint, in eval mode, built from the config stored in it (for notebooks):
        `DiffMICv2.load_from_checkpoint("logs/demo/version_0/checkpoints/best.ckpt")`. Loads as weights only, on
        the CPU (move it with `.to(device)`); a frozen DCG comes from the run's DCG file (see
        `load_checkpoint_file`). Lightning's other arguments (map_location, strict, hparams overrides) do not apply
        and are ignored."""
        checkpoint = read_checkpoint(checkpoint_path)
        cfg = checkpoint_config(checkpoint, checkpoint_path)  # a config of an older version: its new keys filled in
        stored = cfg["model"]["method"]
        if stored != cls.method:
            raise ConfigError(
                f"checkpoint {checkpoint_path} is a {stored} model: load it with that method's class "
                "(methods.METHODS[model.method])"
            )
        system = cls(cfg)
        system.load_checkpoint_file(checkpoint_path, dcg_path, checkpoint)
        return system.eval()


def _holds_dcg(checkpoint: dict[str, Any]) -> bool:
    return any(key.startswith("dcg.") for key in checkpoint["state_dict"])
