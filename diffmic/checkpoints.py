"""Checkpoint files: read without running code, and find the frozen DCG that a checkpoint names.

Every file is read with `torch.load(..., weights_only=True)`: tensors and plain data only. A file that needs
more (pickled objects, which could run code) or that is truncated or not a torch file is a ConfigError naming
it, raised before anything runs or is written.

The frozen DCG is not stored in the diffusion checkpoints: it is the same in every checkpoint of a run and is
kept once, in its DCG file (dcg.pt). A checkpoint names that file by path and SHA-256 (`dcg_file`), and loading
a checkpoint reads the DCG from the first candidate file with that checksum (`find_dcg_file`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from diffmic.config import ConfigError, upgrade_config


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The content of a torch file, loaded as weights only; `what` names the file's role in errors."""
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused:
            raise ConfigError(
                f"{what} {path} holds a pickled {refused.group(1)}, beyond tensors and plain data, which loading "
                "could run as code; it was not loaded. Use a checkpoint written by this project"
            ) from None
        raise ConfigError(f"{what} {path} is not a torch file or is damaged ({_first_sentence(err)})") from None
    except Exception as err:  # noqa: BLE001 - torch's reader raises many types on a damaged file; all mean the same
        raise ConfigError(
            f"{what} {path} is truncated or damaged ({type(err).__name__}: {_first_sentence(err)})"
        ) from None
    if not isinstance(content, dict):
        raise ConfigError(f"{what} {path} holds a {type(content).__name__}, not a checkpoint dictionary")
    return content


def checkpoint_config(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The config a checkpoint of this project was trained with, upgraded to this version's keys
    (config.upgrade_config). It is stored as hyper_parameters.cfg; checkpoints written before commit 969c8be named it
    hyper_parameters.config. The upgraded config replaces the stored one in `checkpoint`, so that a second reader of
    the same content (load_from_checkpoint, then load_checkpoint_file) finds nothing to upgrade and logs nothing."""
    hparams = checkpoint.get("hyper_parameters")
    name = next((k for k in ("cfg", "config") if isinstance(hparams, dict) and k in hparams), None)
    if name is None:
        raise ConfigError(
            f"checkpoint {path} stores no config (hyper_parameters.cfg): not a checkpoint written by this project"
        )
    cfg = upgrade_config(hparams.pop(name), f"checkpoint {path}")
    hparams["cfg"] = cfg
    return cfg


def _first_sentence(err: Exception) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text.split(". ")[0].rstrip(".")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dcg_reference(dcg_path: str | Path) -> dict[str, str]:
    """What a checkpoint records of its DCG file: the absolute path and the file's SHA-256."""
    dcg_path = Path(dcg_path).resolve()
    return {"path": str(dcg_path), "sha256": file_digest(dcg_path)}


def with_run_folder(reference: dict[str, str], run_dir: str | Path | None) -> dict[str, str]:
    """The reference plus the DCG file's path relative to the run folder (version_N, which holds checkpoints/),
    so that a run folder copied with its DCG file elsewhere still finds it."""
    if run_dir is None:
        return dict(reference)
    return {**reference, "relative": os.path.relpath(reference["path"], Path(run_dir).resolve())}


def find_dcg_file(reference: dict[str, str], ckpt_path: str | Path, configured: str | Path) -> Path:
    """The DCG file a checkpoint was trained with: the first of the recorded path, the recorded path relative to
    the checkpoint's run folder (a run folder copied to another machine), and the config's DCG path whose
    SHA-256 is the recorded one."""
    ckpt_path = Path(ckpt_path).resolve()
    candidates = [Path(reference["path"])]
    if "relative" in reference:  # <run>/checkpoints/x.ckpt -> <run>/<relative>
        candidates.append((ckpt_path.parent.parent / reference["relative"]).resolve())
    candidates.append(Path(configured).resolve())
    other = []
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file():
            if file_digest(candidate) == reference["sha256"]:
                return candidate
            other.append(str(candidate))
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    hint = f"; {', '.join(other)} exist but hold another DCG" if other else ""
    raise ConfigError(
        f"checkpoint {ckpt_path} was trained with the DCG file of SHA-256 {reference['sha256'][:12]}..., not found "
        f"at {looked}{hint}. Copy the run's dcg.pt with the checkpoint, or point dcg.ckpt to it"
    )
