"""Loading the official EfficientSAM checkpoint into :class:`ImageEncoderViT`."""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path

import torch

from .image_encoder import ENCODERS, ImageEncoderViT, resample_pos_grid

logger = logging.getLogger(__name__)

_PREFIX = "image_encoder."
PROVENANCE = "trained_from"  # beside "model" in a file of pretraining/train_encoder.py


def _variant_of_width(width: int) -> str:
    """Name of the registered variant with token width ``width`` (or a description)."""
    for name, cfg in ENCODERS.items():
        if cfg["embed_dim"] == width:
            return name
    return f"an unknown variant (width {width})"


def _resample_pos_embed(pos_embed: torch.Tensor, num_positions: int, path: Path) -> torch.Tensor:
    """Resample a checkpoint pos_embed (1, 1+n*n, D) to (1, num_positions, D).

    The class-token slot is kept as is; only the square grid is resampled.
    """
    src_n = math.isqrt(pos_embed.shape[1] - 1)
    dst_n = math.isqrt(num_positions - 1)
    if src_n * src_n != pos_embed.shape[1] - 1 or dst_n * dst_n != num_positions - 1:
        raise ValueError(
            f"{path}: cannot resample pos_embed of shape {tuple(pos_embed.shape)} to "
            f"{num_positions} positions (expected a class slot plus a square grid)"
        )
    cls_slot, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    # Interpolate in float32: bicubic is not implemented for half on every device.
    grid = grid.float().reshape(1, src_n, src_n, dim)
    grid = resample_pos_grid(grid, (dst_n, dst_n)).reshape(1, dst_n * dst_n, dim)
    logger.info("%s: resampled pos_embed grid from %dx%d to %dx%d", path, src_n, src_n, dst_n, dst_n)
    return torch.cat([cls_slot.float(), grid], dim=1).to(pos_embed.dtype)


def load_efficientsam_encoder(
    encoder: ImageEncoderViT, path: str | os.PathLike, image_size: int | None = None
) -> dict | None:
    """Load the image-encoder part of an EfficientSAM checkpoint into ``encoder``.

    Accepts the official file (a dict whose ``"model"`` entry is the full
    EfficientSAM state dict) or a plain state dict. Only ``image_encoder.*`` keys
    are used; the neck, prompt encoder and mask decoder are ignored.

    A file written by ``pretraining/train_encoder.py`` has the official layout plus a
    ``"trained_from"`` entry (its provenance), which is returned (None for other files);
    when it records another image size than ``image_size`` the file still loads (the
    position grid is resampled, as for the official weights) and a warning says so.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EfficientSAM checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:  # not a torch file, truncated, or code
        raise ValueError(f"{path}: not a readable weights-only checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: the 'model' entry is not a state dict")

    # Keep the encoder trunk only: the neck is replaced by the classifier's own head.
    enc_state = {
        k[len(_PREFIX) :]: v
        for k, v in state.items()
        if k.startswith(_PREFIX) and not k[len(_PREFIX) :].startswith("neck.")
    }
    if not enc_state:
        raise ValueError(f"{path}: no '{_PREFIX}*' entries found; is this an EfficientSAM checkpoint?")

    patch_w = enc_state.get("patch_embed.proj.weight")
    if patch_w is None:
        raise ValueError(f"{path}: checkpoint has no '{_PREFIX}patch_embed.proj.weight'")
    file_width = patch_w.shape[0]
    if file_width != encoder.embed_dim:
        raise ValueError(
            f"{path}: checkpoint looks like {_variant_of_width(file_width)} "
            f"(width {file_width}) but the encoder is "
            f"{_variant_of_width(encoder.embed_dim)} (width {encoder.embed_dim}); set model.image_encoder to the "
            "file's variant or give a file of the encoder's"
        )

    pos = enc_state.get("pos_embed")
    expected_positions = encoder.pos_embed.shape[1]
    if pos is not None and pos.shape[1] != expected_positions:
        # E.g. weights learnt at another input size: fit them to the 14x14 grid.
        enc_state["pos_embed"] = _resample_pos_embed(pos, expected_positions, path)

    try:
        encoder.load_state_dict(enc_state, strict=True)
    except RuntimeError as err:
        # Same width but e.g. a different depth: report it with the file name.
        raise ValueError(f"{path}: encoder weights do not match the model: {err}") from err
    ignored = len(state) - len(enc_state)
    logger.info(
        "Loaded %d EfficientSAM image-encoder tensors from %s%s",
        len(enc_state),
        path,
        f" ({ignored} tensors of the neck, prompt encoder and mask decoder not used)" if ignored else "",
    )
    provenance = checkpoint.get(PROVENANCE) if "model" in checkpoint else None
    if not isinstance(provenance, dict):
        return None
    logger.info("%s was pre-trained by pretraining/train_encoder.py: %s", path.name, provenance)
    trained_size = provenance.get("image_size")
    if image_size is not None and trained_size is not None and trained_size != image_size:
        logger.warning(
            "%s was pre-trained at image size %s, the config uses data.image_size %d: its position grid is "
            "resampled to the new size and its features may transfer less well",
            path,
            trained_size,
            image_size,
        )
    return provenance
