"""Configuration: YAML files merged over `configs/default.yml`, dotted command-line overrides,
strict validation. Every number the code uses comes from here; `ConfigError` names the bad key or path.

The checks are data: RULES holds, per key, the range, choices (or the registry that lists them) and extra types, and
CROSS_CHECKS the few constraints between keys. A config stored by an older version (a checkpoint's hyper-parameters,
a run's config.yaml) enters the code through `upgrade_config` only, which fills in the keys added since from
default.yml, so that the code reads every key as cfg[section][key]."""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import math
import os
import shlex
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

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


class ConfigError(Exception):
    """A bad configuration: the message names the key or the path and what to do."""


class Option(NamedTuple):
    """A command option named inside an OptionError's message."""

    name: str  # the Python API's keyword


class OptionError(ConfigError):
    """A bad option of a command, named as its caller spelt it: the Python API's keyword (`ckpt='best'`), or, from
    on_command_line(), the command line's flag (`--ckpt best`). `detail` is text and Option pieces (other options
    the message names)."""

    FLAGS = MappingProxyType(
        {"ckpt": "--ckpt", "images": "--input", "explain": "--explain", "explain_max": "--explain-max", "out": "--out"}
    )

    def __init__(self, option: str, value: object, *detail: str | Option, command_line: bool = False) -> None:
        if option not in self.FLAGS or any(isinstance(d, Option) and d.name not in self.FLAGS for d in detail):
            raise ValueError(f"OptionError names an option not in OptionError.FLAGS: {option!r} or one of {detail}")
        self.option, self.value, self.detail, self.command_line = option, value, detail, command_line
        super().__init__(
            self._label(option, value) + "".join(self._label(d.name) if isinstance(d, Option) else d for d in detail)
        )

    def __reduce__(self):
        # rebuilt from its parts, not from the message (Exception's default), so that it pickles and copies: an API
        # call in a process pool gets it back as it was raised
        return _rebuild_option_error, (self.option, self.value, self.detail, self.command_line)

    def _label(self, option: str, value: object = None) -> str:
        if value is None:
            return self.FLAGS[option] if self.command_line else option
        text = str(value) if isinstance(value, Path) else value  # a path as the string it names, not PosixPath(...)
        return f"{self.FLAGS[option]} {shlex.quote(str(text))}" if self.command_line else f"{option}={text!r}"

    def on_command_line(self) -> OptionError:
        """The same error with the command line's flags."""
        return OptionError(self.option, self.value, *self.detail, command_line=True)


def _rebuild_option_error(option: str, value: object, detail: tuple, command_line: bool) -> OptionError:
    return OptionError(option, value, *detail, command_line=command_line)


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
    if key in RULES and isinstance(value, RULES[key].types) and not isinstance(value, bool):
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
        _set(cfg, key, _checked_value(key, value, defaults[key], base))
    _resolve_default_paths(cfg, PATH_KEYS)
    check_values(cfg)
    check_trainer(cfg)
    return cfg


def _checked_value(key: str, value: Any, default: Any, base: Path) -> Any:
    """A given value of `key` as the config holds it: of its default's type (a ConfigError otherwise), and a path
    made absolute against `base` (the repository for a config file, the working directory for what a user typed)."""
    value = _check_type(key, value, default)
    if key in PATH_KEYS and isinstance(value, str) and value not in PATH_KEYWORDS.get(key, ()):
        value = str((base / Path(value).expanduser()).resolve())
    return value


def _resolve_default_paths(cfg: dict, keys: tuple[str, ...] | list[str]) -> None:
    """Paths of `keys` left at their default.yml value are relative to the repository too."""
    for key in keys:
        value = _get(cfg, key)
        if isinstance(value, str) and value not in PATH_KEYWORDS.get(key, ()) and not Path(value).is_absolute():
            _set(cfg, key, str((PROJECT_ROOT / Path(value).expanduser()).resolve()))


