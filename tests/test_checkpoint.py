"""best.ckpt: the highest validation score, the later epoch on a tie (utils.BestCheckpoint)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffmic.config import load_config
from diffmic.utils import build_trainer


class ScriptedScore(pl.LightningModule):
    """Logs a given val/f1 at each epoch."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/f1", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "scores, best_epoch",
    [
        ([0.5, 0.7, 0.7, 0.6], 2),  # a tie: the later epoch
        ([0.5, 0.8, 0.7, 0.7], 1),  # a strict maximum stays
        ([0.9, 0.1, 0.2, 0.3], 0),
    ],
)
def test_best_checkpoint_prefers_the_later_epoch_on_a_tie(tmp_path, scores, best_epoch):
    cfg = load_config(None, [f"trainer.log_dir={tmp_path}", "trainer.accelerator=cpu"])
    trainer, best = build_trainer(cfg, "tie", max_epochs=len(scores), val_every=1)
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)
    trainer.fit(ScriptedScore(scores), train_dataloaders=loader, val_dataloaders=loader)
    assert best.best_model_path.endswith("best.ckpt")
    assert torch.load(best.best_model_path, weights_only=False)["epoch"] == best_epoch
    assert float(best.best_model_score) == pytest.approx(max(scores))
