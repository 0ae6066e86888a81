"""The train / validation / test splits of a config as a LightningDataModule."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytorch_lightning as pl
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from config import ConfigError
from dataloader.lists import ImageList, read_list
from dataloader.synthetic import SyntheticPatterns
from dataloader.transforms import build_transform

logger = logging.getLogger(__name__)


def carve_validation(frame, fraction: float, seed: int):
    """Split a training list into (train, val): stratified by label, seeded."""
    counts = frame["label"].value_counts()
    stratify = frame["label"] if counts.min() >= 2 and round(len(frame) * fraction) >= len(counts) else None
    if stratify is None:
        logger.warning("validation split carved without stratification (a class has fewer than 2 samples "
                       "or the split is smaller than the number of classes)")
    train, val = train_test_split(frame, test_size=fraction, random_state=seed, stratify=stratify)
    return train.reset_index(drop=True), val.reset_index(drop=True)


def build_datasets(cfg: dict) -> dict[str, Dataset]:
    """{'train', 'val', 'test'} datasets of a config; raises ConfigError for bad lists or files."""
    data = cfg["data"]
    train_tf, eval_tf = build_transform(cfg, train=True), build_transform(cfg, train=False)
    if data["dataset"] == "synthetic":
        syn, seed = data["synthetic"], cfg["seed"]
        make = lambda n, offset, tf: SyntheticPatterns(n, data["num_classes"], data["image_size"],  # noqa: E731
                                                       syn["pattern_size"], seed + offset, tf)
        return {"train": make(syn["num_train"], 0, train_tf), "val": make(syn["num_val"], 1, eval_tf),
                "test": make(syn["num_test"], 2, eval_tf)}
    train = read_list(data["train_list"])
    if data["val_list"] is None:
        train, val = carve_validation(train, data["val_fraction"], cfg["seed"])
        logger.info("no data.val_list: %d of the training images held out for validation (seed %d)",
                    len(val), cfg["seed"])
        val_name = f"{data['train_list']} (held-out part)"
    else:
        val, val_name = read_list(data["val_list"]), data["val_list"]
    test = read_list(data["test_list"])
    c, root = data["num_classes"], data["root"]
    sets = {"train": ImageList(train, root, c, data["train_list"], train_tf),
            "val": ImageList(val, root, c, val_name, eval_tf),
            "test": ImageList(test, root, c, data["test_list"], eval_tf)}
    present = set(np.unique(sets["train"].labels))
    if len(present) < 2:
        raise ConfigError(f"{data['train_list']}: the training split holds a single class")
    for split in ("val", "test"):
        absent = sorted(set(np.unique(sets[split].labels)) - present)
        if absent:
            logger.warning("classes %s of the %s split never occur in training", absent, split)
    return sets


class DiffMICDataModule(pl.LightningDataModule):
    """Loaders over `build_datasets(cfg)`; evaluation loaders keep a fixed order (sampling noise is
    drawn per batch from a seeded generator, so a fixed order makes evaluation reproducible)."""

    def __init__(self, cfg: dict, batch_size: int | None = None, datasets: dict[str, Dataset] | None = None
                 ) -> None:
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        self.batch_size = batch_size or cfg["data"]["batch_size"]
        self.datasets = datasets if datasets is not None else build_datasets(self.cfg)

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset, workers = self.datasets[split], self.cfg["data"]["num_workers"]
        # BatchNorm cannot train on a final batch of one image
        drop_last = train and len(dataset) > self.batch_size
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, drop_last=drop_last,
                          num_workers=workers, persistent_workers=workers > 0, pin_memory=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
