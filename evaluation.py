"""Whole-split evaluation shared by the DCG pre-trainer and the diffusion model: collect scores over
a split, compute the metrics of SPEC section 7 once per epoch, log them and a confusion matrix."""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from figures import confusion_matrix_image
from metrics import classification_metrics, confusion_matrix, multilabel_metrics

logger = logging.getLogger(__name__)


class EvaluatedSystem(pl.LightningModule):
    """Subclasses implement `evaluate_batch(batch) -> {"scores": (B, C), "spread": (B,) optional}`.
    Integer labels get the single-label metrics, multi-hot labels the multi-label ones (SPEC 7).

    Evaluation noise comes from a generator re-seeded with cfg.seed at the start of every split
    pass, so evaluating a checkpoint twice (or in another process) gives the same numbers."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.last_metrics: dict[str, float] = {}
        self._collected: list[dict] = []
        self.eval_generator = torch.Generator()

    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _start(self) -> None:
        self._collected = []
        self.eval_generator.manual_seed(self.cfg["seed"])

    def _step(self, batch: dict) -> dict:
        out = {k: v.detach().float().cpu() for k, v in self.evaluate_batch(batch).items()}
        out.update(label=batch["label"].cpu(), index=batch["index"].cpu())
        if "error" in batch:  # unlabelled images: why an image could not be read ("" when it was)
            out["error"] = list(batch["error"])
        self._collected.append(out)
        return out

    def _gather(self, key: str) -> np.ndarray:
        values = torch.cat([c[key] for c in self._collected])
        if self.trainer is not None and self.trainer.world_size > 1:
            values = self.all_gather(values.to(self.device)).flatten(0, 1).cpu()
        return values.numpy()

    def _finish(self, stage: str) -> None:
        if not self._collected:
            return
        scores, labels = self._gather("scores"), self._gather("label")
        multilabel = labels.ndim == 2
        if multilabel:  # per-finding AUROC and their mean; F1 at 0.5
            self.last_metrics = multilabel_metrics(labels, scores, self.cfg["data"]["class_names"])
        else:
            self.last_metrics = classification_metrics(labels, scores)
        self.log_dict({f"{stage}/{k}": float(v) for k, v in self.last_metrics.items()}, sync_dist=False)
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero and not multilabel:
            matrix = confusion_matrix(labels, scores.argmax(1), scores.shape[1])
            image = confusion_matrix_image(matrix, self.cfg["data"]["class_names"])
            self.logger.experiment.add_image(f"{stage}/confusion_matrix", image, self.current_epoch, dataformats="HWC")
        summary = ", ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items() if "/" not in k)
        logger.info("%s (epoch %d, %d images): %s", stage, self.current_epoch, len(labels), summary)
        self._collected = []

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
