"""Pre-train the EfficientSAM image encoder here, as a stand-in for EfficientSAM's released weights [ours].

The config's `model.image_encoder` at `data.image_size`, with a linear head on its mean-pooled features, is trained
with cross-entropy (binary cross-entropy for multi-label) on the training split; the validation split picks the epoch
(macro F1; multi-label: mean AUROC); the test split is evaluated once at the end and selects nothing. The encoder is
written in EfficientSAM's official layout (`{"model": {"image_encoder.<key>": ...}}`, as efficient_sam_vitt.pt /
efficient_sam_vits.pt), so that `model.efficientsam_weights=<file>` loads it as it loads the official file. Beside
"model" the file holds `trained_from` (data split fingerprints, seed, epochs, settings) and `classifier_head` (the
linear head, to rebuild the classifier); `<file>.json` holds the file's SHA-256, the same provenance and the
classifier's validation and test metrics.

    python pretraining/train_encoder.py --config configs/bench_ham10000.yml [key.sub=value ...]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dataloader.datamodule import DiffMICDataModule, build_datasets
from diffmic.config import check_paths, encoder_ckpt_path
from diffmic.evaluation.evaluator import EvaluatedSystem
from diffmic.faults import interruptible, run_folder_lock
from diffmic.utils import adam, build_trainer, config_command, cosine_schedule, selection_metric
from EfficientSAM import ENCODERS, ImageEncoderViT, load_efficientsam_encoder
from EfficientSAM.weights import PROVENANCE
from pretraining.dcg_file import split_fingerprint, write_atomically

logger = logging.getLogger(__name__)

HEAD = "classifier_head"  # beside "model" and PROVENANCE in the encoder file


class EncoderClassifier(EvaluatedSystem):
    """The image encoder with a linear head on its mean-pooled feature map; its prediction is the head's logits
    (multi-label: their sigmoid)."""

    lr_key = "encoder_pretraining.lr"  # named when its training diverges (faults.DivergenceGuard)

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.encoder = ImageEncoderViT(**ENCODERS[cfg["model"]["image_encoder"]])
        self.head = nn.Linear(self.encoder.embed_dim, cfg["data"]["num_classes"])
        self.multilabel = cfg["data"]["task"] == "multilabel"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(image).mean(dim=(2, 3)))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, y = self(batch["image"]), batch["label"]
        if self.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
        else:
            loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def evaluate_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self(batch["image"])
        if self.multilabel:
            probs = torch.sigmoid(logits.float())
            return {"scores": probs, "probs": probs}
        return {"scores": logits, "probs": torch.softmax(logits.float(), dim=1)}

    def configure_optimizers(self):
        e = self.cfg["encoder_pretraining"]
        optimizer = adam(self.parameters(), lr=e["lr"], weight_decay=e["weight_decay"])
        schedule = cosine_schedule(optimizer, e["epochs"], e["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def trained_from(cfg: dict, datasets: dict[str, Dataset], best_epoch: int) -> dict:
    """What an encoder file was trained from: the encoder, the image size, the training and validation splits (the
    test split is not among them: it trains and selects nothing) and the pre-training settings."""
    e = cfg["encoder_pretraining"]
    return {
        "script": "pretraining/train_encoder.py",
        "image_encoder": cfg["model"]["image_encoder"],
        "image_size": cfg["data"]["image_size"],
        "task": cfg["data"]["task"],
        "num_classes": cfg["data"]["num_classes"],
        "training_split": split_fingerprint(datasets["train"]),
        "training_images": len(datasets["train"]),
        "validation_split": split_fingerprint(datasets["val"]),
        "seed": cfg["seed"],
        "epochs": e["epochs"],
        "best_epoch": best_epoch,
        "batch_size": e["batch_size"],
        "lr": e["lr"],
        "min_lr_ratio": e["min_lr_ratio"],
        "weight_decay": e["weight_decay"],
    }


def encoder_file_bytes(system: EncoderClassifier, provenance: dict) -> bytes:
    """The encoder file: EfficientSAM's official layout under "model", the provenance and the head beside it."""
    content = {
        "model": {f"image_encoder.{k}": v.detach().cpu() for k, v in system.encoder.state_dict().items()},
        PROVENANCE: provenance,
        HEAD: {k: v.detach().cpu() for k, v in system.head.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def sidecar_path(path: Path) -> Path:
    """`<file>.json` beside the encoder file: its SHA-256, provenance and the classifier's metrics."""
    return path.with_name(path.name + ".json")


def load_classifier(cfg: dict, path: Path) -> EncoderClassifier:
    """The classifier an encoder file was trained as: the encoder through EfficientSAM's loader (the path
    model.efficientsam_weights takes), the head from the file's classifier_head."""
    system = EncoderClassifier(cfg)
    load_efficientsam_encoder(system.encoder, path, cfg["data"]["image_size"])
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if HEAD not in saved:
        raise ValueError(f"{path}: no {HEAD}; not a file written by pretraining/train_encoder.py")
    system.head.load_state_dict(saved[HEAD])
    return system


def pretrain_encoder(cfg: dict, datasets: dict[str, Dataset] | None = None) -> dict:
    """Train the classifier of `cfg` for encoder_pretraining.epochs on datasets["train"], validated every epoch;
    write its best epoch's encoder to the encoder file and `<file>.json`; return that JSON's content plus
    `val_history` (the validation metrics of every epoch)."""
    path = encoder_ckpt_path(cfg)
    e = cfg["encoder_pretraining"]
    datasets = datasets if datasets is not None else build_datasets(cfg)
    trainer, best = build_trainer(cfg, f"{cfg['name']}/encoder", e["epochs"], val_every=1, best_in_memory=True)
    pl.seed_everything(cfg["seed"], workers=True)
    system = EncoderClassifier(cfg)
    data = DiffMICDataModule(cfg, batch_size=e["batch_size"], datasets=datasets)
    with interruptible(trainer, "the encoder pre-training", resumable=False):
        trainer.fit(system, datamodule=data)
    history = list(system.val_history)
    # the best validation epoch, kept in memory (validated every epoch, so there is one); the final validation is
    # logged with its epoch
    system.load_state_dict(best.state_dict)
    best_epoch = system.weights_epoch = best.epoch
    metric = selection_metric(cfg).split("/", 1)[1]
    trainer.validate(system, datamodule=data, verbose=False)
    val = dict(system.last_metrics)
    trainer.test(system, datamodule=data, verbose=False)
    test = dict(system.last_metrics)
    logger.info(
        "encoder classifier: validation %s %.4f (epoch %d), test %s %.4f",
        metric,
        val[metric],
        best_epoch + 1,
        metric,
        test[metric],
    )
    report = {
        "file": path.name,
        "trained_from": trained_from(cfg, datasets, best_epoch),
        "val": val,
        "test": test,
        "val_history": history,
    }
    if trainer.is_global_zero:
        content = encoder_file_bytes(system, report["trained_from"])
        report["sha256"] = hashlib.sha256(content).hexdigest()
        write_atomically(path, content)
        write_atomically(sidecar_path(path), json.dumps(report, indent=2).encode())
        logger.info(
            "encoder saved to %s (SHA-256 %s), its provenance and metrics to %s",
            path,
            report["sha256"][:12],
            sidecar_path(path),
        )
    return report


def main(argv: list[str] | None = None) -> int:
    def work(cfg: dict) -> None:
        check_paths(cfg, need_dcg=False)
        datasets = build_datasets(cfg)
        with run_folder_lock(encoder_ckpt_path(cfg).parent, "pre-training the image encoder"):
            pretrain_encoder(cfg, datasets)

    return config_command(__doc__.splitlines()[0], argv, work)


if __name__ == "__main__":
    sys.exit(main())
