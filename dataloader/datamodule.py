"""The train / validation / test splits of a config as a LightningDataModule."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from dataloader.checks import verify_images
from dataloader.lists import ImageList, NameIndex, SplitList, read_list
from dataloader.medmnist import MedMNISTSplit, ensure_medmnist
from dataloader.synthetic import NUM_TEXTURES, SyntheticPatterns
from dataloader.transforms import ModelInput, build_transform, decode_side
from dataloader.workers import SeededAugmentation, SeededIndices, resolve_num_workers, usable_cpus
from diffmic.config import ConfigError

logger = logging.getLogger(__name__)


def evaluation_batches(num_images: int, batch_size: int, world: int) -> list[list[int]]:
    """The one-process evaluation batches: consecutive images, batch_size each, the last one shorter. Only where
    there are fewer such batches than processes are they split finer, into exactly `world` batches of consecutive
    images whose sizes differ by at most one, so that every process has one (the processes gather their outputs
    together, and Lightning refuses an empty loader). Needs num_images >= world (DiffMICDataModule refuses fewer)."""
    assert num_images >= world >= 1, f"{num_images} images cannot give each of {world} processes a batch"
    if -(-num_images // batch_size) >= world:
        return [list(range(start, min(start + batch_size, num_images))) for start in range(0, num_images, batch_size)]
    # the first (num_images % world) batches take one image more
    bounds = [k * (num_images // world) + min(k, num_images % world) for k in range(world + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(world)]


class FixedBatches(Sampler):
    """A batch sampler that yields the given batches of indices, in order, every epoch."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def carve_validation(split: SplitList, fraction: float, seed: int) -> tuple[SplitList, SplitList]:
    """Split a training list into (train, val): seeded, stratified by class when single-label."""
    rows, labels = np.arange(len(split)), split.labels
    stratify = None
    if labels.ndim == 1:
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        if counts.min() >= 2 and round(len(rows) * fraction) >= len(counts):
            stratify = labels
        else:
            logger.warning(
                "validation split carved without stratification (a class has fewer than 2 samples "
                "or the split is smaller than the number of classes)"
            )
    train, val = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    return split.subset(np.sort(train), split.name), split.subset(np.sort(val), f"{split.name} (held-out part)")


def _list_datasets(cfg: dict, train_tf, eval_tf) -> dict[str, Dataset]:
    data = cfg["data"]

    def read(path: str) -> SplitList:
        return read_list(path, data["num_classes"], data["task"] == "multilabel", data["class_names"])

    train = read(data["train_list"])
    if data["val_list"] is None:
        train, val = carve_validation(train, data["val_fraction"], cfg["seed"])
        logger.info(
            "no data.val_list: %d of the %d training images held out for validation (seed %d)",
            len(val),
            len(train) + len(val),
            cfg["seed"],
        )
    else:
        val = read(data["val_list"])
    test = read(data["test_list"])
    names = NameIndex(data["root"])  # one scan of the root for all three lists
    sets = {
        "train": ImageList(train, data["root"], train_tf, decode_side(cfg, train=True), names),
        "val": ImageList(val, data["root"], eval_tf, names=names),
        "test": ImageList(test, data["root"], eval_tf, names=names),
    }
    if data["verify_images"] != "off":
        checked: set = set()
        for split, lst in zip(("train", "val", "test"), (train, val, test), strict=True):
            new = [p for p in sets[split].paths if p not in checked]
            verify_images(new, lst.name, full=data["verify_images"] == "full")
            checked.update(new)
    return sets


def _medmnist_datasets(cfg: dict, train_tf, eval_tf) -> dict[str, Dataset]:
    data = cfg["data"]
    path = ensure_medmnist(data["root"], data["flag"], data["medmnist_size"], data["download"])
    multilabel = data["task"] == "multilabel"
    return {
        split: MedMNISTSplit(path, split, train_tf if split == "train" else eval_tf, multilabel)
        for split in ("train", "val", "test")
    }


