"""Pre-train the DCG guidance model (SPEC section 2): cross-entropy (binary cross-entropy for
multi-label) on y_global, y_local and y_fusion, Adam, the diffusion model's training split; the best
epoch by validation macro F1 (multi-label: mean AUROC) is saved. With dcg.cross_fit_folds = k >= 2 [ours],
k DCGs are trained, member j without fold j, and saved together with the fold of every training image.

    python pretraining/train_dcg.py --config configs/demo.yml [key.sub=value ...]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import Dataset, Subset  # noqa: E402

from config import ConfigError, check_paths, dcg_ckpt_path, load_config  # noqa: E402
from dataloader.datamodule import DiffMICDataModule, build_datasets  # noqa: E402
from evaluation import EvaluatedSystem  # noqa: E402
from pretraining.cross_fit import CrossFitDCG, assign_folds  # noqa: E402
from pretraining.dcg import DCG, build_dcg  # noqa: E402
from utils import adam, build_trainer, cosine_schedule, selection_metric, setup_logging  # noqa: E402

logger = logging.getLogger(__name__)


def dcg_meta(cfg: dict) -> dict:
    """The config values a saved DCG must agree with."""
    return {"num_classes": cfg["data"]["num_classes"], "image_size": cfg["data"]["image_size"],
            "num_rois": cfg["dcg"]["num_rois"], "roi_size": cfg["dcg"]["roi_size"],
            "percent_t": cfg["dcg"]["percent_t"], "task": cfg["data"]["task"],
            "cross_fit_folds": cfg["dcg"]["cross_fit_folds"]}


def save_dcg(dcg: DCG | CrossFitDCG, cfg: dict, path: Path) -> None:
    """One DCG: its state dict. Cross-fitted: the members' state dicts and the fold of every training image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(dcg, CrossFitDCG):
        content = {"members": [m.state_dict() for m in dcg.members], "fold_of": dcg.fold_of.cpu()}
    else:
        content = {"state_dict": dcg.state_dict()}
    torch.save({**content, "meta": dcg_meta(cfg)}, path)


def load_dcg(dcg: DCG | CrossFitDCG, cfg: dict, path: Path) -> None:
    """Load DCG weights saved by `save_dcg`; a file made for other settings is a config error. A
    cross-fitted DCG whose folds are already set must have been trained on exactly those folds."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    key = "members" if isinstance(dcg, CrossFitDCG) else "state_dict"
    if not isinstance(saved, dict) or ("state_dict" not in saved and "members" not in saved):
        raise ConfigError(f"config key dcg.ckpt: {path} is not a DCG file written by pretraining/train_dcg.py")
    expected = dcg_meta(cfg)
    wrong = {k: v for k, v in saved.get("meta", {}).items() if expected.get(k) != v}
    if key not in saved:  # files from before dcg.cross_fit_folds carry no such meta key
        wrong.setdefault("cross_fit_folds", len(saved["members"]) if "members" in saved else 0)
    if wrong:
        raise ConfigError(f"config key dcg.ckpt: {path} was trained with {wrong}, the config asks for "
                          f"{ {k: expected[k] for k in wrong} }; delete the file or point dcg.ckpt elsewhere")
    if key == "state_dict":
        dcg.load_state_dict(saved["state_dict"])
    else:
        fold_of = saved["fold_of"]
        if dcg.fold_of.numel() and not torch.equal(dcg.fold_of.cpu(), fold_of):
            raise ConfigError(f"config key dcg.ckpt: {path} was cross-fitted on other folds than this run's "
                              "(another seed or training split); delete the file or point dcg.ckpt elsewhere")
        for member, state in zip(dcg.members, saved["members"]):
            member.load_state_dict(state)
        dcg.set_folds(fold_of)
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


def train_one_dcg(cfg: dict, datasets: dict[str, Dataset], run_name: str) -> DCG:
    """Train one DCG on datasets["train"] for dcg.epochs, validated every epoch; returns it at its best epoch."""
    pl.seed_everything(cfg["seed"], workers=True)
    system = DCGSystem(cfg)
    system.dcg.load_backbone_weights(cfg["dcg"]["backbone_weights"])
    data = DiffMICDataModule(cfg, batch_size=cfg["dcg"]["batch_size"], datasets=datasets)
    trainer, best = build_trainer(cfg, run_name, cfg["dcg"]["epochs"], val_every=1)
    trainer.fit(system, datamodule=data)
    trainer.validate(system, datamodule=data, ckpt_path=best.best_model_path or None, verbose=False)
    metric = selection_metric(cfg).split("/", 1)[1]
    logger.info("%s: validation %s %.4f at its best epoch", run_name, metric,
                system.last_metrics.get(metric, float("nan")))
    return system.dcg


def pretrain_dcg(cfg: dict, datasets: dict[str, Dataset] | None = None) -> Path:
    """Train the DCG of `cfg` (or its dcg.cross_fit_folds members, member j without fold j of the training
    split), save the best-validation weights to the DCG checkpoint path, return it."""
    path = dcg_ckpt_path(cfg)
    datasets = datasets if datasets is not None else build_datasets(cfg)
    k = cfg["dcg"]["cross_fit_folds"]
    if k < 2:
        dcg = train_one_dcg(cfg, datasets, f"{cfg['name']}/dcg")
    else:
        folds = assign_folds(datasets["train"].labels, k, cfg["seed"])
        members = []
        for j in range(k):
            rows = np.flatnonzero(folds != j).tolist()
            logger.info("cross-fitted DCG member %d of %d: %d training images (fold %d, %d images, left out)",
                        j + 1, k, len(rows), j, len(folds) - len(rows))
            members.append(train_one_dcg(cfg, {**datasets, "train": Subset(datasets["train"], rows)},
                                         f"{cfg['name']}/dcg_fold{j}"))
        dcg = CrossFitDCG(members)
        dcg.set_folds(folds)
    save_dcg(dcg, cfg, path)
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
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    pretrain_dcg(cfg, datasets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
