"""Pre-train the DCG guidance model (SPEC section 2): cross-entropy (binary cross-entropy for
multi-label) on y_global, y_local and y_fusion, Adam, the diffusion model's training split; the best
epoch by validation macro F1 (multi-label: mean AUROC) is saved to the DCG file (pretraining/dcg_file.py), the
only copy of the trained DCG that the run keeps.

    python pretraining/train_dcg.py --config configs/demo.yml [key.sub=value ...]
"""

from __future__ import annotations

import copy
import hashlib
import logging
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dataloader.datamodule import DiffMICDataModule, build_datasets
from diffmic.config import check_imagenet_weights, check_paths, dcg_ckpt_path, errors_of, unified_precision
from diffmic.durable import write_atomically
from diffmic.evaluation.evaluator import EvaluatedSystem
from diffmic.faults import (
    interruptible,
    run_folder_lock,
)
from diffmic.utils import adam, build_trainer, config_command, cosine_schedule, log_global_batch, selection_metric
from pretraining.dcg import build_dcg
from pretraining.dcg_file import save_dcg

logger = logging.getLogger(__name__)


def dcg_optimizer(params, cfg: dict) -> dict:
    """Adam at dcg.lr (SPEC 2), annealed per epoch to dcg.min_lr_ratio * lr over dcg.epochs (1.0, the
    default: constant)."""
    optimizer = adam(params, lr=cfg["dcg"]["lr"])
    schedule = cosine_schedule(optimizer, cfg["dcg"]["epochs"], cfg["dcg"]["min_lr_ratio"])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


class DCGSystem(EvaluatedSystem):
    """Lightning wrapper of the DCG for pre-training; its prediction is y_fusion (multi-label:
    sigmoid(y_fusion), so that F1 is taken at probability 0.5)."""

    lr_key = "dcg.lr"  # named when its training diverges (faults.DivergenceGuard)

    def __init__(self, cfg: dict, share: Path | None = None) -> None:
        super().__init__(cfg)
        self.dcg = build_dcg(cfg)
        self.multilabel = cfg["data"]["task"] == "multilabel"
        self.share = share  # a DCG file to use instead of training, if the first process has it (pretrain_dcg)
        self.shared = False

    def setup(self, stage: str) -> None:
        """Every process is connected here: whether the first process has the DCG file is its answer alone; if it
        has, the file goes to every machine and the fit ends before its first epoch."""
        if stage != "fit" or self.share is None:
            return
        if self.trainer.strategy.broadcast(self.share.is_file(), src=0):
            if self.trainer.is_global_zero:
                logger.info("reusing the DCG file %s", self.share)
            share_dcg_file(self.trainer, self.share)
            self.shared = True
            self.trainer.should_stop = True
        elif self.trainer.is_global_zero:
            logger.info(
                "DCG checkpoint %s does not exist: pre-training the DCG first (%d epochs)",
                self.share,
                self.cfg["dcg"]["epochs"],
            )

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
        """Scores y_fusion (multi-label: its sigmoid); probabilities its softmax (sigmoid)."""
        y_fusion = self.dcg(batch["image"]).y_fusion
        if self.multilabel:
            probs = torch.sigmoid(y_fusion)
            return {"scores": probs, "probs": probs}
        return {"scores": y_fusion, "probs": torch.softmax(y_fusion.float(), dim=1)}

    def configure_optimizers(self):
        return dcg_optimizer(self.dcg.parameters(), self.cfg)


def pretraining_precision(cfg: dict) -> dict:
    """The config the DCG pre-trains with: IEEE float32 matmuls and convolutions, and float32 where trainer.precision
    is a mixed one. The guidance model is a small share of a run's cost (two ResNet-18s, a tenth of the denoiser's
    epochs), and on the demo a DCG pre-trained under bf16-mixed guided the denoiser to a lower test accuracy (0.89 /
    0.84 against 0.96 / 0.93, seeds 7 / 8), while a float32 DCG with a bf16-mixed denoiser matched float32 (0.94 /
    0.94; README, Speed)."""
    cfg = copy.deepcopy(cfg)
    # the DCG is one of the layers kept in IEEE float32 (precision.py): it pre-trains so under a TF32 policy too
    cfg["trainer"]["float32_matmul_precision"] = "highest"
    if unified_precision(cfg["trainer"]["precision"]).endswith("-mixed"):  # Lightning's legacy names too
        cfg["trainer"]["precision"] = "32-true"
    return cfg