# Keys an older version stored under another name (a move to another section included): stored name -> today's.
# default.yml's history (git log -p configs/default.yml) has renamed none so far; a rename adds its row here.
RENAMED_KEYS: dict[str, str] = {}
# Keys an older version stored that this one has dropped, with the value under which that run did what this version
# does; a stored config with another value needed the dropped feature and is refused by name.
RETIRED_KEYS: dict[str, Any] = {
    "dcg.cross_fit_folds": 0,  # k >= 2 trained k DCGs, each without one fold (dropped in commit fff457e)
}
# Keys added after some configs were stored, whose absence meant another value than default.yml's today: a stored
# config without the key gets the value its run behaved by, not the new default.
ABSENT_MEANT: dict[str, Any] = {
    "explain.val_images": 0,  # runs before the TensorBoard explanations drew none
}


def upgrade_config(stored: dict, source: str) -> dict:
    """A config stored by this project (a checkpoint's hyper-parameters, a run folder's config.yaml), maybe by an
    older version, as this version reads it: the keys added since get default.yml's values (logged once, at INFO,
    naming them), renamed keys their new names, and retired keys are dropped where their value is what this version
    does. The one place a stored config enters the code, so that the code reads every key as cfg[section][key]. A
    key this version does not know, or a retired feature in use, is a ConfigError naming `source`. The stored values
    are kept as they are: the run that stored them checked them, and this version's checks may be stricter."""
    if not isinstance(stored, dict):
        raise ConfigError(f"{source}: the stored config is a {type(stored).__name__}, not a mapping of keys")
    cfg = copy.deepcopy(_read_yaml(DEFAULT_CONFIG))
    defaults = _flatten(cfg)
    given, renamed, dropped = set(), [], []
    for old, value in _flatten(stored).items():
        key = RENAMED_KEYS[old] if old in RENAMED_KEYS else old
        if key != old:
            renamed.append(f"{old} -> {key}")
        if key in RETIRED_KEYS:
            if value != RETIRED_KEYS[key]:
                raise ConfigError(
                    f"config key {key}: {source} was trained with {value!r}, a feature this version no longer has "
                    f"(only {RETIRED_KEYS[key]!r} loads); use the version that wrote it"
                )
            dropped.append(f"{key} (at {value!r})")
            continue
        if key not in defaults:
            raise ConfigError(
                f"config key {key}: {source} stores a key this version does not know (written by a newer version?)"
            )
        _set(cfg, key, value)
        given.add(key)
    filled = [key for key in defaults if key not in given]
    for key in (k for k in filled if k in ABSENT_MEANT):
        _set(cfg, key, ABSENT_MEANT[key])
    _resolve_default_paths(cfg, [key for key in filled if key in PATH_KEYS])
    filled_in = ", ".join(f"{k}={_get(cfg, k)!r}" for k in filled)
    notes = [f"filled in (default.yml's values, or what their absence meant) {filled_in}"] if filled else []
    notes += [f"renamed {', '.join(renamed)}"] if renamed else []
    notes += [f"dropped {', '.join(dropped)}"] if dropped else []
    if notes:
        logger.info("%s was stored by an older version: %s", source, "; ".join(notes))
    return cfg


def config_from_dict(given: Mapping[str, Any], source: str = "the config dict") -> dict:
    """A config handed over as a dict (the Python API): read as a stored config is (upgrade_config: the keys it lacks
    take default.yml's values, unknown keys are refused), then checked as a loaded one is, before any work: the type
    of every key, the values (check_values) and the trainer keys (check_trainer). A relative path is taken from the
    working directory, as an override's is (the keys filled in from default.yml: from the repository)."""
    cfg = upgrade_config(copy.deepcopy(dict(given)), source)
    defaults = _flatten(_read_yaml(DEFAULT_CONFIG))
    for key, value in _flatten(cfg).items():
        _set(cfg, key, _checked_value(key, value, defaults[key], Path.cwd()))
    check_values(cfg)
    check_trainer(cfg)
    return cfg


def read_run_config(path: str | Path) -> dict:
    """The config.yaml of a run folder (the resolved config its run wrote), upgraded to this version's keys."""
    return upgrade_config(_read_yaml(Path(path)), f"run config {path}")


# --- the values a key may take: one row per key, from which check_values runs the checks and words the messages ---


