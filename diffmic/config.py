"""Configuration: YAML files merged over `configs/default.yml`, dotted command-line overrides,
strict validation. Every number the code uses comes from here; `ConfigError` names the bad key or path."""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/ lives beside the package
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yml"
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yml"

# Keys holding file-system paths. A relative path in a YAML file is taken relative to the
# repository root (runs do not depend on the shell's directory); one typed on the command line
# is relative to the shell's directory, as any command-line argument.
PATH_KEYS = (
    "data.root",
    "data.train_list",
    "data.val_list",
    "data.test_list",
    "dcg.ckpt",
    "dcg.backbone_weights",
    "model.efficientsam_weights",
    "model.patch_encoder_weights",
    "trainer.log_dir",
    "encoder_pretraining.ckpt",
)
# Input paths that must be folders; every other input path must be a file.
FOLDER_KEYS = ("data.root",)
# Keys whose value may be a keyword instead of a path.
PATH_KEYWORDS = {"dcg.backbone_weights": ("imagenet",), "model.patch_encoder_weights": ("imagenet", "dcg")}
# Keys that accept more than the type of their default.
EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "data.num_workers": (int,),  # auto or a number
    "trainer.devices": (str, list),  # Lightning's forms: 1, auto, "2", "0,1", [0, 1]
    "trainer.precision": (int,),  # Lightning's legacy 16 / 32 / 64
    "trainer.limit_train_batches": (int,),
    "trainer.dist_timeout_s": (float,),
    "trainer.limit_val_batches": (int,),
}
FLOAT32_POLICIES = ("highest", "high", "medium")
# Lightning precisions a run may use, by the unified name Lightning gives each ("16" is "16-mixed", 32 "32-true")
SUPPORTED_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")
_LEGACY_PRECISIONS = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}
# why a precision Lightning knows is refused here
_REFUSED_PRECISIONS = {
    "bf16-true": "keeps every weight, Adam's moments and the noise schedule in bf16 (alpha_bar near t = 0 rounds to 1, "
    "updates below bf16's 8-bit resolution vanish)",
    "16-true": "keeps every weight, Adam's moments and the noise schedule in float16 (a tiny demo fit diverges at its "
    "fourth step)",
    "transformer-engine": "replaces the networks' layers with Transformer Engine's and keeps their weights in bf16",
    "transformer-engine-float16": "replaces the networks' layers with Transformer Engine's and keeps their weights in "
    "float16",
}


def unified_precision(value: str | int) -> str:
    """Lightning's unified name of a trainer.precision value ('16' and 16 -> '16-mixed', 32 -> '32-true')."""
    text = str(value)
    return _LEGACY_PRECISIONS.get(text, text)


def precision_refusal(value: str | int) -> str | None:
    """None for a precision the project trains and evaluates with, else the one-line reason and what to use."""
    name = unified_precision(value)
    if name in SUPPORTED_PRECISIONS:
        return None
    why = _REFUSED_PRECISIONS.get(name, "is not one this project is tested with")
    return f"{value!r} {why}; use bf16-mixed (bf16 arithmetic, float32 weights; or 16-mixed), 32-true or 64-true"