def pretrain_dcg(cfg: dict, datasets: dict[str, Dataset] | None = None, reuse: bool = False) -> Path:
    """Train the DCG of `cfg` on datasets["train"] for dcg.epochs, validated every epoch, and save it at
    its best epoch to the DCG file (dcg.ckpt, or <log_dir>/<name>/dcg.pt); returns that path.

    `reuse` (a new diffusion run): a DCG file the first process already has is used instead. On several processes
    the question and the file travel over the process group, not the file system: the DCG pre-trains under DDP
    with every process, or the first process's file is sent to the others, and the first process of every other
    machine writes its own copy (share_dcg_file). No process waits on a file another machine writes."""
    path = dcg_ckpt_path(cfg)
    trainer, best = build_trainer(
        pretraining_precision(cfg), f"{cfg['name']}/dcg", cfg["dcg"]["epochs"], val_every=1, best_in_memory=True
    )
    if reuse and trainer.world_size == 1 and path.is_file():
        return path  # nothing to do: the global random state is left as it is
    datasets = datasets if datasets is not None else build_datasets(cfg)
    pl.seed_everything(cfg["seed"], workers=True)
    system = DCGSystem(cfg, share=path if reuse else None)
    with errors_of("dcg.backbone_weights"):
        system.dcg.load_backbone_weights(cfg["dcg"]["backbone_weights"])
    data = DiffMICDataModule(cfg, batch_size=cfg["dcg"]["batch_size"], datasets=datasets)
    log_global_batch(trainer, cfg["dcg"]["batch_size"], cfg["dcg"]["lr"], "the DCG pre-training", "dcg.lr")
    with interruptible(trainer, "the DCG pre-training", resumable=False):
        trainer.fit(system, datamodule=data)
    if system.shared:  # the first process had the file: every machine has it now, nothing was trained
        return path
    if best.state_dict is not None:  # the best validation epoch, kept in memory on every process
        system.load_state_dict(best.state_dict)
        system.weights_epoch = best.epoch  # the final validation is logged with it
    trainer.validate(system, datamodule=data, verbose=False)
    metric = selection_metric(cfg).split("/", 1)[1]
    logger.info("DCG: validation %s %.4f at its best epoch", metric, system.last_metrics.get(metric, float("nan")))
    if trainer.is_global_zero:
        save_dcg(system.dcg, cfg, datasets["train"], path)
        logger.info("DCG saved to %s", path)
    share_dcg_file(trainer, path)
    return path


def share_dcg_file(trainer: pl.Trainer, path: Path) -> None:
    """The first process's DCG file at `path` on every machine of a run: its bytes are broadcast over the process
    group and the first process of each other machine writes them to `path` there (unless its file holds these
    bytes already, as on a shared file system), then every process waits for all machines to have it. One process:
    nothing to do."""
    if trainer.world_size == 1:
        return
    payload = trainer.strategy.broadcast(path.read_bytes() if trainer.is_global_zero else None, src=0)
    if trainer.local_rank == 0 and not trainer.is_global_zero:
        if not path.is_file() or hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(payload).digest():
            write_atomically(path, payload)
            logger.info("DCG file of the first process copied to %s (node %d)", path, trainer.node_rank)
    trainer.strategy.barrier("the DCG file on every machine")


def main(argv: list[str] | None = None) -> int:
    def work(cfg: dict) -> None:
        check_paths(cfg, need_dcg=False)
        datasets = build_datasets(cfg)
        check_imagenet_weights(cfg, ["dcg.backbone_weights"])  # offline: refused before any work
        with run_folder_lock(dcg_ckpt_path(cfg).parent, "pre-training the DCG"):
            pretrain_dcg(cfg, datasets)

    return config_command("Pre-train the DiffMIC-v2 DCG guidance model.", argv, work)


if __name__ == "__main__":
    sys.exit(main())
