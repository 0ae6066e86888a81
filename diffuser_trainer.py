"""The command line: train and evaluate DiffMIC-v2.

    python diffuser_trainer.py [fit|validate|test|predict] [--config FILE] [--ckpt PATH|best|last]
                               [--out FILE] [key.sub=value ...]

A config error ends the command with exit code 2 and one line that names the key or the file.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

from config import ConfigError, check_paths, dcg_ckpt_path, errors_of, load_config
from dataloader.datamodule import DiffMICDataModule
from diffmic_v2 import DiffMICv2
from pretraining.train_dcg import load_dcg, pretrain_dcg
from utils import build_trainer, selection_metric, setup_logging

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


def load_weights(system: DiffMICv2, ckpt: Path) -> None:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    try:
        system.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ConfigError(f"--ckpt {ckpt} does not fit the config's model ({first})") from None
    logger.info("weights loaded from %s", ckpt)


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, allow_nan=True))
    logger.info("wrote %s", path)


def write_predictions(path: Path, outputs: list[dict], dataset, class_names: list[str]) -> None:
    """One row per image: its id, the truth, one score per class (finding), the prediction and the
    spread of the grid cells. Multi-label: the truth and prediction are the findings at or above
    0.5, joined by '|'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scores_head = [f"score_{n}" for n in class_names]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        rows = [
            (i, s, sp, y)
            for out in outputs
            for i, s, sp, y in zip(out["index"], out["scores"], out["spread"], out["label"], strict=True)
        ]
        multilabel = bool(rows) and rows[0][3].dim() == 1
        if multilabel:
            writer.writerow(["image", "label"] + scores_head + ["pred", "spread"])
        else:
            writer.writerow(["image", "label"] + scores_head + ["pred", "pred_name", "spread"])
        for i, scores, spread, label in rows:
            values = [f"{s:.6f}" for s in scores.tolist()]
            if multilabel:
                truth = "|".join(n for n, y in zip(class_names, label.tolist(), strict=True) if y >= 0.5)
                pred = "|".join(n for n, s in zip(class_names, scores.tolist(), strict=True) if s >= 0.5)
                writer.writerow([dataset.ids[int(i)], truth] + values + [pred, f"{float(spread):.6f}"])
            else:
                pred = int(scores.argmax())
                writer.writerow(
                    [dataset.ids[int(i)], int(label)] + values + [pred, class_names[pred], f"{float(spread):.6f}"]
                )
    logger.info("wrote %s", path)


def run(command: str, cfg: dict, ckpt_spec: str | None, out: str | None) -> None:
    """Run one command on a checked config; `out` replaces the default output file."""
    check_paths(cfg, need_dcg=False)
    ckpt = find_checkpoint(cfg, ckpt_spec) if ckpt_spec else None
    if command != "fit" and ckpt is None:
        raise ConfigError(f"{command} needs --ckpt PATH|best|last")
    pl.seed_everything(cfg["seed"], workers=True)  # initialisation, shuffling and noise follow cfg.seed
    data = DiffMICDataModule(cfg)
    system = DiffMICv2(cfg)
    names = cfg["data"]["class_names"] or [str(c) for c in range(cfg["data"]["num_classes"])]
    if command == "fit":
        if ckpt is None:  # a new run: the DCG (pre-trained first if missing) and the encoders' initial weights
            dcg_path = dcg_ckpt_path(cfg)
            if not dcg_path.is_file():
                logger.info(
                    "DCG checkpoint %s does not exist: pre-training the DCG first (%d epochs)",
                    dcg_path,
                    cfg["dcg"]["epochs"],
                )
                pretrain_dcg(cfg, data.datasets)
            load_dcg(system.dcg, cfg, dcg_path)
            with errors_of("model.efficientsam_weights"):
                system.denoiser.load_image_encoder(cfg["model"]["efficientsam_weights"])
            with errors_of("model.patch_encoder_weights"):
                system.denoiser.load_patch_encoder(cfg["model"]["patch_encoder_weights"], system.dcg.local_trunk)
        trainer, best = build_trainer(
            cfg, cfg["name"], cfg["trainer"]["max_epochs"], cfg["trainer"]["val_every"], version_of(ckpt)
        )
        save_config(cfg, trainer)
        trainer.fit(system, datamodule=data, ckpt_path=ckpt)
        best_path = best.best_model_path or str(Path(trainer.log_dir) / "checkpoints" / "last.ckpt")
        trainer.validate(system, datamodule=data, ckpt_path=best_path, verbose=False)
        result = {
            "checkpoint": best_path,
            "val": dict(system.last_metrics),
            "selection": {
                "monitor": selection_metric(cfg),
                "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
            },
        }
        trainer.test(system, datamodule=data, ckpt_path=best_path, verbose=False)
        result["test"] = dict(system.last_metrics)
        write_json(Path(out) if out else Path(trainer.log_dir) / "metrics.json", result)
        return
    load_weights(system, ckpt)
    trainer, _ = build_trainer(cfg, cfg["name"], 1, 1)
    save_config(cfg, trainer)
    if command in ("validate", "test"):
        getattr(trainer, command)(system, datamodule=data, verbose=False)
        split = "val" if command == "validate" else "test"
        write_json(
            Path(out) if out else Path(trainer.log_dir) / "metrics.json",
            {"checkpoint": str(ckpt), split: dict(system.last_metrics)},
        )
    else:
        outputs = trainer.predict(system, datamodule=data)
        write_predictions(
            Path(out) if out else Path(trainer.log_dir) / "predictions.csv", outputs, data.datasets["test"], names
        )


def save_config(cfg: dict, trainer) -> None:
    log_dir = Path(trainer.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    logger.info("run directory: %s", log_dir)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="diffuser_trainer.py",
        description="Train and evaluate DiffMIC-v2.",
        epilog="commands: fit (default), validate, test, predict; overrides look like optim.lr=5e-4",
    )
    parser.add_argument("words", nargs="*", metavar="[command] key.sub=value", help="command, then overrides")
    parser.add_argument("--config", help="YAML config (default: configs/demo.yml)")
    parser.add_argument("--ckpt", help="checkpoint: a path, best or last (fit: resume from it)")
    parser.add_argument("--out", help="where validate/test/fit write metrics JSON, or predict its CSV")
    args = parser.parse_intermixed_args(argv)
    args.command = args.words.pop(0) if args.words and args.words[0] in COMMANDS else "fit"
    bad = [w for w in args.words if "=" not in w]
    if bad:
        parser.error(f"unknown command {bad[0]!r}: use one of {', '.join(COMMANDS)}, then key.sub=value overrides")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.words)
        run(args.command, cfg, args.ckpt, args.out)
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
