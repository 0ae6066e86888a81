"""Does a trained DiffMIC-v2 read its prior? A diagnosis of checkpoints, on the validation split only.

For each seed's DiffMIC-v2 checkpoint (of benchmarks/learning_curves.py or benchmarks/accuracy.py) and the DCG
that guided it:
  - agreement: the share of validation images whose DiffMIC-v2 class is the DCG's (y_fusion's argmax);
  - accuracy and macro F1 of DiffMIC-v2, of its DCG, and of DiffMIC-v2 with the prior maps P shuffled between the
    images of each batch (each image gets another image's prior): if the shuffled accuracy stays where it was, the
    denoiser does not read P; if it falls towards the prior-free level, it does;
  - the prediction's class shares (how often each class is predicted), against the validation labels';
  - the weight of the prior in the first layer: the norm of cc1's 1x1 weights on the C prior channels over the
    norm on the C channels of Y_t, after training and at initialisation (a fresh model of the same seed).

    python -m benchmarks.prior_use --config configs/bench_ham10000.yml --seeds 0 1 2 --epochs 12 \\
        trainer.log_dir=logs/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS_DIR, seed_config
from dataloader.datamodule import build_datasets
from dataloader.transforms import ModelInput
from diffmic.config import ConfigError, load_config, parse_args_with_overrides
from diffmic.durable import write_atomically
from diffmic.evaluation.metrics import classification_metrics
from diffmic.utils import setup_logging
from diffmic.v2.system import DiffMICv2

logger = logging.getLogger("benchmarks.prior_use")


def checkpoint_of(cfg: dict, epochs: int | None) -> Path:
    """The seed's best DiffMIC-v2 checkpoint: of the learning-curve run with `epochs`, else of the accuracy
    benchmark."""
    seed_dir = Path(cfg["trainer"]["log_dir"]) / cfg["name"]
    fitted = seed_dir / f"long_{epochs}" / "diffmic" if epochs else seed_dir
    candidates = sorted(fitted.glob("version_*/checkpoints/best.ckpt"))
    if not candidates:
        raise ConfigError(f"no DiffMIC-v2 best.ckpt under {fitted}: run the benchmark first")
    return candidates[-1]


def prior_ratio(system: DiffMICv2) -> float:
    """||cc1 weights on P|| / ||cc1 weights on Y_t||: the first layer reads concat[P, Y_t]."""
    weight = system.denoiser.cc1.conv.weight.detach()  # (F, 2C, 1, 1)
    c = weight.shape[1] // 2
    return float(weight[:, :c].norm() / weight[:, c:].norm())


@torch.no_grad()
def diagnose(cfg: dict, checkpoint: Path, dataset) -> dict:
    system = DiffMICv2(cfg)
    system.load_checkpoint_file(checkpoint)
    system.eval()
    shuffled = {"on": False}
    original = system.prior

    def prior(guide):  # the same maps, each moved to another image of the batch when shuffled
        p = original(guide)
        return p.roll(1, dims=0) if shuffled["on"] else p

    system.prior = prior
    labels, v2, v2_shuffled, dcg = [], [], [], []
    model_input = ModelInput()  # the loaders' 8-bit images normalised (DiffMICDataModule: on_after_batch_transfer)
    for batch in DataLoader(dataset, batch_size=cfg["data"]["batch_size"], shuffle=False):
        batch = model_input(batch)
        labels.append(batch["label"])
        dcg.append(system.guide(batch["image"]).y_fusion)
        shuffled["on"] = False
        v2.append(system.evaluate_batch(batch)["scores"])
        shuffled["on"] = True
        v2_shuffled.append(system.evaluate_batch(batch)["scores"])
    y = torch.cat(labels).numpy()
    scores = {"diffmic": torch.cat(v2), "diffmic_shuffled_prior": torch.cat(v2_shuffled), "dcg": torch.cat(dcg)}
    names = cfg["data"]["class_names"]
    out = {k: classification_metrics(y, s.numpy(), names) for k, s in scores.items()}
    predicted = {k: s.argmax(1).numpy() for k, s in scores.items()}
    classes = len(names)
    result = {
        "checkpoint": str(checkpoint),
        "images": len(y),
        "agreement_with_dcg": float(np.mean(predicted["diffmic"] == predicted["dcg"])),
        **{f"{k}_{m}": out[k][m] for k in scores for m in ("acc", "f1")},
        "predicted_share": {k: np.bincount(v, minlength=classes).tolist() for k, v in predicted.items()},
        "label_share": np.bincount(y, minlength=classes).tolist(),
        "prior_ratio_trained": prior_ratio(system),
    }
    torch.manual_seed(cfg["seed"])  # the denoiser's initialisation in fit (seeded before the model is built)
    result["prior_ratio_init"] = prior_ratio(DiffMICv2(cfg))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="the learning-curve run's --epochs (default: the accuracy bench)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", help="result file name (default: <config name>_prior_use)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, as given to the benchmark")
    args = parse_args_with_overrides(parser, argv)
    setup_logging()
    try:
        base = load_config(args.config, args.overrides)
        checkpoints = {seed: checkpoint_of(seed_config(base, seed), args.epochs) for seed in args.seeds}
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    rows = []
    for seed, checkpoint in checkpoints.items():
        cfg = seed_config(base, seed)
        rows.append({"seed": seed, **diagnose(cfg, checkpoint, build_datasets(cfg)["val"])})
        logger.info("seed %d: %s", seed, {k: v for k, v in rows[-1].items() if isinstance(v, float)})
    name = args.name or f"{base['name']}_prior_use"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / f"{name}.json", json.dumps({"command": sys.argv, "rows": rows}, indent=2))
    names = base["data"]["class_names"]
    lines = [
        f"# Does DiffMIC-v2 read its prior? {name}",
        "",
        "Validation split. Shuffled prior: each image's prior map P given to another image of its batch. Prior "
        "weight: the norm of cc1's weights on P over those on Y_t.",
        "",
        "| seed | DiffMIC-v2 ACC / F1 | with shuffled priors | DCG ACC / F1 | same class as the DCG | prior weight, "
        "trained (init) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['diffmic_acc']:.3f} / {r['diffmic_f1']:.3f} | {r['diffmic_shuffled_prior_acc']:.3f} "
            f"/ {r['diffmic_shuffled_prior_f1']:.3f} | {r['dcg_acc']:.3f} / {r['dcg_f1']:.3f} | "
            f"{r['agreement_with_dcg']:.3f} | {r['prior_ratio_trained']:.2f} ({r['prior_ratio_init']:.2f}) |"
        )
    lines += ["", "Predicted classes (counts), against the labels:", ""]
    lines += ["| seed | who | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['seed']} | labels | " + " | ".join(map(str, r["label_share"])) + " |")
        for who, counts in r["predicted_share"].items():
            lines.append(f"| {r['seed']} | {who} | " + " | ".join(map(str, counts)) + " |")
    lines += ["", f"Command: `python -m benchmarks.prior_use {' '.join(argv or sys.argv[1:])}`", ""]
    write_atomically(out / f"{name}.md", "\n".join(lines))
    logger.info("wrote %s", out / f"{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
