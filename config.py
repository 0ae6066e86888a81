"""Configuration: YAML files merged over `configs/default.yml`, dotted command-line overrides,
strict validation. Every number the code uses comes from here; `ConfigError` names the bad key or path."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent
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
)
# Keys whose value may be a keyword instead of a path.
PATH_KEYWORDS = {"dcg.backbone_weights": ("imagenet",), "model.patch_encoder_weights": ("imagenet", "dcg")}
# Keys that accept more than the type of their default.
EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "trainer.devices": (int,),
    "trainer.limit_train_batches": (int,),
    "trainer.limit_val_batches": (int,),
}
CHOICES = {
    "data.dataset": ("list", "medmnist", "synthetic"),
    "data.task": ("multiclass", "multilabel"),
    "data.transform": ("standard", "chest"),
    "data.verify_images": ("fast", "full", "off"),
    "data.medmnist_size": (28, 64, 128, 224),
    "model.image_encoder": ("vit_s", "vit_t"),
    "model.patch_encoder": ("resnet18", "resnet50", "densenet121", "densenet169"),
    "model.condition_init": ("default", "identity"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
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
    return cfg


def _check_values(cfg: dict) -> None:
    """Cross-key checks that would otherwise fail deep inside a run."""
    data, dcg = cfg["data"], cfg["dcg"]
    if data["num_classes"] < 2:
        raise ConfigError("config key data.num_classes: need at least 2 classes")
    if data["image_size"] % 32 != 0:
        raise ConfigError(
            f"config key data.image_size: {data['image_size']} must be a multiple of 32 "
            "(the CAM side is image_size / 32 and the ViT patch is 16)"
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
    if cfg["model"]["patch_encoder_weights"] == "dcg" and cfg["model"]["patch_encoder"] != "resnet18":
        raise ConfigError(
            "config key model.patch_encoder_weights: dcg copies the DCG's local ResNet-18, "
            f"so model.patch_encoder must be resnet18, not {cfg['model']['patch_encoder']}"
        )
    steps, timesteps = cfg["diffusion"]["sampling_steps"], cfg["diffusion"]["timesteps"]
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"config key diffusion.sampling_steps: must be in 1..diffusion.timesteps ({timesteps})")
    if cfg["diffusion"]["eval_samples"] < 1:
        raise ConfigError(f"config key diffusion.eval_samples: need at least 1, got {cfg['diffusion']['eval_samples']}")
    for key in ("dcg.min_lr_ratio", "optim.min_lr_ratio"):
        if not 0.0 <= _get(cfg, key) <= 1.0:
            raise ConfigError(
                f"config key {key}: must be in [0, 1] (a fraction of the learning rate), got {_get(cfg, key)}"
            )
    if len(cfg["optim"]["betas"]) != 2:
        raise ConfigError("config key optim.betas: need two numbers, e.g. [0.9, 0.999]")
    if data["dataset"] == "synthetic" and data["task"] == "multilabel":
        raise ConfigError("config key data.task: the synthetic demo set is multiclass")
    if data["dataset"] == "medmnist" and not data["flag"]:
        raise ConfigError("config key data.flag: data.dataset medmnist needs a MedMNIST flag, e.g. retinamnist")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches"):
        limit = _get(cfg, key)
        if (isinstance(limit, float) and not 0.0 < limit <= 1.0) or (isinstance(limit, int) and limit < 1):
            raise ConfigError(f"config key {key}: {limit!r} must be a fraction in (0, 1] or a number of batches >= 1")
    for key in (
        "data.batch_size",
        "dcg.batch_size",
        "dcg.epochs",
        "trainer.max_epochs",
        "trainer.val_every",
        "model.feature_dim",
    ):
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key {key}: must be at least 1")


def check_paths(cfg: dict, need_dcg: bool) -> None:
    """Raise ConfigError for every configured input file that does not exist. The DCG checkpoint
    is an input only when `need_dcg` (fit pre-trains it when missing)."""
    keys = [
        "data.root",
        "data.train_list",
        "data.val_list",
        "data.test_list",
        "dcg.backbone_weights",
        "model.efficientsam_weights",
        "model.patch_encoder_weights",
    ]
    if need_dcg:
        keys.append("dcg.ckpt")
    if cfg["data"]["dataset"] == "medmnist":
        keys.remove("data.root")  # the download creates it; offline, the loader's error says what to fetch
    for key in keys:
        value = _get(cfg, key)
        if value is None or value in PATH_KEYWORDS.get(key, ()):
            continue
        if not Path(value).exists():
            raise ConfigError(f"config key {key}: path does not exist: {value}")
    required = {
        "list": ("data.root", "data.train_list", "data.test_list"),
        "medmnist": ("data.root",),
        "synthetic": (),
    }[cfg["data"]["dataset"]]
    for key in required:
        if _get(cfg, key) is None:
            raise ConfigError(f"config key {key} is required when data.dataset is {cfg['data']['dataset']}")


def dcg_ckpt_path(cfg: dict) -> Path:
    """Where the DCG weights live: dcg.ckpt, or <log_dir>/<name>/dcg.pt."""
    if cfg["dcg"]["ckpt"] is not None:
        return Path(cfg["dcg"]["ckpt"])
    return Path(cfg["trainer"]["log_dir"]) / cfg["name"] / "dcg.pt"
