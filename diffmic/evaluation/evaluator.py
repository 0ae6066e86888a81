"""Whole-split evaluation shared by the DCG pre-trainer and the diffusion model: collect scores over
a split, compute the metrics of SPEC section 7 once per epoch, log them and a confusion matrix; and what every
trainer needs to give the same answer on several processes and after a resume (seeding.py)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn

from diffmic.evaluation.figures import confusion_matrix_image, reliability_figure, risk_coverage_figure, to_image
from diffmic.evaluation.metrics import classification_metrics, confusion_matrix, multilabel_metrics
from diffmic.evaluation.uncertainty import (
    SAMPLE_SCORES,
    apply_temperature,
    aurc,
    confidences,
    fit_temperature,
    optimal_aurc,
    risk_coverage,
    uncertainty_metrics,
)
from diffmic.seeding import rank_seed, reseed, rng_state, set_rng_state

logger = logging.getLogger(__name__)


class EvaluatedSystem(pl.LightningModule):
    """Subclasses implement `evaluate_batch(batch) -> {"scores": (B, C), "spread": (B,) optional}`.
    Integer labels get the single-label metrics, multi-hot labels the multi-label ones (SPEC 7).

    On several processes every process evaluates its share of a split; the shares are gathered and each image is
    counted once (DistributedSampler pads the shares with repeated images), in index order, so the metrics do not
    depend on the number of processes. Evaluation noise must depend on the image only (seeding.start_noise).

    Training on several processes: each process reseeds torch, numpy and Python with its own `rank_seed` when the
    fit starts. Full checkpoints (last.ckpt) carry every process's random states, and a resumed fit puts them back
    where they were taken, at the end of an epoch."""

    lr_key = "optim.lr"  # the config key of the learning rate: logged with the global batch, named on divergence

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.last_metrics: dict[str, float] = {}
        self.predictions: dict[str, Any] = {}
        self._collected: list[dict] = []
        self._resumed_rng: dict[str, Any] | None = None
        # the validation metrics of every epoch of a fit, {"epoch": e, **metrics}: the learning curve, kept in
        # last.ckpt so that a resumed fit continues it
        self.val_history: list[dict[str, float]] = []
        # the temperature of the probabilities (uncertainty.py); fitted by a validation pass when evaluation.temperature
        # is fit, else 1
        self.temperature = 1.0
        self.last_outputs: dict[str, Any] = {}  # the last split's gathered outputs (labels, scores, probs, ...)
        # the epoch that trained the weights evaluated outside a fit, when they come from a checkpoint (its "epoch"):
        # what the log and TensorBoard name a validation or test by, rather than the trainer's current epoch
        self.weights_epoch: int | None = None
        # whether the note that selective prediction by the sample scores is undefined (diffusion.eval_samples 1) was
        # logged: it holds for every split of a run, so it is said once, not at every validation
        self._noted_undefined = False

    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ seeds and resume

    def on_fit_start(self) -> None:
        if self._resumed_rng is not None:  # a resume: continue every stream where the checkpoint left it
            set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        elif self.trainer.world_size > 1:
            reseed(rank_seed(self.cfg["seed"], self.trainer.global_rank))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "optimizer_states" not in checkpoint:  # weights only (best.ckpt): nothing to resume
            return
        states = [rng_state()]
        if self._distributed():
            states = [None] * self.trainer.world_size
            dist.all_gather_object(states, rng_state())
        checkpoint["rng_states"] = states
        checkpoint["val_history"] = self.val_history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "val_history" in checkpoint:  # a full checkpoint: the curve up to its epoch
            self.val_history = list(checkpoint["val_history"])
        states = checkpoint.get("rng_states")
        if states is None:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        if len(states) == world:
            self._resumed_rng = states[self.trainer.global_rank if self._trainer is not None else 0]
        else:
            logger.warning(
                "the checkpoint was written by %d process(es), this run has %d: the random streams restart from "
                "per-process seeds, so the resumed run will not repeat the uninterrupted one exactly",
                len(states),
                world,
            )

    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1 and dist.is_initialized()

    # ------------------------------------------------------------------ evaluation over a split

    def _start(self) -> None:
        self._collected = []

    def _step(self, batch: dict) -> dict:
        out = {k: v.detach().float().cpu() for k, v in self.evaluate_batch(batch).items()}
        out.update(label=batch["label"].cpu(), index=batch["index"].cpu())
        if "error" in batch:  # unlabelled images: why an image could not be read ("" when it was)
            out["error"] = list(batch["error"])
        self._collected.append(out)
        return out

    def _gathered(self) -> dict[str, Any]:
        """This split's outputs from every process, each image once, in index order: tensors as numpy arrays."""
        local = {key: [c[key] for c in self._collected] for key in self._collected[0]} if self._collected else {}
        parts = [local]
        if self._distributed():
            parts = [None] * self.trainer.world_size
            dist.all_gather_object(parts, local)
        parts = [p for p in parts if p]
        if not parts:
            return {}
        merged: dict[str, Any] = {}
        for key in parts[0]:
            chunks = [chunk for p in parts for chunk in p[key]]
            merged[key] = sum(chunks, []) if key == "error" else torch.cat(chunks).numpy()
        _, first = np.unique(merged["index"], return_index=True)  # sorted by index; padding repeats dropped
        return {k: [v[i] for i in first] if isinstance(v, list) else v[first] for k, v in merged.items()}

    def _finish(self, stage: str) -> None:
        gathered = self._gathered()  # every process takes part, even one without batches
        if not gathered:
            return
        scores, labels = gathered["scores"], gathered["label"]
        multilabel = labels.ndim == 2
        if multilabel:  # per-finding AUROC and their mean; F1 at 0.5
            self.last_metrics = multilabel_metrics(labels, scores, self.cfg["data"]["class_names"])
        else:
            self.last_metrics = classification_metrics(labels, scores, self.cfg["data"]["class_names"])
        if "probs" in gathered:
            self.last_metrics.update(self._uncertainty(stage, gathered))
        self.last_outputs = gathered
        self.log_dict({f"{stage}/{k}": float(v) for k, v in self.last_metrics.items()}, sync_dist=False)
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        epoch = self.current_epoch if fitting or self.weights_epoch is None else self.weights_epoch
        if stage == "val" and fitting:
            self.val_history.append({"epoch": self.current_epoch, **self.last_metrics})
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            images = {}
            if not multilabel:
                matrix = confusion_matrix(labels, scores.argmax(1), scores.shape[1])
                images["confusion_matrix"] = confusion_matrix_image(matrix, self.cfg["data"]["class_names"])
            if "probs" in gathered:
                images.update(uncertainty_images(gathered, self.temperature))
            for name, image in images.items():
                self.logger.experiment.add_image(f"{stage}/{name}", image, epoch, dataformats="HWC")
        if self.trainer.is_global_zero:  # every process holds the same gathered metrics: say them once
            summary = ", ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items() if "/" not in k)
            logger.info("%s (epoch %d, %d images): %s", stage, epoch, len(labels), summary)
        self._collected = []

    def _uncertainty(self, stage: str, gathered: dict[str, Any]) -> dict[str, float]:
        """Calibration and selective-prediction metrics of the split (uncertainty.py). With evaluation.temperature
        `fit`, a validation pass first fits the temperature on its own outputs, and every later split (test, predict)
        is scaled by it; the test split never fits anything."""
        labels, probs = gathered["label"], gathered["probs"]
        sample_scores = {k: gathered[k] for k in SAMPLE_SCORES if k in gathered}
        if stage == "val" and self.cfg["evaluation"]["temperature"] == "fit":
            self.temperature = fit_temperature(labels, probs, multilabel=labels.ndim == 2)
            if self.trainer.is_global_zero:
                logger.info("temperature %.4f fitted on the validation split (%d images)", self.temperature, len(probs))
        names = self.cfg["data"]["class_names"]
        note = self.trainer.is_global_zero and not self._noted_undefined  # the same at every split of a run: once
        metrics = uncertainty_metrics(labels, probs, sample_scores, self.temperature, names, note_undefined=note)
        self._noted_undefined |= any(np.isnan(v) for k, v in metrics.items() if k.startswith("selective/aurc/"))
        if self.temperature != 1.0:  # the calibration the temperature changed, as it was before
            raw = uncertainty_metrics(labels, probs, sample_scores, 1.0, names, note_undefined=False)
            metrics.update({f"{k}_before_temperature": raw[k] for k in ("calib/ece", "calib/brier", "calib/nll")})
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_start(self) -> None:
        self._start()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def on_predict_epoch_start(self) -> None:
        self._start()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return self._step(batch)

    def on_predict_epoch_end(self) -> None:
        """Every image's outputs, gathered from all processes in index order: what predictions.csv is written from."""
        self.predictions = self._gathered()
        self._collected = []