def check_labels(cfg: dict, sets: dict[str, Dataset]) -> None:
    """The config's class count must match the labels; a class (finding) absent from training is
    worth a warning, since the model can never learn it."""
    c = cfg["data"]["num_classes"]
    where = cfg["data"]["train_list"] or cfg["data"]["root"] or "the data set"
    labels = {split: np.asarray(ds.labels) for split, ds in sets.items()}
    if labels["train"].ndim == 2:
        widths = {split: y.shape[1] for split, y in labels.items()}
        if any(w != c for w in widths.values()):
            raise ConfigError(
                f"config key data.num_classes: {c}, but {where} has multi-hot labels of width "
                f"{widths}; set data.num_classes to match"
            )
        unseen = np.flatnonzero(labels["train"].sum(axis=0) == 0)
        if len(unseen):
            logger.warning("findings %s are never positive in the training split", unseen.tolist())
        return
    used = set(np.unique(np.concatenate(list(labels.values()))).tolist())
    if max(used) >= c or min(used) < 0:
        raise ConfigError(
            f"config key data.num_classes: {c}, but {where} has labels up to {max(used)}; set data.num_classes to match"
        )
    if len(used) < c:
        raise ConfigError(
            f"config key data.num_classes: {c}, but the labels of the train, val and test splits use "
            f"only {len(used)} classes {sorted(used)}; set data.num_classes to match the data"
        )
    present = set(np.unique(labels["train"]).tolist())
    if len(present) < 2:
        raise ConfigError(f"{where}: the training split holds a single class")
    for split in ("val", "test"):
        absent = sorted(set(np.unique(labels[split]).tolist()) - present)
        if absent:
            logger.warning("classes %s of the %s split never occur in training", absent, split)


def check_synthetic(data: dict) -> None:
    """The demo set's class count, which its generator would otherwise refuse with an assertion (its sizes are rows
    of config.RULES, checked when the config is loaded)."""
    if data["num_classes"] > NUM_TEXTURES:
        raise ConfigError(
            f"config key data.num_classes: the synthetic demo set has {NUM_TEXTURES} class textures, "
            f"got {data['num_classes']}"
        )


def build_datasets(cfg: dict) -> dict[str, Dataset]:
    """{'train', 'val', 'test'} datasets of a config; raises ConfigError for bad lists, files or labels."""
    data = cfg["data"]
    train_tf, eval_tf = build_transform(cfg, train=True), build_transform(cfg, train=False)
    if data["dataset"] == "synthetic":
        check_synthetic(data)
        syn, seed = data["synthetic"], cfg["seed"]

        def make(n: int, offset: int, tf) -> SyntheticPatterns:  # each split from its own seed
            return SyntheticPatterns(n, data["num_classes"], data["image_size"], syn["pattern_size"], seed + offset, tf)

        return {
            "train": make(syn["num_train"], 0, train_tf),
            "val": make(syn["num_val"], 1, eval_tf),
            "test": make(syn["num_test"], 2, eval_tf),
        }
    if data["dataset"] == "medmnist":
        sets = _medmnist_datasets(cfg, train_tf, eval_tf)
    else:
        sets = _list_datasets(cfg, train_tf, eval_tf)
    check_labels(cfg, sets)
    logger.info("data: %s", ", ".join(f"{split} {len(ds)} images" for split, ds in sets.items()))
    return sets


def check_evaluation_sizes(datasets: dict[str, Dataset], world: int) -> None:
    """Every process evaluates at least one image: a split with fewer images than processes is refused (before any
    work, by the command line) instead of leaving a process without a batch."""
    for split, dataset in datasets.items():
        if split != "train" and len(dataset) < world:
            raise ConfigError(
                f"the {split} split has {len(dataset)} image(s), fewer than the {world} processes of the run "
                "(trainer.devices x trainer.num_nodes): evaluate on fewer devices, e.g. trainer.devices=1"
            )


