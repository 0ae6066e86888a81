"""The command line: train and evaluate DiffMIC-v2 (or DiffMIC v1: model.method=diffmic_v1).

    python diffuser_trainer.py [fit|validate|test|predict] [--config FILE] [--ckpt PATH|best|last]
                               [--out FILE] [--input DIR_OR_LIST] [--explain DIR [--explain-max N]]
                               [key.sub=value ...]

A config error ends the command with exit code 2 and one line that names the key or the file; a diverged training
with 3, a file that could not be written with 5 (durable.py), Ctrl-C with 130 and SIGTERM with 143, each with one
line that says what was kept (faults.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import yaml

from dataloader.datamodule import DiffMICDataModule, check_evaluation_sizes
from dataloader.transforms import build_transform
from dataloader.unlabelled import unlabelled_images
from diffmic.checkpoints import read_checkpoint
from diffmic.config import ConfigError, check_imagenet_weights, check_paths, dcg_ckpt_path, load_config
from diffmic.durable import atomic_open, write_atomically
from diffmic.evaluation.evaluator import uncertainty_figures
from diffmic.evaluation.figures import save
from diffmic.evaluation.uncertainty import SAMPLE_SCORES, apply_temperature, entropy
from diffmic.explain.outputs import ExplainValidation, check_explain_folder, write_explanations
from diffmic.faults import (
    exit_code,
    interruptible,
    run_folder_lock,
    signals_end_run,
)
from diffmic.methods import METHODS, build_system
from diffmic.utils import build_trainer, log_global_batch, planned_world_size, selection_metric, setup_logging
from pretraining.train_dcg import pretrain_dcg

logger = logging.getLogger("diffuser_trainer")
COMMANDS = ("fit", "validate", "test", "predict")


def find_checkpoint(cfg: dict, spec: str) -> Path:
    """--ckpt best|last: that file in the newest version of logs/<name> holding one; else a path."""
    if spec in ("best", "last"):
        base = Path(cfg["trainer"]["log_dir"]) / cfg["name"]
        versions = sorted(base.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]), reverse=True)
        for version in versions:
            if (version / "checkpoints" / f"{spec}.ckpt").is_file():
                return version / "checkpoints" / f"{spec}.ckpt"
        raise ConfigError(f"--ckpt {spec}: no {spec}.ckpt under {base}/version_*/checkpoints (train first)")
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--ckpt: checkpoint not found: {path}")
    return path


def version_of(ckpt: Path | None) -> int | None:
    """The N of logs/<name>/version_N/checkpoints/x.ckpt, to keep logging a resumed run there."""
    match = re.fullmatch(r"version_(\d+)", ckpt.parent.parent.name) if ckpt else None
    return int(match.group(1)) if match else None


def write_json(path: Path, content: dict) -> None:
    """metrics.json, atomically: a reader (or a kill) never meets half a file."""
    write_atomically(path, json.dumps(content, indent=2, allow_nan=True))
    logger.info("wrote %s", path)


def write_predictions(
    path: Path, predictions: dict, dataset, class_names: list[str], multilabel: bool, temperature: float = 1.0
) -> None:
    """One row per image, in index order: its id, its label (when the images have labels), one score per class
    (finding), the prediction, the spread of the grid cells, then the probabilities (after `temperature`) and the
    per-image uncertainty: max_prob (single-label), entropy, and the diffusion models' agreement and sample_spread
    over their S samples (`nan` when S = 1: undefined, said in the log). Multi-label: the label and the prediction
    are the findings at or above 0.5, joined by '|'. Unlabelled images (predict --input) get a `status` column instead
    of a label: `ok`, or `unreadable: <why>` with the scores left empty. `predictions`: EvaluatedSystem.predictions."""
    labelled = dataset.labels is not None
    sample_scores = [k for k in SAMPLE_SCORES if k in predictions]
    head = ["image"] + (["label"] if labelled else []) + [f"score_{n}" for n in class_names] + ["pred"]
    head += ([] if multilabel else ["pred_name"]) + ["spread"]
    head += [f"prob_{n}" for n in class_names] + ([] if multilabel else ["max_prob"]) + ["entropy", *sample_scores]
    head += [] if labelled else ["status"]
    errors = predictions.get("error", [""] * len(predictions["index"]))
    probs = apply_temperature(predictions["probs"], temperature, multilabel)
    uncertainty = {"entropy": entropy(probs, multilabel), **{k: predictions[k] for k in sample_scores}}
    undefined = [k for k in sample_scores if not np.isfinite(predictions[k]).any()]
    if undefined:
        logger.info(
            "%s: %s undefined (nan): one sample per image (diffusion.eval_samples 1)", path, ", ".join(undefined)
        )
    unreadable = 0
    with atomic_open(path, "w", newline="") as handle:  # a reader (or a kill) never meets half a file
        writer = csv.writer(handle)
        writer.writerow(head)
        for row_index, (i, scores, spread, label, error) in enumerate(
            zip(
                predictions["index"],
                predictions["scores"],
                predictions["spread"],
                predictions["label"],
                errors,
                strict=True,
            )
        ):
            row = [dataset.ids[int(i)]]
            if labelled:
                truth = label.tolist()
                row.append(
                    "|".join(n for n, y in zip(class_names, truth, strict=True) if y >= 0.5)
                    if multilabel
                    else int(truth)
                )
            if error:
                unreadable += 1
                writer.writerow(row + [""] * (len(head) - len(row) - 1) + [f"unreadable: {error}"])
                continue
            row += [f"{s:.6f}" for s in scores.tolist()]
            if multilabel:
                row.append("|".join(n for n, s in zip(class_names, scores.tolist(), strict=True) if s >= 0.5))
            else:
                pred = int(scores.argmax())
                row += [pred, class_names[pred]]
            row.append(f"{float(spread):.6f}")
            p = probs[row_index]
            row += [f"{v:.6f}" for v in p.tolist()] + ([] if multilabel else [f"{float(p.max()):.6f}"])
            row += [f"{float(uncertainty[k][row_index]):.6f}" for k in ("entropy", *sample_scores)]
            writer.writerow(row + ([] if labelled else ["ok"]))
    if unreadable:
        logger.warning("%d image(s) could not be read: their rows in %s say why", unreadable, path)
    logger.info("wrote %s", path)


def write_uncertainty_figures(folder: Path, split: str, system) -> None:
    """The reliability diagram and the risk-coverage curve of the split just evaluated, as PNGs beside its metrics:
    reliability_<split>.png, risk_coverage_<split>.png (single-label)."""
    if "probs" not in system.last_outputs:
        return
    for name, fig in uncertainty_figures(system.last_outputs, system.temperature).items():
        logger.info("wrote %s", save(fig, folder / f"{name}_{split}.png"))


def calibrate(trainer, system, cfg: dict) -> None:
    """evaluation.temperature fit: a validation pass before test or predict, which fits the temperature on the
    validation split (EvaluatedSystem._uncertainty) that the next pass applies."""
    if cfg["evaluation"]["temperature"] != "fit":
        return
    logger.info("evaluation.temperature fit: fitting the temperature on the validation split first")
    trainer.validate(system, datamodule=DiffMICDataModule(cfg), verbose=False)


def run(
    command: str,
    cfg: dict,
    ckpt_spec: str | None,
    out: str | None,
    source: str | None = None,
    explain: str | None = None,
    explain_max: int | None = None,
) -> None:
    """Run one command on a checked config; `out` replaces the default output file; `source` (predict only) is a
    folder or list of unlabelled images to classify instead of the test list; `explain` (predict only) a folder for
    a figure of what guided each prediction, of the first `explain_max` images (None: all). A checkpoint is read
    (weights only) and checked against the config before anything runs or is written."""
    if source is not None and command != "predict":
        raise ConfigError(f"--input is for predict, not {command}")
    if explain_max is not None and (explain is None or explain_max < 1):
        raise ConfigError(f"--explain-max {explain_max}: give a number >= 1, with --explain DIR")
    if explain is not None and command != "predict":
        raise ConfigError(f"--explain is for predict, not {command}")
    explain_dir = check_explain_folder(explain) if explain is not None else None
    check_paths(cfg, need_dcg=False, need_data=source is None)
    ckpt = find_checkpoint(cfg, ckpt_spec) if ckpt_spec else None
    if command != "fit" and ckpt is None:
        raise ConfigError(f"{command} needs --ckpt PATH|best|last")
    checkpoint = read_checkpoint(ckpt) if ckpt is not None else None
    if command == "fit" and ckpt is None and dcg_ckpt_path(cfg).is_file():  # refused before any work if unsafe
        read_checkpoint(dcg_ckpt_path(cfg), "DCG file (config key dcg.ckpt)")
    pl.seed_everything(cfg["seed"], workers=True)  # initialisation, shuffling and noise follow cfg.seed
    if source is None:
        data = DiffMICDataModule(cfg)
    else:
        images = unlabelled_images(
            source, cfg["data"]["root"], build_transform(cfg, train=False), cfg["data"]["image_size"]
        )
        data = DiffMICDataModule(cfg, datasets={"predict": images})
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
    if command == "fit":
        # one writer at a time sets up a run folder: another fit of it waits here while this one pre-trains the DCG
        # and takes its version folder (faults.exclusive), then finds the DCG file and takes the next version
        with run_folder_lock(Path(cfg["trainer"]["log_dir"]) / cfg["name"], "setting up a fit in this run folder"):
            if ckpt is None:  # a new run: the DCG (pre-trained first if missing) and the encoders' initial weights
                system.load_initial_weights(system.WEIGHTS_BEFORE_DCG)  # a bad file is refused before any work
                dcg_path = pretrain_dcg(cfg, data.datasets, reuse=True)  # on every machine of the run
                system.load_dcg_file(dcg_path, data.datasets["train"])
                system.load_initial_weights(system.WEIGHTS_AFTER_DCG)
            trainer, best = build_trainer(
                cfg,
                cfg["name"],
                cfg["trainer"]["max_epochs"],
                cfg["trainer"]["val_every"],
                version_of(ckpt),
                callbacks=[ExplainValidation(cfg)],  # TensorBoard's val/explain/<i> (explain.val_images)
            )
            run_dir = save_config(cfg, trainer)
        lr_key = getattr(system, "lr_key", "optim.lr")
        section, name = lr_key.split(".")
        log_global_batch(trainer, cfg["data"]["batch_size"], cfg[section][name], "training", lr_key)
        with interruptible(trainer, "the fit", resumable=True):
            trainer.fit(system, datamodule=data, ckpt_path=ckpt, weights_only=True)  # several devices: every process
        # a signal from here on ends with the same one line as during training (130 / 143)
        with signals_end_run(trainer, "the final validation and test of the fit (training done: a resume runs them)"):
            final_evaluation(trainer, system, data, best, cfg, Path(out) if out else run_dir / "metrics.json")
        return
    # an evaluation takes the next version folder too: under the same lock, so that two commands (or a fit setting
    # up) never pick the same one and overwrite each other's config.yaml and metrics.json
    with run_folder_lock(Path(cfg["trainer"]["log_dir"]) / cfg["name"], f"setting up a {command} in this run folder"):
        trainer, _ = build_trainer(cfg, cfg["name"], 1, 1)
        run_dir = save_config(cfg, trainer)
    if command in ("validate", "test"):
        if command == "test":
            calibrate(trainer, system, cfg)
        getattr(trainer, command)(system, datamodule=data, verbose=False)
        split = "val" if command == "validate" else "test"
        if trainer.is_global_zero:
            path = Path(out) if out else run_dir / "metrics.json"
            write_json(
                path, {"checkpoint": str(ckpt), split: dict(system.last_metrics), "temperature": system.temperature}
            )
            write_uncertainty_figures(path.parent, split, system)
    else:
        calibrate(trainer, system, cfg)
        trainer.predict(system, datamodule=data, return_predictions=False)  # gathered into system.predictions
        dataset = data.datasets["predict" if source is not None else "test"]
        if explain_dir is not None and trainer.is_global_zero:  # in the batches predict used: the CSV's scores
            write_explanations(system, trainer, dataset, explain_dir, explain_max, names)
        if trainer.is_global_zero:
            path = Path(out) if out else run_dir / "predictions.csv"
            multilabel = cfg["data"]["task"] == "multilabel"
            write_predictions(path, system.predictions, dataset, names, multilabel, system.temperature)


def final_evaluation(trainer: pl.Trainer, system, data, best, cfg: dict, path: Path) -> None:
    """After training: validate and test the best checkpoint and write `path` (metrics.json) with both, the
    selection, the temperature and the learning curve."""
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


def save_config(cfg: dict, trainer) -> Path:
    """The run folder: every process asks for it (once the processes are connected, Lightning broadcasts the first
    one's answer, a collective call), the first process writes the resolved config there and logs it."""
    log_dir = Path(trainer.log_dir)
    if trainer.is_global_zero:
        log_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(log_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        logger.info("run directory: %s", log_dir)
    return log_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="diffuser_trainer.py",
        description="Train and evaluate DiffMIC-v2 (model.method=diffmic_v1: DiffMIC v1).",
        epilog="commands: fit (default), validate, test, predict; overrides look like optim.lr=5e-4",
    )
    parser.add_argument("words", nargs="*", metavar="[command] key.sub=value", help="command, then overrides")
    parser.add_argument("--config", help="YAML config (default: configs/demo.yml)")
    parser.add_argument("--ckpt", help="checkpoint: a path, best or last (fit: resume from it)")
    parser.add_argument("--out", help="where validate/test/fit write metrics JSON, or predict its CSV")
    parser.add_argument("--explain", metavar="DIR", help="predict: a PNG per image of what guided its prediction")
    parser.add_argument("--explain-max", type=int, metavar="N", help="predict --explain: the first N images only")
    parser.add_argument("--input", help="predict: a folder of images or a CSV list of paths, without labels")
    parser.add_argument("--debug", action="store_true", help="a diverged or interrupted run shows its traceback")
    args = parser.parse_intermixed_args(argv)
    args.command = args.words.pop(0) if args.words and args.words[0] in COMMANDS else "fit"
    bad = [w for w in args.words if "=" not in w]
    if bad:
        parser.error(f"unknown command {bad[0]!r}: use one of {', '.join(COMMANDS)}, then key.sub=value overrides")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    cfg = None
    try:
        cfg = load_config(args.config, args.words)
        run(args.command, cfg, args.ckpt, args.out, args.input, args.explain, args.explain_max)
    except Exception as err:  # one line and the documented exit code (faults.exit_code)
        return exit_code(err, cfg, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
