"""The classifiers DiffMIC-v2 is compared with, beside the methods (diffmic.methods.BASELINES): what a user would
train instead of a diffusion model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision

from diffmic.evaluation.evaluator import EvaluatedSystem
from diffmic.utils import adam, cosine_schedule


class ResNetBaseline(EvaluatedSystem):
    """torchvision ResNet-18 with a C-way head and cross-entropy, optimised like the DCG (a CNN trained the same
    way): Adam at dcg.lr, annealed to dcg.min_lr_ratio * lr over its own trainer.max_epochs (in the accuracy
    benchmark dcg.epochs, the same number; in benchmarks/learning_curves.py longer than the DCG's)."""

    lr_key = "dcg.lr"  # named when its training diverges (faults.DivergenceGuard)

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.net = torchvision.models.resnet18(weights=None, num_classes=cfg["data"]["num_classes"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.net(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.net(batch["image"])
        return {"scores": logits, "probs": torch.softmax(logits.float(), dim=1)}

    def configure_optimizers(self) -> dict:
        optimizer = adam(self.net.parameters(), lr=self.cfg["dcg"]["lr"])
        schedule = cosine_schedule(optimizer, self.cfg["trainer"]["max_epochs"], self.cfg["dcg"]["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