@dataclass(frozen=True)
class Rule:
    """What the value of one config key may be. Numbers: `low` / `high`, each a number or another key whose value is
    the bound, excluded when `open_low` / `open_high`; `multiple`: a positive multiple of it; `items`: a list of that
    many numbers, each in the range; `or_count`: an int value is a count instead (of batches), at least this, a float
    is checked against the range; `keywords`: words the key takes besides a number. `choices`: the values the key
    takes, or "module:NAME", the registry that lists them (a dict: its keys), imported when a config is checked.
    `types`: the types load_config accepts besides the default's. `when`: (key, value): the row applies only when
    that key has that value. A message says `unit` after the bound and `why` in brackets."""

    low: float | str | None = None
    high: float | str | None = None
    open_low: bool = False
    open_high: bool = False
    multiple: int | None = None
    items: int | None = None
    or_count: int | None = None
    keywords: tuple[str, ...] = ()
    choices: tuple[Any, ...] | str | None = None
    types: tuple[type, ...] = ()
    when: tuple[str, Any] | None = None
    unit: str = ""
    why: str = ""


V1_ONLY = ("model.method", "diffmic_v1")  # the v1 keys are read, and checked, only for DiffMIC v1
SYNTHETIC_ONLY = ("data.dataset", "synthetic")
AT_LEAST_ONE = Rule(low=1)
POSITIVE = Rule(low=0, open_low=True)
NOT_NEGATIVE = Rule(low=0)
LR_FRACTION = Rule(low=0, high=1, why="a fraction of the learning rate")
BATCH_LIMIT = Rule(low=0, high=1, open_low=True, or_count=1, types=(int,), why="a fraction of the batches, or a count")
# The range pl.seed_everything (numpy's legacy seeding) accepts.
MAX_SEED = 2**32 - 1