CHOICES = {
    "data.dataset": ("list", "medmnist", "synthetic"),
    "data.task": ("multiclass", "multilabel"),
    "data.transform": ("standard", "chest"),
    "data.verify_images": ("fast", "full", "off"),
    "data.medmnist_size": (28, 64, 128, 224),
    "model.method": ("diffmic_v2", "diffmic_v1"),
    "dcg.backbone": ("resnet18", "resnet50"),
    "model.image_encoder": ("vit_s", "vit_t"),
    "v1.encoder": ("resnet18", "resnet50", "densenet121"),
    "model.patch_encoder": ("resnet18", "resnet50", "densenet121", "densenet169"),
    "model.condition_init": ("default", "identity"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
    "evaluation.temperature": ("none", "fit"),
    "trainer.float32_matmul_precision": FLOAT32_POLICIES,
}


class ConfigError(Exception):
    """A bad configuration: the message names the key or the path and what to do."""


@contextmanager
def errors_of(key: str) -> Iterator[None]:
    """Turn the OSError or ValueError with which the model layer refuses a file into a ConfigError
    naming the config key that gave the file."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key {key}: {err}") from None


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(tree).__name__}")
    return tree


def _check_type(key: str, value: Any, default: Any) -> Any:
    """Return `value` coerced to the type of `default`, or raise ConfigError."""
    if default is None:  # optional paths and lists: null, a string or a list
        if value is None or isinstance(value, (str, list)):
            return value
        raise ConfigError(f"config key {key}: expected a string, a list or null, got {value!r}")
    if value is None and key in PATH_KEYS:
        return None
    if isinstance(value, EXTRA_TYPES.get(key, ())) and not isinstance(value, bool):
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads "1e-3" (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(
        f"config key {key}: expected {type(default).__name__} (like the default {default!r}), got {value!r}"
    )


def _set(tree: dict, key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def _get(tree: dict, key: str) -> Any:
    node = tree
    for part in key.split("."):
        node = node[part]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The parser's options and, as `args.overrides`, the `key.sub=value` words in any order among them. The
    overrides are taken out first: an option that takes several values (`--seeds 0 1 2`) would otherwise read the
    overrides that follow it as its own values and fail."""
    words = sys.argv[1:] if argv is None else list(argv)
    is_override = ["=" in w and not w.startswith("-") for w in words]
    args = parser.parse_args([w for w, o in zip(words, is_override, strict=True) if not o])
    args.overrides = [*getattr(args, "overrides", []), *(w for w, o in zip(words, is_override, strict=True) if o)]
    return args


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Load `path` (default: configs/demo.yml) over configs/default.yml, apply `key=value`
    overrides, check keys, types and choices, and make every path absolute."""
    cfg = copy.deepcopy(_read_yaml(DEFAULT_CONFIG))
    defaults = _flatten(cfg)
    config_path = Path(path).expanduser().resolve() if path is not None else DEMO_CONFIG
    updates = [(k, v, PROJECT_ROOT) for k, v in _flatten(_read_yaml(config_path)).items()]
    for text in overrides:
        key, value = parse_override(text)
        updates.append((key, value, Path.cwd()))
    for key, value, base in updates:
        if key not in defaults:
            near = [k for k in defaults if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise ConfigError(f"unknown config key {key}{hint}")
        value = _check_type(key, value, defaults[key])
        if key in PATH_KEYS and isinstance(value, str) and value not in PATH_KEYWORDS.get(key, ()):
            value = str((base / Path(value).expanduser()).resolve())
        _set(cfg, key, value)
    for key in PATH_KEYS:  # paths left at their default.yml value are relative to the repository too
        value = _get(cfg, key)
        if isinstance(value, str) and value not in PATH_KEYWORDS.get(key, ()) and not Path(value).is_absolute():
            _set(cfg, key, str((PROJECT_ROOT / Path(value).expanduser()).resolve()))
    for key, choices in CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"config key {key}: {_get(cfg, key)!r} is not one of {', '.join(map(str, choices))}")
    _check_values(cfg)
    check_trainer(cfg)
    _check_encoder_pretraining(cfg)
    return cfg


def _check_encoder_pretraining(cfg: dict) -> None:
    """The encoder_pretraining section (pretraining/train_encoder.py)."""
    section = cfg["encoder_pretraining"]
    for key in ("epochs", "batch_size"):
        if section[key] < 1:
            raise ConfigError(f"config key encoder_pretraining.{key}: must be at least 1, got {section[key]}")
    if section["lr"] <= 0.0:
        raise ConfigError(f"config key encoder_pretraining.lr: must be > 0, got {section['lr']}")
    if not 0.0 <= section["min_lr_ratio"] <= 1.0:
        raise ConfigError(
            "config key encoder_pretraining.min_lr_ratio: must be in [0, 1] (a fraction of the learning rate), "
            f"got {section['min_lr_ratio']}"
        )
    if section["weight_decay"] < 0.0:
        raise ConfigError(f"config key encoder_pretraining.weight_decay: must be >= 0, got {section['weight_decay']}")


# Counts that must be at least 1.
AT_LEAST_ONE = (
    "dcg.batch_size",
    "dcg.epochs",
    "trainer.max_epochs",
    "trainer.num_nodes",
    "trainer.val_every",
    "trainer.log_every_n_steps",
    "model.feature_dim",
    "diffusion.timesteps",
    "diffusion.eval_samples",
    "v1.feature_dim",
)
# The range pl.seed_everything (numpy's legacy seeding) accepts.
MAX_SEED = 2**32 - 1


def _check_finite(cfg: dict) -> None:
    """NaN slips through every range check below (each comparison with it is false) and infinity through
    the open-ended ones; both only surface as a NaN loss or an optimiser error hours into a run. Every
    float key is checked, so a key added to default.yml is covered without being listed."""
    for key, value in _flatten(cfg).items():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            what = f"{value!r} holds a value that" if isinstance(value, list) else repr(value)
            raise ConfigError(f"config key {key}: {what} is not a finite number (NaN or infinity); give a finite value")


def _check_values(cfg: dict) -> None:
    """Ranges and cross-key checks of values that would otherwise fail deep inside a run."""
    _check_finite(cfg)
    data, dcg, diffusion, optim = cfg["data"], cfg["dcg"], cfg["diffusion"], cfg["optim"]
    if not 0 <= cfg["seed"] <= MAX_SEED:
        raise ConfigError(f"config key seed: must be in 0..{MAX_SEED} (what Lightning seeds with), got {cfg['seed']}")
    if data["num_classes"] < 2:
        raise ConfigError("config key data.num_classes: need at least 2 classes")
    if data["image_size"] < 32 or data["image_size"] % 32 != 0:
        raise ConfigError(
            f"config key data.image_size: {data['image_size']} must be a positive multiple of 32 "
            "(the CAM side is image_size / 32 and the ViT patch is 16)"
        )
    # the denoiser's BatchNorm1d of the image features cannot train on a batch of one image, which
    # would only show after the DCG pre-training
    if data["batch_size"] < 2:
        raise ConfigError(
            f"config key data.batch_size: need at least 2 (BatchNorm cannot train on one image), "
            f"got {data['batch_size']}"
        )
    for key in AT_LEAST_ONE:
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key {key}: must be at least 1, got {_get(cfg, key)}")
    if not cfg["trainer"]["dist_timeout_s"] > 0:
        raise ConfigError(
            f"config key trainer.dist_timeout_s: must be > 0 seconds, got {cfg['trainer']['dist_timeout_s']}"
        )
    workers = data["num_workers"]
    if isinstance(workers, str) and workers != "auto":
        raise ConfigError(f"config key data.num_workers: auto or a number of worker processes, got {workers!r}")
    if isinstance(workers, int) and workers < 0:
        raise ConfigError(f"config key data.num_workers: must be >= 0 (0 loads in the main process), got {workers}")
    if data["rotation_degrees"] < 0:
        raise ConfigError(
            f"config key data.rotation_degrees: must be >= 0 (0: no rotation), got {data['rotation_degrees']}"
        )
    cam = data["image_size"] // 32
    if not 1 <= dcg["num_rois"] <= cam * cam:
        raise ConfigError(
            f"config key dcg.num_rois: {dcg['num_rois']} ROIs do not fit a {cam} x {cam} CAM "
            f"(data.image_size {data['image_size']}); use 1..{cam * cam}"
        )
    if not 0 < dcg["roi_size"] <= data["image_size"]:
        raise ConfigError(f"config key dcg.roi_size: {dcg['roi_size']} must be in 1..data.image_size")
    if not 0.0 < dcg["percent_t"] <= 1.0:
        raise ConfigError("config key dcg.percent_t: must be in (0, 1]")
    if not 0.0 < data["val_fraction"] < 1.0:
        raise ConfigError("config key data.val_fraction: must be in (0, 1)")
    names = data["class_names"]
    if names is not None and (not isinstance(names, list) or len(names) != data["num_classes"]):
        raise ConfigError(
            f"config key data.class_names: need a list of data.num_classes = {data['num_classes']} names, got {names!r}"
        )
    model = cfg["model"]
    # v1 has no patch encoder: its model.patch_encoder keys are not read
    if model["method"] == "diffmic_v2" and model["patch_encoder_weights"] == "dcg":
        if model["patch_encoder"] != dcg["backbone"]:
            raise ConfigError(
                f"config key model.patch_encoder_weights: dcg copies the DCG's local trunk (dcg.backbone "
                f"{dcg['backbone']}), so model.patch_encoder must be {dcg['backbone']}, not {model['patch_encoder']}"
            )
    steps, timesteps = diffusion["sampling_steps"], diffusion["timesteps"]
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"config key diffusion.sampling_steps: must be in 1..diffusion.timesteps ({timesteps})")
    # the scheduler's linear betas: each step must add some noise, and alpha_bar = prod(1 - beta) stay positive
    if not 0.0 < diffusion["beta_start"] < 1.0:
        raise ConfigError(f"config key diffusion.beta_start: must be in (0, 1), got {diffusion['beta_start']}")
    if not diffusion["beta_start"] <= diffusion["beta_end"] < 1.0:
        raise ConfigError(
            f"config key diffusion.beta_end: must be in [diffusion.beta_start, 1) = [{diffusion['beta_start']}, 1), "
            f"got {diffusion['beta_end']}"
        )
    for key in ("diffusion.focal_alpha", "diffusion.focal_gamma"):  # w = 1 + alpha (1 - p)^gamma must stay >= 1
        if _get(cfg, key) < 0.0:
            raise ConfigError(f"config key {key}: must be >= 0 (0 turns the focal weight off), got {_get(cfg, key)}")
    for key in ("optim.lr", "dcg.lr", "optim.eps"):
        if _get(cfg, key) <= 0.0:
            raise ConfigError(f"config key {key}: must be > 0, got {_get(cfg, key)}")
    if optim["weight_decay"] < 0.0:
        raise ConfigError(f"config key optim.weight_decay: must be >= 0, got {optim['weight_decay']}")
    betas = optim["betas"]
    if len(betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas
    ):
        raise ConfigError(f"config key optim.betas: need two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
    for key in ("dcg.min_lr_ratio", "optim.min_lr_ratio"):
        if not 0.0 <= _get(cfg, key) <= 1.0:
            raise ConfigError(
                f"config key {key}: must be in [0, 1] (a fraction of the learning rate), got {_get(cfg, key)}"
            )
    shown = cfg["explain"]["val_images"]
    if not 0 <= shown <= 8:
        raise ConfigError(f"config key explain.val_images: must be in 0..8 (0: off), got {shown}")
    if cfg["model"]["method"] == "diffmic_v1":
        _check_v1(cfg)
    if data["dataset"] == "synthetic" and data["task"] == "multilabel":
        raise ConfigError("config key data.task: the synthetic demo set is multiclass")
    if data["dataset"] == "medmnist" and not data["flag"]:
        raise ConfigError("config key data.flag: data.dataset medmnist needs a MedMNIST flag, e.g. retinamnist")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches"):
        limit = _get(cfg, key)
        if (isinstance(limit, float) and not 0.0 < limit <= 1.0) or (isinstance(limit, int) and limit < 1):
            raise ConfigError(f"config key {key}: {limit!r} must be a fraction in (0, 1] or a number of batches >= 1")


def _check_v1(cfg: dict) -> None:
    """The v1 keys, checked only when model.method is diffmic_v1 (a v2 config may leave them at any value)."""
    v1, timesteps = cfg["v1"], cfg["diffusion"]["timesteps"]
    if cfg["data"]["task"] == "multilabel":
        raise ConfigError(
            "config key model.method: diffmic_v1 classifies one label per image (softmax); "
            "data.task multilabel needs diffmic_v2"
        )
    if not 1 <= v1["sampling_steps"] <= timesteps:
        raise ConfigError(
            f"config key v1.sampling_steps: {v1['sampling_steps']} must be in 1..diffusion.timesteps ({timesteps})"
        )
    if not 0.0 <= v1["ema_decay"] < 1.0:
        raise ConfigError(f"config key v1.ema_decay: must be in [0, 1), got {v1['ema_decay']}")
    for key in ("v1.mmd_weight", "v1.warmup_epochs"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key {key}: must be >= 0, got {_get(cfg, key)}")
    if v1["grad_clip"] <= 0.0:
        raise ConfigError(f"config key v1.grad_clip: must be > 0, got {v1['grad_clip']}")
    if v1["warmup_epochs"] >= cfg["trainer"]["max_epochs"] and v1["warmup_epochs"] > 0:
        raise ConfigError(
            f"config key v1.warmup_epochs: {v1['warmup_epochs']} must be below trainer.max_epochs "
            f"({cfg['trainer']['max_epochs']}), or the learning rate never leaves its warm-up"
        )


# What to give instead, per trainer key Lightning refuses.
TRAINER_HINTS = {
    "accelerator": "use auto, cpu, gpu, cuda or mps",
    "devices": "use auto, a number of devices such as 1, or GPU indices such as [0, 1] or '0,1'",
    "precision": "use 32-true, bf16-mixed, 16-mixed or 64-true",
    "strategy": "use auto or a strategy Lightning lists, e.g. ddp",
    "num_nodes": "use the number of machines the run is launched on (1 for one machine)",
}


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide the device summary, tips and fallback warnings of a probe Trainer: the run's own Trainer
    prints them again, once, when it is built."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def check_trainer(cfg: dict) -> None:
    """Let Lightning judge trainer.accelerator, trainer.devices and trainer.precision (and
    trainer.strategy, where the config has that key) with its own rules, by building a bare Trainer
    from them: no logger, no checkpoints, so nothing is written, and no process is started (that
    happens at fit). A refused value raises a one-line ConfigError naming the key."""
    # imported here, not at the top: Lightning takes seconds to import, and the many modules that only
    # need ConfigError should not pay for it
    import pytorch_lightning as pl
    from pytorch_lightning.accelerators import CUDAAccelerator, MPSAccelerator
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    t = cfg["trainer"]
    accelerator = t["accelerator"]
    # Lightning's own availability tests (NVML-based: they do not initialise CUDA); its message for a
    # missing GPU does not say what to do
    cuda, mps = CUDAAccelerator.is_available(), MPSAccelerator.is_available()
    if (accelerator == "cuda" and not cuda) or (accelerator == "gpu" and not (cuda or mps)):
        raise ConfigError(
            f"config key trainer.accelerator: {accelerator}, but no GPU is visible on this machine "
            "(CUDA is not available); use trainer.accelerator=cpu or auto"
        )
    if accelerator == "mps" and not mps:
        raise ConfigError(
            "config key trainer.accelerator: mps, but MPS (Apple GPU) is not available on this machine; "
            "use trainer.accelerator=cpu or auto"
        )
    devices = t["devices"]
    if isinstance(devices, list) and not all(isinstance(d, int) and not isinstance(d, bool) for d in devices):
        raise ConfigError(
            f"config key trainer.devices: a list must hold device indices such as [0, 1], got {devices!r}"
        )
    names = ["accelerator", "devices", "precision"] + [k for k in ("strategy", "num_nodes") if k in t]

    def probe(keys: list[str]) -> None:
        with quiet_lightning():
            pl.Trainer(
                **{k: t[k] for k in keys},
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )

    refusals = (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError)
    try:
        probe(names)
    except refusals:
        pass
    else:
        refusal = precision_refusal(t["precision"])  # Lightning accepts it, but this project cannot train with it
        if refusal is not None:
            raise ConfigError(f"config key trainer.precision: {refusal}")
        return
    # some key was refused: add the keys one at a time to name the first one Lightning refuses (the last
    # round probes the whole set again, so it raises at the latest there)
    for n, name in enumerate(names):
        try:
            probe(names[: n + 1])
        except refusals as err:
            given = ", ".join(f"trainer.{k}={t[k]!r}" for k in names[:n])
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(
                f"config key trainer.{name}: Lightning refuses {t[name]!r}{f' (with {given})' if given else ''}: "
                f"{reason.rstrip('.')}; {TRAINER_HINTS[name]}"
            ) from None


def check_paths(cfg: dict, need_dcg: bool, need_data: bool = True) -> None:
    """Raise ConfigError for every configured input path that does not exist, is a folder where a file
    is expected (or a file where data.root must be a folder), or cannot be read. The DCG checkpoint
    is an input only when `need_dcg` (fit pre-trains it when missing); the data set's lists only when
    `need_data` (predict --input classifies other images). Files are not opened or loaded."""
    data_keys = ["data.root", "data.train_list", "data.val_list", "data.test_list"]
    fit_temperature = cfg["evaluation"]["temperature"] == "fit"  # needs the validation split, predict --input too
    keys = [
        *(data_keys if need_data or fit_temperature else []),
        "dcg.backbone_weights",
        "model.efficientsam_weights",
        "model.patch_encoder_weights",
    ]
    if need_dcg:
        keys.append("dcg.ckpt")
    medmnist = cfg["data"]["dataset"] == "medmnist"
    for key in keys:
        value = _get(cfg, key)
        if value is None or value in PATH_KEYWORDS.get(key, ()):
            continue
        path = Path(value)
        if not path.exists():
            if medmnist and key == "data.root":
                continue  # the download creates it; offline, the loader's error says what to fetch
            raise ConfigError(f"config key {key}: path does not exist: {value}")
        _check_readable(key, path)
    required = {
        "list": ("data.root", "data.train_list", "data.test_list"),
        "medmnist": ("data.root",),
        "synthetic": (),
    }[cfg["data"]["dataset"]]
    for key in required if need_data or fit_temperature else ():
        if _get(cfg, key) is None:
            if not need_data:  # predict --input: the lists are read only for the validation split
                raise ConfigError(
                    f"config key evaluation.temperature: fit needs the data set's validation split, so {key} is "
                    "required; set evaluation.temperature=none to predict without it"
                )
            raise ConfigError(f"config key {key} is required when data.dataset is {cfg['data']['dataset']}")


def _check_readable(key: str, path: Path) -> None:
    """An existing input path must be of the right kind and readable (a folder: listable and enterable)."""
    if key in FOLDER_KEYS:
        if not path.is_dir():
            raise ConfigError(
                f"config key {key}: expected a folder, but {path} is a file; give the folder that holds the data"
            )
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(
                f"config key {key}: folder {path} is not readable (permission denied); fix its permissions"
            )
        return
    if path.is_dir():
        raise ConfigError(f"config key {key}: expected a file, but {path} is a folder; give the file inside it")
    if not path.is_file():
        raise ConfigError(f"config key {key}: {path} is not a regular file; give a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"config key {key}: file {path} is not readable (permission denied); fix its permissions")


def encoder_ckpt_path(cfg: dict) -> Path:
    """Where pretraining/train_encoder.py writes the encoder: encoder_pretraining.ckpt, or
    <log_dir>/<name>/encoder.pt."""
    if cfg["encoder_pretraining"]["ckpt"] is not None:
        return Path(cfg["encoder_pretraining"]["ckpt"])
    return Path(cfg["trainer"]["log_dir"]) / cfg["name"] / "encoder.pt"


def check_imagenet_weights(cfg: dict, keys: list[str]) -> None:
    """Of `keys` (dcg.backbone_weights, model.patch_encoder_weights), those set to imagenet must have torchvision's
    weights in torch's cache or fetch them now; offline, a ConfigError says where to put the file, unless
    imagenet_fallback is true (the run then warns and trains those trunks from random weights). Called before any
    work, for the keys the command will read."""
    # imported here: torchvision is slow to import, and the trunks' names and weight tags live with the models
    from torchvision.models import get_model_weights

    from diffmic.backbones import imagenet_cache_path, imagenet_file
    from pretraining.dcg import IMAGENET_WEIGHTS

    trunks = {
        "dcg.backbone_weights": ("dcg.backbone", IMAGENET_WEIGHTS),
        "model.patch_encoder_weights": ("model.patch_encoder", "DEFAULT"),
    }
    for key in keys:
        if _get(cfg, key) != "imagenet":
            continue
        name_key, tag = trunks[key]
        name = _get(cfg, name_key)
        try:
            imagenet_file(name, tag)
        except (OSError, RuntimeError) as err:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            if cfg["imagenet_fallback"]:
                logger.warning(
                    "config key %s: imagenet, but the ImageNet weights of %s cannot be fetched (%s); "
                    "imagenet_fallback is true: that trunk trains from random weights",
                    key,
                    name,
                    reason,
                )
                continue
            url = get_model_weights(name)[tag].url
            raise ConfigError(
                f"config key {key}: imagenet, but torchvision's ImageNet weights of {name} cannot be fetched "
                f"({type(err).__name__}: {reason}); offline, download {url} elsewhere and put it at "
                f"{imagenet_cache_path(url)}, or point {key} to a local state-dict file, or set "
                "imagenet_fallback=true to train from random weights instead"
            ) from None


def dcg_ckpt_path(cfg: dict) -> Path:
    """Where the DCG weights live: dcg.ckpt, or <log_dir>/<name>/dcg.pt."""
    if cfg["dcg"]["ckpt"] is not None:
        return Path(cfg["dcg"]["ckpt"])
    return Path(cfg["trainer"]["log_dir"]) / cfg["name"] / "dcg.pt"
