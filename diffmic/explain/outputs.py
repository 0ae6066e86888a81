"""Where explanations (explain.py) go: one PNG per image for `predict --explain DIR`, and TensorBoard images
`val/explain/<i>` of a fixed, seeded set of validation images at every validation of a fit (explain.val_images).

Both run the model outside Lightning's loops, on its device and under the precision context that evaluation uses,
and on the first process only. Neither touches a random stream that training or evaluation draws from (the images
are read from the data set directly, not through a DataLoader, which would draw a seed from torch's generator), so
every metric and prediction is the same with and without them."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import move_data_to_device
from torch.utils.data import Dataset, default_collate

from dataloader.datamodule import evaluation_batches
from dataloader.lists import IMAGE_SUFFIXES
from dataloader.transforms import ModelInput
from diffmic.config import OptionError
from diffmic.evaluation.figures import save, to_image
from diffmic.explain.explanation import Explanation, explain_batch
from diffmic.explain.figure import explanation_figure

logger = logging.getLogger(__name__)


def check_explain_folder(folder: str | Path) -> Path:
    """predict's explain folder, before any work: an OptionError when the folder (or one above it) is a file, or when
    the figures could not be written there (probed with a temporary file, which also catches read-only file systems and
    root's permission checks). Nothing is left behind; the folder itself is made when the figures are written."""
    path = Path(folder).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OptionError("explain", path, " is a file, not a folder; give a folder for the figures")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError("explain", path, f": {existing} is a file, so no folder can be made there; give a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".explain-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise OptionError(
            "explain", path, f": cannot write in {existing} ({err.strerror or err}); give a folder you can write"
        ) from None
    return path


def figure_names(ids: list) -> list[str]:
    """A PNG file name for each image id: the id without its image suffix, path separators as `__`, other
    characters outside [A-Za-z0-9._-] as `_`; an id that would repeat a name gets its index appended (and more
    where that too is taken), so no figure overwrites another."""
    names, taken = [], set()
    for i, image_id in enumerate(ids):
        stem = str(image_id)
        if Path(stem).suffix.lower() in IMAGE_SUFFIXES:
            stem = stem[: -len(Path(stem).suffix)]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__").replace("\\", "__")).strip("._")
        stem = stem or f"image_{i}"
        name = stem if stem not in taken else f"{stem}_{i}"
        while name in taken:  # an earlier id may itself be called <stem>_<i>
            name = f"{name}_{i}"
        taken.add(name)
        names.append(f"{name}.png")
    return names


def explain_items(
    system, trainer: pl.Trainer, dataset: Dataset, indices: list[int], evaluation
) -> tuple[Explanation, list[str]]:
    """The explanation of the data set's images `indices`, computed as one batch on the trainer's device under
    `evaluation` (the precision plugin's context manager of the split: predict_step_context, val_step_context),
    and why each image could not be read ("" when it was; predict --input). The batch reaches the model as a loader's
    does: on the device, normalised there (transforms.ModelInput), in the precision's input dtype."""
    batch = default_collate([dataset[i] for i in indices])
    errors = list(batch.pop("error", [""] * len(indices)))
    plugin = trainer.precision_plugin
    batch = plugin.convert_input(ModelInput()(move_data_to_device(batch, trainer.strategy.root_device)))
    with torch.no_grad(), evaluation():
        return explain_batch(system, batch), errors


def write_explanations(
    system, trainer: pl.Trainer, dataset: Dataset, folder: Path, limit: int | None, class_names: list[str]
) -> int:
    """predict --explain: a figure for each of the first `limit` images (all: None) of `dataset`, in folder, named
    after the image ids; returns how many were written. The images are explained in the batches of the one-process
    evaluation (data.batch_size), the batches predict computed them in, so a figure's scores are the CSV's.
    An image that could not be read (predict --input) gets no figure; its CSV row says why."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    names = figure_names(list(dataset.ids))
    system.to(trainer.strategy.root_device).eval()
    folder.mkdir(parents=True, exist_ok=True)
    written, unreadable = 0, 0
    for indices in evaluation_batches(len(dataset), system.cfg["data"]["batch_size"], 1):
        if indices[0] >= count:
            break
        expl, errors = explain_items(system, trainer, dataset, indices, trainer.precision_plugin.predict_step_context)
        for b, i in enumerate(indices):
            if i >= count:
                break
            if errors[b]:
                unreadable += 1
                continue
            save(explanation_figure(expl, b, class_names, str(dataset.ids[i])), folder / names[i])
            written += 1
    if unreadable:
        logger.warning("%d unreadable image(s) got no explanation figure (their CSV rows say why)", unreadable)
    logger.info("wrote %d explanation figure(s) to %s", written, folder)
    return written


def validation_indices(size: int, count: int, seed: int) -> list[int]:
    """The fixed validation images of explain.val_images: `count` of `size`, drawn once from `seed`, sorted."""
    chosen = np.random.default_rng(seed).choice(size, size=min(count, size), replace=False)
    return sorted(int(i) for i in chosen)


class ExplainValidation(pl.Callback):
    """At the end of every validation of a fit, the figures of explain.val_images fixed validation images (seeded
    with `seed`) as TensorBoard images val/explain/<i>, at the epoch's step: the guidance sharpening over training.
    It runs once the split's metrics are taken (on_validation_end, the model still in eval mode), so that its
    evaluation of the images cannot count in them (e.g. in a count of diverged samples)."""

    def __init__(self, cfg: dict) -> None:
        self.count = cfg["explain"]["val_images"]
        self.seed = cfg["seed"]
        self.class_names = cfg["data"]["class_names"] or [str(c) for c in range(cfg["data"]["num_classes"])]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if not (self.count and fitting and trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger)):
            return
        dataset = getattr(trainer.datamodule, "datasets", {}).get("val")
        if dataset is None or len(dataset) == 0:
            return
        indices = validation_indices(len(dataset), self.count, self.seed)
        expl, _ = explain_items(pl_module, trainer, dataset, indices, trainer.precision_plugin.val_step_context)
        for b, i in enumerate(indices):
            image = to_image(explanation_figure(expl, b, self.class_names, str(dataset.ids[i])))
            trainer.logger.experiment.add_image(f"val/explain/{b}", image, pl_module.current_epoch, dataformats="HWC")