# Every key of default.yml whose value is constrained beyond its type, in default.yml's order (the checks run in this
# order). Paths are checked by check_paths (PATH_KEYS), the keys in LIGHTNING_KEYS by Lightning itself (check_trainer),
# and the constraints between keys by CROSS_CHECKS below.
RULES: dict[str, Rule] = {
    "seed": Rule(low=0, high=MAX_SEED, why="what Lightning seeds with"),
    "data.dataset": Rule(choices=("list", "medmnist", "synthetic")),
    "data.task": Rule(choices=("multiclass", "multilabel")),
    "data.val_fraction": Rule(low=0, high=1, open_low=True, open_high=True),
    "data.verify_images": Rule(choices=("fast", "full", "off")),
    "data.medmnist_size": Rule(choices="dataloader.medmnist:SIZES"),
    "data.num_classes": Rule(low=2, why="classes to tell apart"),
    "data.image_size": Rule(multiple=32, why="the CAM side is image_size / 32 and the ViT patch is 16"),
    "data.transform": Rule(choices=("standard", "chest")),
    "data.rotation_degrees": Rule(low=0, why="0: no rotation"),
    # the denoiser's BatchNorm1d of the image features, which would only fail after the DCG pre-training
    "data.batch_size": Rule(low=2, why="BatchNorm cannot train on one image"),
    "data.num_workers": Rule(low=0, keywords=("auto",), types=(int,), why="0 loads in the main process"),
    "data.synthetic.num_train": Rule(low=2, when=SYNTHETIC_ONLY, why="BatchNorm cannot train on one image"),
    "data.synthetic.num_val": Rule(low=1, when=SYNTHETIC_ONLY),
    "data.synthetic.num_test": Rule(low=1, when=SYNTHETIC_ONLY),
    "data.synthetic.pattern_size": Rule(low=1, high="data.image_size", open_high=True, when=SYNTHETIC_ONLY),
    "dcg.num_rois": AT_LEAST_ONE,  # and no more than the CAM's cells: _check_rois
    "dcg.roi_size": Rule(low=1, high="data.image_size"),
    "dcg.percent_t": Rule(low=0, high=1, open_low=True),
    "dcg.backbone": Rule(choices="pretraining.dcg:BACKBONES"),
    "dcg.epochs": AT_LEAST_ONE,
    "dcg.batch_size": AT_LEAST_ONE,
    "dcg.lr": POSITIVE,
    "dcg.min_lr_ratio": LR_FRACTION,
    "encoder_pretraining.epochs": AT_LEAST_ONE,
    "encoder_pretraining.batch_size": AT_LEAST_ONE,
    "encoder_pretraining.lr": POSITIVE,
    "encoder_pretraining.min_lr_ratio": LR_FRACTION,
    "encoder_pretraining.weight_decay": NOT_NEGATIVE,
    "model.method": Rule(choices="diffmic.methods:METHODS"),
    "model.image_encoder": Rule(choices="EfficientSAM:ENCODERS"),
    "model.patch_encoder": Rule(choices="diffmic.backbones:TRUNK_WIDTH"),
    "model.feature_dim": AT_LEAST_ONE,
    "model.condition_init": Rule(choices="diffmic.v2.model:CONDITION_INITS"),
    "diffusion.timesteps": AT_LEAST_ONE,
    # the scheduler's linear betas: each step must add some noise, and alpha_bar = prod(1 - beta) stay positive
    "diffusion.beta_start": Rule(low=0, high=1, open_low=True, open_high=True),
    "diffusion.beta_end": Rule(low="diffusion.beta_start", high=1, open_high=True),
    "diffusion.sampling_steps": Rule(low=1, high="diffusion.timesteps"),
    "diffusion.eval_samples": AT_LEAST_ONE,
    # w = 1 + alpha (1 - p)^gamma must stay >= 1
    "diffusion.focal_alpha": Rule(low=0, why="0 turns the focal weight off"),
    "diffusion.focal_gamma": Rule(low=0, why="0 turns the focal weight off"),
    "v1.encoder": Rule(choices="diffmic.v1.model:ENCODERS"),
    "v1.feature_dim": AT_LEAST_ONE,
    "v1.sampling_steps": Rule(low=1, high="diffusion.timesteps", when=V1_ONLY),
    "v1.mmd_weight": Rule(low=0, when=V1_ONLY),
    "v1.ema_decay": Rule(low=0, high=1, open_high=True, when=V1_ONLY),
    "v1.grad_clip": Rule(low=0, open_low=True, when=V1_ONLY),
    "v1.warmup_epochs": Rule(low=0, when=V1_ONLY),  # and below trainer.max_epochs: _check_v1_warmup
    "evaluation.temperature": Rule(choices=("none", "fit")),
    "optim.lr": POSITIVE,
    "optim.betas": Rule(low=0, high=1, open_high=True, items=2, why="e.g. [0.9, 0.999]"),
    "optim.eps": POSITIVE,
    "optim.weight_decay": NOT_NEGATIVE,
    "optim.min_lr_ratio": LR_FRACTION,
    "explain.val_images": Rule(low=0, high=8, why="0: off"),
    "trainer.max_epochs": AT_LEAST_ONE,
    "trainer.val_every": AT_LEAST_ONE,
    "trainer.accelerator": Rule(choices=("auto", "cpu", "gpu", "cuda", "mps")),
    "trainer.devices": Rule(types=(str, list)),  # Lightning's forms: 1, auto, "2", "0,1", [0, 1]
    "trainer.num_nodes": AT_LEAST_ONE,
    "trainer.dist_timeout_s": Rule(low=0, open_low=True, types=(float,), unit=" seconds"),
    "trainer.precision": Rule(types=(int,)),  # Lightning's legacy 16 / 32 / 64; precision_refusal after Lightning
    "trainer.float32_matmul_precision": Rule(choices="diffmic.precision:FLOAT32_POLICIES"),
    "trainer.log_every_n_steps": AT_LEAST_ONE,
    "trainer.limit_train_batches": BATCH_LIMIT,
    "trainer.limit_val_batches": BATCH_LIMIT,
}


def choices_of(key: str) -> tuple[Any, ...]:
    """The values a choice key of RULES takes: its row's, or the names its registry lists. The registries live with
    the models and data sets they name and are imported here, when a config is checked, not when config.py is."""
    choices = RULES[key].choices
    if isinstance(choices, str):
        module, name = choices.split(":")
        return tuple(getattr(importlib.import_module(module), name))
    assert choices is not None, f"config key {key} has no choices"
    return choices


def _bound(bound: float | str, cfg: dict) -> float:
    return _get(cfg, bound) if isinstance(bound, str) else bound


