"""The commands as a Python API: `fit`, `validate`, `test` and `predict` do what `python diffuser_trainer.py
<command>` does (the command line is a thin layer over them): the same checks before any work, the same files in the
run folder logs/<name>/version_N/ (config.yaml, metrics.json, predictions.csv, figures) and the same log lines.

    from diffmic.api import predict
    df = predict(ckpt="logs/demo/version_0/checkpoints/best.ckpt", images=["a.png", "b.png"])

`config` is a YAML file (default configs/demo.yml) with `overrides` (["optim.lr=5e-4"] as on the command line, or
{"optim.lr": 5e-4}), or a config dict as diffmic.config.load_config returns it (used as it is). An error a user
causes is raised before any work, as on the command line: ConfigError (its exit 2; its subclass OptionError names a
bad option by its keyword here, by its flag through on_command_line()), durable.WriteFailed (5),
faults.TrainingDiverged (3), faults.RunInterrupted (130 / 143); faults.exit_code maps any of them to the command
line's one line and exit code. Nothing here sets up logging: call diffmic.utils.setup_logging() to see the log."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pytorch_lightning as pl

from dataloader.datamodule import DiffMICDataModule, build_datasets, check_evaluation_sizes
from dataloader.transforms import build_transform
from dataloader.unlabelled import unlabelled_images
from diffmic.checkpoints import read_checkpoint
from diffmic.config import (
    ConfigError,
    Option,
    OptionError,
    check_imagenet_weights,
    check_paths,
    config_from_dict,
    dcg_ckpt_path,
    load_config,
)
from diffmic.explain.outputs import ExplainValidation, check_explain_folder, write_explanations
from diffmic.faults import interruptible, run_folder_lock, signals_end_run
from diffmic.methods import METHODS, build_system
from diffmic.results import (
    log_prediction_notes,
    prediction_table,
    save_config,
    write_json,
    write_prediction_table,
    write_uncertainty_figures,
)
from diffmic.utils import build_trainer, log_global_batch, planned_world_size, selection_metric
from pretraining.train_dcg import pretrain_dcg

logger = logging.getLogger(__name__)
COMMANDS = ("fit", "validate", "test", "predict")
ConfigSource = Mapping[str, Any] | str | Path | None
Overrides = Sequence[str] | Mapping[str, Any]
Images = str | Path | Sequence[str | Path]


def resolve_config(config: ConfigSource = None, overrides: Overrides = ()) -> dict:
    """The checked config: `config` a YAML file (None: configs/demo.yml) loaded with `overrides` (key.sub=value words,
    or a mapping of key.sub to value), or a config dict (no overrides: change the dict). A dict is read as a stored
    config is (keys it lacks from default.yml, unknown keys refused) and checked as a loaded one, so a bad value
    fails here, before any work."""
    if isinstance(config, Mapping):
        if overrides:
            raise ConfigError("overrides go with a config file; change the config dict itself instead")
        return config_from_dict(config)
    if isinstance(overrides, str):
        words = [overrides]
    elif isinstance(overrides, Mapping):  # JSON is YAML: each value reads back as it was given
        words = [f"{k}={json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in overrides.items()]
    else:
        words = list(overrides)
    return load_config(config, words)


def check_command_options(
    command: str, images: Images | None, explain: str | Path | None, explain_max: int | None
) -> None:
    """The options only `predict` takes (images, explain) given to another command, or a bad explain_max: a
    OptionError before any work."""
    if images is not None and command != "predict":
        raise OptionError("images", None, f" is for predict, not {command}")
    if explain_max is not None and (explain is None or explain_max < 1):
        raise OptionError("explain_max", explain_max, ": give a number >= 1, with ", Option("explain"), " (a folder)")
    if explain is not None and command != "predict":
        raise OptionError("explain", None, f" is for predict, not {command}")


def find_checkpoint(cfg: dict, spec: str | Path) -> Path:
    """ckpt best|last: that file in the newest version of logs/<name> holding one; else a path."""
    if isinstance(spec, str) and spec in ("best", "last"):
        base = Path(cfg["trainer"]["log_dir"]) / cfg["name"]
        versions = sorted(base.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]), reverse=True)
        for version in versions:
            if (version / "checkpoints" / f"{spec}.ckpt").is_file():
                return version / "checkpoints" / f"{spec}.ckpt"
        raise OptionError("ckpt", spec, f": no {spec}.ckpt under {base}/version_*/checkpoints (train first)")
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise OptionError("ckpt", spec, ": checkpoint not found" + ("" if str(spec) == str(path) else f" ({path})"))
    return path


def version_of(ckpt: Path | None) -> int | None:
    """The N of logs/<name>/version_N/checkpoints/x.ckpt, to keep logging a resumed run there."""
    match = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name) if ckpt else None
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------- the commands


def fit(
    config: ConfigSource = None,
    *,
    overrides: Overrides = (),
    ckpt: str | Path | None = None,
    out: str | Path | None = None,
) -> dict:
    """Train: pre-train the DCG if its file is missing, train the diffusion model (`ckpt`: a last.ckpt to resume,
    a path or best|last), then validate and test the best checkpoint. Writes metrics.json into the run folder (or
    `out`) and returns what it holds: checkpoint, val, selection, temperature, test, val_history."""
    cfg = resolve_config(config, overrides)
    setup = _set_up("fit", cfg, ckpt, None)
    system, data = setup.system, setup.data
    # one writer at a time sets up a run folder: another fit of it waits here while this one pre-trains the DCG
    # and takes its version folder (faults.exclusive), then finds the DCG file and takes the next version
    with run_folder_lock(Path(cfg["trainer"]["log_dir"]) / cfg["name"], "setting up a fit in this run folder"):
        if setup.ckpt is None:  # a new run: the DCG (pre-trained first if missing) and the encoders' initial weights
            system.load_initial_weights(system.WEIGHTS_BEFORE_DCG)  # a bad file is refused before any work
            dcg_path = pretrain_dcg(cfg, data.datasets, reuse=True)  # on every machine of the run
            system.load_dcg_file(dcg_path, data.datasets["train"])
            system.load_initial_weights(system.WEIGHTS_AFTER_DCG)
        trainer, best = build_trainer(
            cfg,
            cfg["name"],
            cfg["trainer"]["max_epochs"],
            cfg["trainer"]["val_every"],
            version_of(setup.ckpt),
            callbacks=[ExplainValidation(cfg)],  # TensorBoard's val/explain/<i> (explain.val_images)
        )
        run_dir = save_config(cfg, trainer)
    section, name = system.lr_key.split(".")
    log_global_batch(trainer, cfg["data"]["batch_size"], cfg[section][name], "training", system.lr_key)
    with interruptible(trainer, "the fit", resumable=True):
        trainer.fit(system, datamodule=data, ckpt_path=setup.ckpt, weights_only=True)  # several devices: each process
    # a signal from here on ends with the same one line as during training (130 / 143)
    with signals_end_run(trainer, "the final validation and test of the fit (training done: a resume runs them)"):
        return final_evaluation(trainer, system, data, best, cfg, Path(out) if out else run_dir / "metrics.json")


def validate(
    config: ConfigSource = None,
    *,
    overrides: Overrides = (),
    ckpt: str | Path | None = None,
    out: str | Path | None = None,
) -> dict:
    """Evaluate `ckpt` (required: a path, or best|last of the newest run) on the validation split. Writes
    metrics.json into a new run folder (or `out`) and returns what it holds: checkpoint, val (the metrics),
    temperature."""
    return _evaluate("validate", resolve_config(config, overrides), ckpt, out)


def test(
    config: ConfigSource = None,
    *,
    overrides: Overrides = (),
    ckpt: str | Path | None = None,
    out: str | Path | None = None,
) -> dict:
    """Evaluate `ckpt` (required) on the test split, after a validation pass that fits the temperature when
    evaluation.temperature is `fit`. Writes metrics.json (or `out`) and returns what it holds: checkpoint, test (the
    metrics), temperature."""
    return _evaluate("test", resolve_config(config, overrides), ckpt, out)


test.__test__ = False  # a command, not a test: pytest collects it where a test module imports it


def predict(
    config: ConfigSource = None,
    *,
    overrides: Overrides = (),
    ckpt: str | Path | None = None,
    images: Images | None = None,
    out: str | Path | None = None,
    write_csv: bool = True,
    explain: str | Path | None = None,
    explain_max: int | None = None,
) -> pd.DataFrame:
    """Classify the test list, or `images`: a folder of images (recursively), a CSV list with a path column (paths
    relative to data.root, else to the list's folder), or a list of image files (relative to the working directory;
    each row's `image` is the path as given). `ckpt` is required. Returns one row per image, in order, with the
    columns of predictions.csv (image, label or status, score_*, pred, pred_name, spread, prob_*, max_prob, entropy,
    agreement, sample_spread) at full precision; an unreadable image's row says why in `status`. `write_csv`: also
    write predictions.csv into the new run folder (or `out`), atomically. `explain`: a folder for a PNG of what
    guided each prediction, of the first `explain_max` images (None: all)."""
    cfg = resolve_config(config, overrides)
    check_command_options("predict", images, explain, explain_max)
    if out is not None and not write_csv:
        raise OptionError("out", out, ": is where the CSV goes; give write_csv=True or no out")
    explain_dir = check_explain_folder(explain) if explain is not None else None
    setup = _set_up("predict", cfg, ckpt, images)
    system, data = setup.system, setup.data
    trainer, run_dir = _evaluation_folder(cfg, "predict")
    calibrate(trainer, system, cfg, data)
    trainer.predict(system, datamodule=data, return_predictions=False)  # gathered into system.predictions
    dataset = data.datasets["predict" if images is not None else "test"]
    if explain_dir is not None and trainer.is_global_zero:  # in the batches predict used: the CSV's scores
        write_explanations(system, trainer, dataset, explain_dir, explain_max, setup.names)
    multilabel = cfg["data"]["task"] == "multilabel"
    table = prediction_table(system.predictions, dataset, setup.names, multilabel, system.temperature)
    if trainer.is_global_zero:
        path = Path(out) if out else run_dir / "predictions.csv"
        if write_csv:
            write_prediction_table(path, table)
        log_prediction_notes(table, str(path) if write_csv else "the returned table")
    return table.frame()


# ---------------------------------------------------------------------------------------------- their steps


class _SetUp(NamedTuple):
    ckpt: Path | None  # the checkpoint file the command reads, if any
    system: pl.LightningModule
    data: DiffMICDataModule
    names: list[str]  # the class names (their indices where the config has none)


def _set_up(command: str, cfg: dict, ckpt_spec: str | Path | None, images: Images | None) -> _SetUp:
    """The checks before any work, the data and the model: a checkpoint is read (weights only) and checked against
    the config before anything runs or is written; a new fit reads its DCG file and ImageNet weights first."""
    check_paths(cfg, need_dcg=False, need_data=images is None)
    ckpt = find_checkpoint(cfg, ckpt_spec) if ckpt_spec else None
    if command != "fit" and ckpt is None:
        raise OptionError("ckpt", None, f" is needed by {command}: a checkpoint path, best or last")
    checkpoint = read_checkpoint(ckpt) if ckpt is not None else None
    if command == "fit" and ckpt is None and dcg_ckpt_path(cfg).is_file():  # refused before any work if unsafe
        read_checkpoint(dcg_ckpt_path(cfg), "DCG file (config key dcg.ckpt)")
    pl.seed_everything(cfg["seed"], workers=True)  # initialisation, shuffling and noise follow cfg.seed
    if images is None:
        data = DiffMICDataModule(cfg)
    else:
        unlabelled = unlabelled_images(
            images, cfg["data"]["root"], build_transform(cfg, train=False), cfg["data"]["image_size"]
        )
        # with the validation split when the temperature is fitted on it before predicting (calibrate)
        fitted = cfg["evaluation"]["temperature"] == "fit"
        datasets = {"predict": unlabelled, "val": build_datasets(cfg)["val"]} if fitted else {"predict": unlabelled}
        data = DiffMICDataModule(cfg, datasets=datasets)
    check_evaluation_sizes(data.datasets, planned_world_size(cfg))
    if command == "fit" and ckpt is None:  # a new run reads the ImageNet weights it asks for: offline, refused now
        keys = [] if dcg_ckpt_path(cfg).is_file() else ["dcg.backbone_weights"]  # else the DCG is not pre-trained
        keys += METHODS[cfg["model"]["method"]].IMAGENET_WEIGHT_KEYS
        check_imagenet_weights(cfg, keys)
    system = build_system(cfg)
    names = cfg["data"]["class_names"] or [str(c) for c in range(cfg["data"]["num_classes"])]
    if checkpoint is not None:  # evaluation, or a resume: the weights must fit the config before any file is written
        system.load_checkpoint_file(ckpt, checkpoint=checkpoint)
        logger.info("weights loaded from %s", ckpt)
    return _SetUp(ckpt, system, data, names)


def _evaluation_folder(cfg: dict, command: str) -> tuple[pl.Trainer, Path]:
    """An evaluation's Trainer and run folder: the next version folder, taken under the run folder's lock, so that
    two commands (or a fit setting up) never pick the same one and overwrite each other's config.yaml and files."""
    with run_folder_lock(Path(cfg["trainer"]["log_dir"]) / cfg["name"], f"setting up a {command} in this run folder"):
        trainer, _ = build_trainer(cfg, cfg["name"], 1, 1)
        return trainer, save_config(cfg, trainer)


def _evaluate(command: str, cfg: dict, ckpt_spec: str | Path | None, out: str | Path | None) -> dict:
    """validate or test: metrics.json of that split."""
    setup = _set_up(command, cfg, ckpt_spec, None)
    system = setup.system
    trainer, run_dir = _evaluation_folder(cfg, command)
    if command == "test":
        calibrate(trainer, system, cfg, setup.data)
    getattr(trainer, command)(system, datamodule=setup.data, verbose=False)
    split = "val" if command == "validate" else "test"
    result = {"checkpoint": str(setup.ckpt), split: dict(system.last_metrics), "temperature": system.temperature}
    if trainer.is_global_zero:
        path = Path(out) if out else run_dir / "metrics.json"
        write_json(path, result)
        write_uncertainty_figures(path.parent, split, system)
    return result


def calibrate(trainer: pl.Trainer, system, cfg: dict, data: DiffMICDataModule) -> None:
    """evaluation.temperature fit: a validation pass over data's validation split before test or predict, which fits
    the temperature (EvaluatedSystem._uncertainty) that the next pass applies."""
    if cfg["evaluation"]["temperature"] != "fit":
        return
    logger.info("evaluation.temperature fit: fitting the temperature on the validation split first")
    trainer.validate(system, datamodule=data, verbose=False)


def final_evaluation(trainer: pl.Trainer, system, data, best, cfg: dict, path: Path) -> dict:
    """After training: validate and test the best checkpoint and write `path` (metrics.json) with both, the
    selection, the temperature and the learning curve; returns that content."""
    history = list(system.val_history)  # the validation metrics of each validated epoch: the learning curve
    best_path = best.best_model_path or str(Path(trainer.log_dir) / "checkpoints" / "last.ckpt")
    logger.info("training finished: validating and testing %s", best_path)
    restore_best(trainer, system, best_path)
    trainer.validate(system, datamodule=data, verbose=False)
    result = {
        "checkpoint": best_path,
        "val": dict(system.last_metrics),
        "selection": {
            "monitor": selection_metric(cfg),
            "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
        },
    }
    result["temperature"] = system.temperature  # fitted on that validation pass, or 1
    trainer.test(system, datamodule=data, verbose=False)
    result["test"] = dict(system.last_metrics)
    result["val_history"] = history
    if trainer.is_global_zero:
        write_json(path, result)
        write_uncertainty_figures(path.parent, "test", system)
    return result


def restore_best(trainer: pl.Trainer, system, path: str) -> None:
    """The weights of the best checkpoint in `system` on every process: the first process reads the file (weights
    only) and sends its state dict and epoch over the process group, so the other machines need no copy of it. A
    frozen DCG, which checkpoints leave out, stays as it was loaded from its file."""
    checkpoint = read_checkpoint(Path(path)) if trainer.is_global_zero else None
    sent = (checkpoint["state_dict"], checkpoint.get("epoch")) if checkpoint is not None else None
    state, epoch = trainer.strategy.broadcast(sent, src=0)
    frozen = {f"dcg.{k}": v for k, v in system.dcg.state_dict().items()} if system.dcg_frozen else {}
    system.load_state_dict({**frozen, **state})
    system.weights_epoch = epoch  # the final validation and test are logged with the checkpoint's epoch
