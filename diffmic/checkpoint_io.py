"""How a Trainer writes its checkpoints (Lightning's CheckpointIO extension point), and a look at the disk before the
first epoch.

Lightning's own writer serialises the whole checkpoint in memory, writes it to a temporary file in the system temp
folder and copies that over the destination, opening the destination first: a small /tmp fails every save, and a full
disk or a kill during the copy leaves a truncated `last.ckpt` where the good one was. AtomicCheckpointIO writes
straight into a temporary file beside the destination and renames it over (durable.atomic_open): the previous file
stays whole until the new one is complete on disk, and a failed save ends the run with one line (WriteFailed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, BinaryIO

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from diffmic.durable import EXIT_WRITE, atomic_open, free_space, human_size, remove_leftovers

logger = logging.getLogger(__name__)


def tensor_bytes(content: Any) -> int:
    """Bytes of the tensors in a nested checkpoint (dicts, lists, tuples), each storage counted once: about the size
    torch.save writes, which adds little beyond them."""
    seen: set[int] = set()
    total = 0
    stack = [content]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen or storage.nbytes() == 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose save is atomic in the checkpoint's own folder: torch.save into
    `<file>.<host>.<pid>.partial` beside it, flush, fsync, rename over it. A leftover temporary file of a killed
    process is removed by the next save of that file (durable.remove_leftovers). Loading and removing are
    TorchCheckpointIO's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_open(Path(path), "wb", size=lambda: tensor_bytes(checkpoint)) as handle:
            self.serialise(checkpoint, handle)

    def serialise(self, checkpoint: dict[str, Any], handle: BinaryIO) -> None:
        """Write the checkpoint into the open temporary file (straight to disk: no copy of it in memory)."""
        torch.save(checkpoint, handle)


# ---------------------------------------------------------------------------------------------- free space


# the optimiser's state per parameter, in copies of the parameter: Adam's two moments (three with AMSGrad), SGD's
# momentum buffer
def _state_copies(optimizer: torch.optim.Optimizer, group: dict) -> int:
    name = type(optimizer).__name__
    if name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax"):
        return 3 if group.get("amsgrad") else 2
    if name == "SGD":
        return 1 if group.get("momentum", 0) else 0
    return 2  # an optimiser not listed: as Adam


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimiser's state in a checkpoint: what it holds, or before its first step what it will hold."""
    if optimizer.state:
        return tensor_bytes(list(optimizer.state.values()))
    return sum(
        _state_copies(optimizer, group) * p.numel() * p.element_size()
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad
    )


def weights_bytes(pl_module: pl.LightningModule) -> int:
    """Bytes of the weights a checkpoint holds: the state dict less what the module leaves out of its checkpoints
    (its on_save_checkpoint: e.g. a frozen DCG, kept once in its own file)."""
    checkpoint = {"state_dict": pl_module.state_dict()}
    pl_module.on_save_checkpoint(checkpoint)
    return tensor_bytes(checkpoint["state_dict"])


class DiskSpaceCheck(Callback):
    """Before the first epoch of a fit: warns, in numbers, when the run folder cannot hold the checkpoints it will
    keep (each ModelCheckpoint's file: weights, plus the optimiser's state unless weights only) and one temporary
    copy of the largest, which a save writes beside it before the rename. The files already there count as free:
    they are replaced, and the temporary files a killed run left there are removed first. Only the first process
    writes checkpoints, so only it looks."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        if not checkpoints or checkpoints[0].dirpath is None:
            return
        # on every process: a module's on_save_checkpoint may ask the others (trainer.log_dir is a broadcast)
        weights = weights_bytes(pl_module)
        if not trainer.is_global_zero:
            return
        folder = Path(checkpoints[0].dirpath)
        names = [(c.filename or "checkpoint") + ModelCheckpoint.FILE_EXTENSION for c in checkpoints]
        for name in names:  # a killed run's temporary files take space the next saves need
            remove_leftovers(folder / name)
        free = free_space(folder)
        if free is None:
            return
        full = weights + sum(optimizer_bytes(o) for o in trainer.optimizers)
        sizes = {name: weights if c.save_weights_only else full for name, c in zip(names, checkpoints, strict=True)}
        existing = sum((folder / name).stat().st_size for name in sizes if (folder / name).is_file())
        needed = sum(sizes.values()) + max(sizes.values())
        if free + existing >= needed:
            logger.info(
                "disk space: %s free for the checkpoints in %s, about %s needed",
                human_size(free),
                folder,
                human_size(needed),
            )
            return
        parts = ", ".join(f"{name} about {human_size(size)}" for name, size in sizes.items())
        logger.warning(
            "disk space: %s has %s free%s, but its checkpoints (%s) and one temporary copy while saving (about %s) "
            "need %s: a save will fail when the disk fills (exit %d, the previous checkpoints kept). Free space or "
            "point trainer.log_dir at a larger disk",
            folder,
            human_size(free),
            f" (+{human_size(existing)} of checkpoints it replaces)" if existing else "",
            parts,
            human_size(max(sizes.values())),
            human_size(needed),
            EXIT_WRITE,
        )