def _in_range(rule: Rule, value: float, cfg: dict) -> bool:
    if rule.low is not None:
        low = _bound(rule.low, cfg)
        if value < low or (rule.open_low and value == low):
            return False
    if rule.high is not None:
        high = _bound(rule.high, cfg)
        if value > high or (rule.open_high and value == high):
            return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(rule: Rule, value: Any, cfg: dict) -> bool:
    if isinstance(value, str):  # a number key's keyword; other strings are choices, paths or Lightning's
        return value in rule.keywords or not rule.keywords
    if rule.items is not None:
        return (
            isinstance(value, list)
            and len(value) == rule.items
            and all(_is_number(v) and _in_range(rule, v, cfg) for v in value)
        )
    if not _is_number(value):  # trainer.devices [0, 1]: Lightning's to judge
        return True
    if rule.multiple is not None:
        return value >= rule.multiple and value % rule.multiple == 0
    if rule.or_count is not None and isinstance(value, int):
        return value >= rule.or_count
    return _in_range(rule, value, cfg)


def _range_text(rule: Rule, cfg: dict, whole: bool) -> str:
    """The range in words: 'in 1..8' (whole numbers), 'in [0, 1)', '> 0', 'at least 1', '>= 0'; a bound that is a
    key is named and its value given."""
    low, high = rule.low, rule.high
    keyed = isinstance(low, str) or isinstance(high, str)
    if low is not None and high is not None:
        if whole:
            ends = [(low, " + 1" if rule.open_low else "", 1 if rule.open_low else 0)]
            ends.append((high, " - 1" if rule.open_high else "", -1 if rule.open_high else 0))
            named = "..".join(f"{b}{shift}" for b, shift, _ in ends)
            numbers = "..".join(str(_bound(b, cfg) + step) for b, _, step in ends)
            return f"in {named}" + (f" = {numbers}" if keyed else "") + rule.unit
        left, right = "(" if rule.open_low else "[", ")" if rule.open_high else "]"
        named = f"{left}{low}, {high}{right}"
        numbers = f" = {left}{_bound(low, cfg)}, {_bound(high, cfg)}{right}" if keyed else ""
        return f"in {named}{numbers}{rule.unit}"
    if low is not None:
        named = f"{low} ({_bound(low, cfg)})" if isinstance(low, str) else str(low)
        if rule.open_low:
            return f"> {named}{rule.unit}"
        return f"at least {named}{rule.unit}" if whole and low != 0 else f">= {named}{rule.unit}"
    assert high is not None, "a range needs a bound"
    named = f"{high} ({_bound(high, cfg)})" if isinstance(high, str) else str(high)
    return f"{'<' if rule.open_high else '<='} {named}{rule.unit}"


def _allowed(rule: Rule, value: Any, cfg: dict) -> str:
    """What the row allows, in words."""
    if rule.multiple is not None:
        return f"a positive multiple of {rule.multiple}"
    whole = isinstance(value, int) and rule.items is None and rule.or_count is None
    text = _range_text(rule, cfg, whole)
    if rule.items is not None:
        text = f"a list of {rule.items} numbers {text}"
    if rule.or_count is not None:
        text = f"{text} or a whole number at least {rule.or_count}"
    if rule.keywords:
        text = f"{' or '.join(rule.keywords)} or a number {text}"
    return text


def check_rules(cfg: dict) -> None:
    """Every row of RULES: raise a one-line ConfigError naming the key, its value and what the row allows."""
    for key, rule in RULES.items():
        if rule.when is not None and _get(cfg, rule.when[0]) != rule.when[1]:
            continue
        value = _get(cfg, key)
        if rule.choices is not None:
            choices = choices_of(key)
            if value not in choices:
                raise ConfigError(f"config key {key}: {value!r} is not one of {', '.join(map(str, choices))}")
        elif (rule.low is not None or rule.high is not None or rule.multiple is not None) and not _fits(
            rule, value, cfg
        ):
            why = f" ({rule.why})" if rule.why else ""
            raise ConfigError(f"config key {key}: must be {_allowed(rule, value, cfg)}{why}, got {value!r}")


def _check_finite(cfg: dict) -> None:
    """NaN slips through every range check (each comparison with it is false) and infinity through the open-ended
    ones; both only surface as a NaN loss or an optimiser error hours into a run. Every float key is checked, so a
    key added to default.yml is covered without being listed."""
    for key, value in _flatten(cfg).items():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            what = f"{value!r} holds a value that" if isinstance(value, list) else repr(value)
            raise ConfigError(f"config key {key}: {what} is not a finite number (NaN or infinity); give a finite value")


