"""The DCG file (dcg.pt): the pre-trained DCG's weights, the settings its shapes follow, and what it was trained
from, so that a file is reused only for the training it belongs to.

    {"state_dict": ..., "meta": {num_classes, image_size, num_rois, roi_size, percent_t, task, backbone},
     "trained_from": {training_split, training_images, seed, epochs, batch_size, lr, min_lr_ratio, backbone_weights}}

`training_split` is a SHA-256 over the training split's image ids and labels (after the validation split is
carved out), so another list, another carve or other labels give another value. A file written before `backbone`
was recorded holds ResNet-18 trunks, and is read as such.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diffmic.checkpoints import read_checkpoint
from diffmic.config import ConfigError
from diffmic.durable import write_atomically
from pretraining.dcg import DCG

logger = logging.getLogger(__name__)


def dcg_meta(cfg: dict) -> dict:
    """The config values a saved DCG's shapes and outputs must agree with."""
    return {
        "num_classes": cfg["data"]["num_classes"],
        "image_size": cfg["data"]["image_size"],
        "num_rois": cfg["dcg"]["num_rois"],
        "roi_size": cfg["dcg"]["roi_size"],
        "percent_t": cfg["dcg"]["percent_t"],
        "task": cfg["data"]["task"],
        "backbone": cfg["dcg"]["backbone"],
    }


def split_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of a split's image ids and labels, in order."""
    digest = hashlib.sha256()
    for image_id in dataset.ids:
        digest.update(str(image_id).encode() + b"\0")
    digest.update(np.ascontiguousarray(np.asarray(dataset.labels, dtype=np.float64)).tobytes())
    return digest.hexdigest()


def trained_from(cfg: dict, train_set: Dataset) -> dict:
    """What a DCG is trained from: the training split and the pre-training settings."""
    d = cfg["dcg"]
    return {
        "training_split": split_fingerprint(train_set),
        "training_images": len(train_set),
        "seed": cfg["seed"],
        "epochs": d["epochs"],
        "batch_size": d["batch_size"],
        "lr": d["lr"],
        "min_lr_ratio": d["min_lr_ratio"],
        "backbone_weights": d["backbone_weights"],
    }


def save_dcg(dcg: DCG, cfg: dict, train_set: Dataset, path: Path) -> None:
    """Write the DCG file: weights, shape settings and what the DCG was trained from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"state_dict": dcg.state_dict(), "meta": dcg_meta(cfg), "trained_from": trained_from(cfg, train_set)}
    buffer = io.BytesIO()
    torch.save(content, buffer)
    write_atomically(path, buffer.getvalue())


def load_dcg(dcg: DCG, cfg: dict, path: Path, train_set: Dataset | None = None) -> None:
    """Load a DCG file into `dcg`. Settings that change its shapes or outputs must agree with the config. With
    `train_set` (a new diffusion run), the file must also have been trained from that split and the config's
    pre-training settings, unless dcg.require_same_training is false. Every refusal is a ConfigError."""
    saved = read_checkpoint(path, "DCG file (config key dcg.ckpt)")
    if "state_dict" not in saved:
        raise ConfigError(f"config key dcg.ckpt: {path} is not a DCG file written by pretraining/train_dcg.py")
    expected = dcg_meta(cfg)
    meta = {"backbone": "resnet18", **saved.get("meta", {})}  # older files: ResNet-18, the only trunk then
    if meta["backbone"] != expected["backbone"]:
        # named before the shapes: the trunks' state dicts would otherwise only say that the widths differ
        raise ConfigError(
            f"config key dcg.backbone: the DCG file {path} (dcg.ckpt) holds {meta['backbone']} trunks, the config "
            f"asks for {expected['backbone']}; set dcg.backbone={meta['backbone']}, or point dcg.ckpt elsewhere "
            "(fit pre-trains a DCG where none is)"
        )
    wrong = {k: v for k, v in meta.items() if k in expected and expected[k] != v}
    if wrong:
        raise ConfigError(
            f"config key dcg.ckpt: {path} was trained with {wrong}, the config asks for "
            f"{ {k: expected[k] for k in wrong} }; delete the file or point dcg.ckpt elsewhere"
        )
    if train_set is not None and cfg["dcg"]["require_same_training"]:
        _check_trained_from(saved.get("trained_from"), trained_from(cfg, train_set), path)
    try:
        dcg.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"config key dcg.ckpt: {path} does not fit the DCG ({_first_line(err)})") from None
    logger.info("DCG weights loaded from %s", path)


def _check_trained_from(saved: dict | None, expected: dict, path: Path) -> None:
    advice = (
        "delete it (fit then pre-trains a DCG for this run), point dcg.ckpt elsewhere, or set "
        "dcg.require_same_training=false to reuse it anyway"
    )
    if saved is None:
        raise ConfigError(f"config key dcg.ckpt: {path} does not record what it was trained from; {advice}")
    differ = [key for key in expected if saved.get(key) != expected[key]]
    if not differ:
        return
    parts = []
    for key in differ:
        if key == "training_split":
            parts.append(
                f"another training split ({saved.get('training_images')} images, fingerprint "
                f"{str(saved.get(key))[:12]}; this run: {expected['training_images']} images, {expected[key][:12]})"
            )
        elif key != "training_images":
            parts.append(f"{key} {saved.get(key)!r} (this run: {expected[key]!r})")
    raise ConfigError(f"config key dcg.ckpt: {path} was trained from {'; '.join(parts)}; {advice}")


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")
