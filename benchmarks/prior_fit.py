"""How well each seed's trained DCG fits its own training images, against the validation split.

DiffMIC-v2 trains its denoiser on the same training images the DCG was pre-trained on (SPEC 2). If the
DCG's prior is (nearly) always right on those images, the denoiser only ever sees a correct prior while
training, and learns to copy it; its focal weight (SPEC 4) is then close to 1 for every image. This
reads the DCG files left by `benchmarks/accuracy.py` and reports, per split: accuracy and AUC of the
fused prior, the mean probability of the true class, the share of images above 0.9 and the mean focal
weight. Training images use the evaluation transform. The test split is not evaluated.

    python -m benchmarks.prior_fit --config configs/bench_breastmnist.yml --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS_DIR, seed_config
from dataloader.datamodule import build_datasets
from dataloader.transforms import ModelInput, build_transform
from diffmic.config import ConfigError, load_config, parse_args_with_overrides
from diffmic.durable import write_atomically
from diffmic.evaluation.metrics import classification_metrics
from diffmic.utils import setup_logging
from diffmic.v2.pipeline import focal_weight, one_hot
from pretraining.dcg import build_dcg
from pretraining.dcg_file import load_dcg

logger = logging.getLogger("benchmarks.prior_fit")


@torch.no_grad()
def prior_fit(cfg: dict, dataset) -> dict[str, float]:
    """Fit of the DCG prior y_fusion on one split (single-label). The focal weight is SPEC 4's, with the
    config's alpha and gamma; wrong_weight_share is the part of the total focal weight that falls on images
    the prior gets wrong."""
    dcg = build_dcg(cfg)
    load_dcg(dcg, cfg, Path(cfg["dcg"]["ckpt"]))
    dcg.eval()
    logits, labels = [], []
    model_input = ModelInput()  # the loaders' 8-bit images normalised (DiffMICDataModule: on_after_batch_transfer)
    for batch in DataLoader(dataset, batch_size=cfg["dcg"]["batch_size"], shuffle=False):
        batch = model_input(batch)
        logits.append(dcg(batch["image"]).y_fusion)
        labels.append(batch["label"])
    y_fusion, y = torch.cat(logits), torch.cat(labels)
    d = cfg["diffusion"]
    p_true = torch.softmax(y_fusion, dim=1).gather(1, y[:, None]).squeeze(1)
    metrics = classification_metrics(y.numpy(), y_fusion.numpy())
    weight = focal_weight(y_fusion, one_hot(y, y_fusion.shape[1]), d["focal_alpha"], d["focal_gamma"])
    wrong = y_fusion.argmax(dim=1) != y
    return {
        "images": len(y),
        "acc": metrics["acc"],
        "auc": metrics["auc"],
        "p_true": float(p_true.mean()),
        "share_p_above_0.9": float((p_true > 0.9).float().mean()),
        "focal_weight": float(weight.mean()),
        "wrong_weight_share": float(weight[wrong].sum() / weight.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the benchmark config the DCGs were trained with")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("overrides", nargs="*", help="key.sub=value, as given to benchmarks/accuracy.py")
    args = parse_args_with_overrides(parser, argv)
    setup_logging()
    try:
        base = load_config(args.config, args.overrides)
        if base["data"]["task"] != "multiclass":
            raise ConfigError("benchmarks/prior_fit.py reads single-label data sets (data.task: multiclass)")
        missing = [
            path for path in (seed_config(base, seed)["dcg"]["ckpt"] for seed in args.seeds) if not Path(path).is_file()
        ]
        if missing:
            raise ConfigError(f"no DCG file {missing[0]}: run benchmarks/accuracy.py with this config first")
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    rows = []
    for seed in args.seeds:
        cfg = seed_config(base, seed)
        datasets = build_datasets(cfg)  # the seed's split, as its DCG was trained on (a carved validation set varies)
        train_images = copy.copy(datasets["train"])
        train_images.transform = build_transform(base, train=False)  # the images as they are, not augmented
        splits = {"train": train_images, "val": datasets["val"]}
        for split, dataset in splits.items():
            rows.append({"seed": seed, "split": split, **prior_fit(cfg, dataset)})
            logger.info(
                "seed %d %s: %s",
                seed,
                split,
                ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float)),
            )
    name = f"{base['data']['flag'] or base['name']}_prior_fit"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / f"{name}.json", json.dumps({"config": args.config, "rows": rows}, indent=2))
    lines = [
        f"# DCG prior fit: {name}",
        "",
        "| seed | split | images | ACC | AUC | mean p(true) | p(true) > 0.9 | "
        "mean focal weight | focal weight on wrong priors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['seed']} | {r['split']} | {r['images']} | {r['acc']:.3f} | {r['auc']:.3f} | {r['p_true']:.3f} | "
        f"{r['share_p_above_0.9']:.3f} | {r['focal_weight']:.2f} | {r['wrong_weight_share']:.3f} |"
        for r in rows
    ]
    for split in splits:
        mean = {
            k: np.mean([r[k] for r in rows if r["split"] == split])
            for k in ("acc", "p_true", "focal_weight", "wrong_weight_share")
        }
        lines.append(
            f"| mean | {split} | | {mean['acc']:.3f} | | {mean['p_true']:.3f} | | {mean['focal_weight']:.2f} | "
            f"{mean['wrong_weight_share']:.3f} |"
        )
    write_atomically(out / f"{name}.md", "\n".join(lines) + "\n")
    logger.info("wrote %s", out / f"{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