def uncertainty_images(outputs: dict[str, Any], temperature: float) -> dict[str, np.ndarray]:
    """The reliability diagram (before and after the temperature, when it is not 1) and, single-label, the
    risk-coverage curve of every confidence score, as RGB arrays; see uncertainty_figures."""
    return {name: to_image(fig) for name, fig in uncertainty_figures(outputs, temperature).items()}


def uncertainty_figures(outputs: dict[str, Any], temperature: float) -> dict:
    """name -> matplotlib Figure: `reliability` and (single-label) `risk_coverage`, from one split's outputs."""
    labels, raw = outputs["label"], outputs["probs"]
    multilabel = labels.ndim == 2
    probs = apply_temperature(raw, temperature, multilabel)
    sets = {"probabilities": raw}
    if temperature != 1.0:
        sets = {"before temperature": raw, f"T = {temperature:.3g}": probs}
    figures = {"reliability": reliability_figure(labels, sets)}
    if not multilabel:
        correct = (probs.argmax(axis=1) == labels).astype(np.float64)
        scores = confidences(probs, {k: outputs[k] for k in SAMPLE_SCORES if k in outputs})
        curves = {
            f"{name} (AURC {aurc(correct, c):.3f})": risk_coverage(correct, c)
            for name, c in scores.items()
            if np.isfinite(c).all()
        }
        curves[f"oracle (AURC {optimal_aurc(correct):.3f})"] = risk_coverage(correct, correct)
        figures["risk_coverage"] = risk_coverage_figure(curves)
    return figures
