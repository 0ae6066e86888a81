"""Pre-train the DCG guidance model (SPEC section 2): cross-entropy (binary cross-entropy for
multi-label) on y_global, y_local and y_fusion, Adam, the diffusion model's training split; the best
epoch by validation macro F1 (multi-label: mean AUROC) is saved to the DCG file.

    python pretraining/train_dcg.py --config configs/demo.yml [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from config import ConfigError, check_paths, dcg_ckpt_path, errors_of, load_config
from dataloader.datamodule import DiffMICDataModule, build_datasets
from evaluation import EvaluatedSystem
from pretraining.dcg import DCG, build_dcg
from utils import adam, build_trainer, cosine_schedule, selection_metric, setup_logging

logger = logging.getLogger(__name__)


def dcg_meta(cfg: dict) -> dict:
    """The config values a saved DCG must agree with."""
    return {
        "num_classes": cfg["data"]["num_classes"],
        "image_size": cfg["data"]["image_size"],
        "num_rois": cfg["dcg"]["num_rois"],
        "roi_size": cfg["dcg"]["roi_size"],
        "percent_t": cfg["dcg"]["percent_t"],
        "task": cfg["data"]["task"],
    }


def save_dcg(dcg: DCG, cfg: dict, path: Path) -> None:
    """The DCG's state dict and the settings it was trained with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": dcg.state_dict(), "meta": dcg_meta(cfg)}, path)


def load_dcg(dcg: DCG, cfg: dict, path: Path) -> None:
    """Load DCG weights saved by `save_dcg`; a file made for other settings is a config error."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ConfigError(f"config key dcg.ckpt: {path} is not a DCG file written by pretraining/train_dcg.py")
    expected = dcg_meta(cfg)
    wrong = {k: v for k, v in saved.get("meta", {}).items() if k in expected and expected[k] != v}
    if wrong:
        raise ConfigError(
            f"config key dcg.ckpt: {path} was trained with {wrong}, the config asks for "
            f"{ {k: expected[k] for k in wrong} }; delete the file or point dcg.ckpt elsewhere"
        )
    dcg.load_state_dict(saved["state_dict"])
    logger.info("DCG weights loaded from %s", path)


def dcg_optimizer(params, cfg: dict) -> dict:
    """Adam at dcg.lr (SPEC 2), annealed per epoch to dcg.min_lr_ratio * lr over dcg.epochs (1.0, the
    default: constant)."""
    optimizer = adam(params, lr=cfg["dcg"]["lr"])
    schedule = cosine_schedule(optimizer, cfg["dcg"]["epochs"], cfg["dcg"]["min_lr_ratio"])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


class DCGSystem(EvaluatedSystem):
    """Lightning wrapper of the DCG for pre-training; its prediction is y_fusion (multi-label:
    sigmoid(y_fusion), so that F1 is taken at probability 0.5)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.dcg = build_dcg(cfg)
        self.multilabel = cfg["data"]["task"] == "multilabel"

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out, y = self.dcg(batch["image"]), batch["label"]
        if self.multilabel:
            y = y.to(out.y_fusion.dtype)
            criterion = F.binary_cross_entropy_with_logits
        else:
            criterion = F.cross_entropy
        loss = criterion(out.y_global, y) + criterion(out.y_local, y) + criterion(out.y_fusion, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        y_fusion = self.dcg(batch["image"]).y_fusion
        return {"scores": torch.sigmoid(y_fusion) if self.multilabel else y_fusion}

    def configure_optimizers(self):
        return dcg_optimizer(self.dcg.parameters(), self.cfg)


def pretrain_dcg(cfg: dict, datasets: dict[str, Dataset] | None = None) -> Path:
    """Train the DCG of `cfg` on datasets["train"] for dcg.epochs, validated every epoch, and save it at
    its best epoch to the DCG file (dcg.ckpt, or <log_dir>/<name>/dcg.pt); returns that path."""
    path = dcg_ckpt_path(cfg)
    datasets = datasets if datasets is not None else build_datasets(cfg)
    pl.seed_everything(cfg["seed"], workers=True)
    system = DCGSystem(cfg)
    with errors_of("dcg.backbone_weights"):
        system.dcg.load_backbone_weights(cfg["dcg"]["backbone_weights"])
    data = DiffMICDataModule(cfg, batch_size=cfg["dcg"]["batch_size"], datasets=datasets)
    trainer, best = build_trainer(cfg, f"{cfg['name']}/dcg", cfg["dcg"]["epochs"], val_every=1)
    trainer.fit(system, datamodule=data)
    trainer.validate(system, datamodule=data, ckpt_path=best.best_model_path or None, verbose=False)
    metric = selection_metric(cfg).split("/", 1)[1]
    logger.info("DCG: validation %s %.4f at its best epoch", metric, system.last_metrics.get(metric, float("nan")))
    save_dcg(system.dcg, cfg, path)
    logger.info("DCG saved to %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pre-train the DiffMIC-v2 DCG guidance model.")
    parser.add_argument("--config", help="YAML config (default: configs/demo.yml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg, need_dcg=False)
        datasets = build_datasets(cfg)
        pretrain_dcg(cfg, datasets)
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