class DiffMICDataModule(pl.LightningDataModule):
    """Loaders over `build_datasets(cfg)`; evaluation loaders keep a fixed order (sampling noise is
    drawn per batch from a seeded generator, so a fixed order makes evaluation reproducible). Their batches hold
    8-bit images, which `on_after_batch_transfer` turns into the normalised float32 the models read, on the device."""

    def __init__(self, cfg: dict, batch_size: int | None = None, datasets: dict[str, Dataset] | None = None) -> None:
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        self.batch_size = batch_size or cfg["data"]["batch_size"]
        self.datasets = datasets if datasets is not None else build_datasets(self.cfg)
        self._workers_logged = False
        self.model_input = ModelInput()

    @property
    def num_workers(self) -> int:
        """Loader workers of each process: data.num_workers, auto resolved for this machine and the processes the
        trainer runs on it (one without a trainer)."""
        per_node = self.trainer.num_devices if self.trainer is not None else 1
        workers = resolve_num_workers(self.cfg["data"]["num_workers"], per_node)
        if not self._workers_logged:
            self._workers_logged = True
            logger.info(
                "data loading: %d worker process(es) per process (data.num_workers: %s; %d CPUs usable, %d process(es) "
                "on this machine)",
                workers,
                self.cfg["data"]["num_workers"],
                usable_cpus(),
                per_node,
            )
        return workers

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset, workers = self.datasets[split], self.num_workers
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        # page-locked batches when the model is on a GPU: the copy to the device runs without staging (no change to
        # any number); on the CPU pinning would only cost time
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        common = {"num_workers": workers, "pin_memory": on_gpu}
        if workers > 0:
            # workers live for the whole fit, so the seed a loader gives them is drawn once, at its first epoch: from
            # torch's global generator that draw would make a resumed fit's random stream part from the uninterrupted
            # one's. Nothing draws from the workers' own generators (training images are seeded one by one)
            common["generator"] = torch.Generator().manual_seed(self.cfg["seed"])
        if not train:
            check_evaluation_sizes({split: dataset}, world)
            # evaluation in a fixed order; on several processes each takes whole batches of the one-process
            # batching in turn, so every image is computed in the same batch as on one device (same numbers)
            batches = FixedBatches(evaluation_batches(len(dataset), self.batch_size, world)[rank::world])
            return DataLoader(dataset, batch_sampler=batches, persistent_workers=workers > 0, **common)
        # BatchNorm cannot train on a final batch of one image
        drop_last = len(dataset) // world > self.batch_size
        if drop_last and (len(dataset) // world) % self.batch_size:
            logger.info(
                "training: the last %d of %d images (an incomplete batch) are left out of each epoch; "
                "the order is reshuffled every epoch, so every image is used",
                (len(dataset) // world) % self.batch_size * world,
                len(dataset),
            )
        # several processes: each a shuffled share of the images (the same seed everywhere, reshuffled by epoch)
        if world > 1:
            order: Sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=self.cfg["seed"])
        else:
            order = RandomSampler(dataset)  # the one DataLoader(shuffle=True) makes
        if workers > 0:
            # each image's augmentations from a seed the main process draws with the epoch's order: the same images
            # whatever the number of workers, and a resume repeats them although the workers persist (see README,
            # resume). Without workers the transforms draw from the global generator, as they always have
            dataset, order = SeededAugmentation(dataset), SeededIndices(order)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=order,
            drop_last=drop_last,
            persistent_workers=workers > 0,
            **common,
        )

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """The transforms' device half (transforms.ModelInput), for every fit, validation, test and predict of every
        model that loads through this module. Lightning converts a batch's float tensors to the precision's input
        dtype (64-true: float64) before the transfer, when the images are still 8 bits: that conversion is applied
        again here, so that the images reach the models in the dtype they had before."""
        batch = self.model_input(batch)
        return self.trainer.precision_plugin.convert_input(batch) if self.trainer is not None else batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        """The `predict` split when there is one (unlabelled images, predict --input), else the test list."""
        return self._loader("predict" if "predict" in self.datasets else "test", train=False)