# --- constraints between keys, which a row of RULES cannot say --------------------------------------------------


def _check_rois(cfg: dict) -> None:
    data, dcg = cfg["data"], cfg["dcg"]
    cam = data["image_size"] // 32
    if dcg["num_rois"] > cam * cam:
        raise ConfigError(
            f"config key dcg.num_rois: {dcg['num_rois']} ROIs do not fit a {cam} x {cam} CAM "
            f"(data.image_size {data['image_size']}); use 1..{cam * cam}"
        )


def _check_class_names(cfg: dict) -> None:
    data = cfg["data"]
    names = data["class_names"]
    if names is not None and (not isinstance(names, list) or len(names) != data["num_classes"]):
        raise ConfigError(
            f"config key data.class_names: need a list of data.num_classes = {data['num_classes']} names, got {names!r}"
        )


def _check_patch_encoder_copy(cfg: dict) -> None:
    model, dcg = cfg["model"], cfg["dcg"]
    # v1 has no patch encoder: its model.patch_encoder keys are not read
    if model["method"] == "diffmic_v2" and model["patch_encoder_weights"] == "dcg":
        if model["patch_encoder"] != dcg["backbone"]:
            raise ConfigError(
                f"config key model.patch_encoder_weights: dcg copies the DCG's local trunk (dcg.backbone "
                f"{dcg['backbone']}), so model.patch_encoder must be {dcg['backbone']}, not {model['patch_encoder']}"
            )


def _check_v1_task(cfg: dict) -> None:
    if cfg["model"]["method"] == "diffmic_v1" and cfg["data"]["task"] == "multilabel":
        raise ConfigError(
            "config key model.method: diffmic_v1 classifies one label per image (softmax); "
            "data.task multilabel needs diffmic_v2"
        )


def _check_v1_warmup(cfg: dict) -> None:
    v1, epochs = cfg["v1"], cfg["trainer"]["max_epochs"]
    if cfg["model"]["method"] == "diffmic_v1" and v1["warmup_epochs"] >= epochs and v1["warmup_epochs"] > 0:
        raise ConfigError(
            f"config key v1.warmup_epochs: {v1['warmup_epochs']} must be below trainer.max_epochs "
            f"({epochs}), or the learning rate never leaves its warm-up"
        )


def _check_synthetic_task(cfg: dict) -> None:
    if cfg["data"]["dataset"] == "synthetic" and cfg["data"]["task"] == "multilabel":
        raise ConfigError("config key data.task: the synthetic demo set is multiclass")


def _check_medmnist_flag(cfg: dict) -> None:
    if cfg["data"]["dataset"] == "medmnist" and not cfg["data"]["flag"]:
        raise ConfigError("config key data.flag: data.dataset medmnist needs a MedMNIST flag, e.g. retinamnist")


# The constraints between keys, run in this order after the rows of RULES. Also checked elsewhere: the trainer keys by
# Lightning (check_trainer), the paths (check_paths), the labels against data.num_classes and the demo set's class
# count (dataloader/datamodule.py), the ImageNet weights (check_imagenet_weights).
CROSS_CHECKS = (
    _check_rois,
    _check_class_names,
    _check_patch_encoder_copy,
    _check_v1_task,
    _check_v1_warmup,
    _check_synthetic_task,
    _check_medmnist_flag,
)


def check_values(cfg: dict) -> None:
    """The values of a loaded config, before any work: finite floats, the rows of RULES, then CROSS_CHECKS."""
    _check_finite(cfg)
    check_rules(cfg)
    for check in CROSS_CHECKS:
        check(cfg)


# The trainer keys Lightning judges by its own rules (check_trainer), in the order it is given them.
LIGHTNING_KEYS = ("accelerator", "devices", "precision", "strategy", "num_nodes")
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
    """Let Lightning judge the trainer keys of LIGHTNING_KEYS (accelerator, devices, precision, strategy,
    num_nodes) with its own rules, by building a bare Trainer from them: no logger, no checkpoints, so
    nothing is written, and no process is started (that happens at fit). A refused value raises a
    one-line ConfigError naming the key."""
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
    names = list(LIGHTNING_KEYS)

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
