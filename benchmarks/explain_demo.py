"""Do the explanations point at the evidence? The pointing game on the demo's synthetic test split, whose images
know where their class evidence is (the class texture, placed at random next to a distractor blob).

For a trained demo DCG and for randomly initialised ones (the chance level of a DCG that learnt nothing), per test
image: does the CAM cell where the saliency map of the predicted class peaks hold the texture's centre (the DCG's
saliency has one value per 32 x 32 pixel cell, so this is the pointing game at the resolution it has)? Does at
least one of the K ROI boxes hold it, and does the ROI with the largest gated-attention weight? The same questions
for the distractor's centre say whether the guidance is drawn to the wrong object. A uniformly random choice of
cells hits with probability 1 / cells (saliency, top ROI) and K / cells (any ROI), reported beside them.

    python -m benchmarks.explain_demo                                  # configs/demo.yml, its DCG (trained if missing)
    python -m benchmarks.explain_demo --name explain_demo_128 name=demo_128 data.image_size=128   # a 4 x 4 CAM

The trained DCG is the config's DCG file (dcg.ckpt, or <log_dir>/<name>/dcg.pt, as `fit` writes it); when it does
not exist it is pre-trained first, as `python pretraining/train_dcg.py --config configs/demo.yml` would. Writes
benchmarks/results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS_DIR
from dataloader.datamodule import build_datasets
from dataloader.transforms import ModelInput
from diffmic.config import PROJECT_ROOT, ConfigError, check_paths, dcg_ckpt_path, load_config, parse_args_with_overrides
from diffmic.durable import write_atomically
from diffmic.explain.explanation import box_centres, pointing_hits, roi_boxes
from diffmic.utils import setup_logging
from pretraining.dcg import DCG, build_dcg, roi_score
from pretraining.dcg_file import load_dcg
from pretraining.train_dcg import pretrain_dcg

logger = logging.getLogger("benchmarks.explain_demo")
QUESTIONS = ("saliency", "roi_any", "roi_top")


@torch.no_grad()
def pointing_game(dcg: DCG, dataset, batch_size: int) -> dict[str, float]:
    """Hit rates of one DCG on a synthetic split: for the texture and the distractor, each of QUESTIONS (the
    saliency map of the predicted class; `saliency_true`: of the true class), and the DCG's accuracy."""
    dcg.eval()
    hits: dict[str, list[torch.Tensor]] = {}
    correct = []
    model_input = ModelInput()  # the loaders' 8-bit images normalised (DiffMICDataModule: on_after_batch_transfer)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = model_input(batch)
        out = dcg(batch["image"])
        index, label = batch["index"], batch["label"]
        predicted = out.y_fusion.argmax(dim=1)
        boxes = roi_boxes(out.corners, dcg.roi_size)
        size = tuple(batch["image"].shape[-2:])
        for target in ("texture", "distractor"):
            evidence = torch.as_tensor(getattr(dataset, f"{target}_boxes")[index.numpy()])
            for classes, suffix in ((predicted, ""), (label, "_true")):
                found = pointing_hits(out.saliency, boxes, out.attention, classes, evidence, size)
                for question in QUESTIONS if not suffix else ("saliency",):
                    hits.setdefault(f"{target}/{question}{suffix}", []).append(found[question])
        # why ROIs can miss the texture: the class maps are min-max normalised before they are summed, so a cell
        # that is the minimum of every other class's map (evidence against them) can score lowest of all
        score = roi_score(out.saliency).flatten(1)  # (B, h * w)
        h, w = out.saliency.shape[-2:]
        centre = box_centres(torch.as_tensor(dataset.texture_boxes[index.numpy()]))
        cell = (centre[:, 0] // (size[0] / h)).long() * w + (centre[:, 1] // (size[1] / w)).long()
        hits.setdefault("texture/lowest_roi_score", []).append(score.argmin(dim=1) == cell)
        correct.append(predicted == label)
    result = {key: float(torch.cat(parts).double().mean()) for key, parts in hits.items()}
    result["acc"] = float(torch.cat(correct).double().mean())
    return result


def trained_dcg(cfg: dict, datasets: dict) -> tuple[DCG, Path, bool]:
    """The config's DCG file, pre-trained first when it does not exist; (DCG, path, whether it was trained now)."""
    path = dcg_ckpt_path(cfg)
    made = not path.is_file()
    if made:
        logger.info("no DCG file at %s: pre-training the demo DCG (%d epochs)", path, cfg["dcg"]["epochs"])
        pretrain_dcg(cfg, datasets)
    dcg = build_dcg(cfg)
    load_dcg(dcg, cfg, path, datasets["train"])  # refused unless it was trained from this config's training split
    return dcg, path, made


def random_dcgs(cfg: dict, count: int) -> list[DCG]:
    """`count` randomly initialised DCGs (seeds seed, seed + 1, ...): what the guidance points at before learning."""
    dcgs = []
    for k in range(count):
        torch.manual_seed(cfg["seed"] + k)
        dcgs.append(build_dcg(cfg))
    return dcgs


def report(cfg: dict, trained: dict, random: list[dict], meta: dict) -> str:
    """The markdown report."""
    cam = cfg["data"]["image_size"] // 32
    cells, k = cam * cam, cfg["dcg"]["num_rois"]
    chance = {"saliency": 1 / cells, "roi_any": k / cells, "roi_top": 1 / cells}
    rand = {key: (np.mean([r[key] for r in random]), np.std([r[key] for r in random])) for key in trained}

    made = ", pre-trained by this run" if meta["trained_now"] else ""

    def row(name: str, value) -> str:
        return f"| {name} | " + " | ".join(value(q) for q in QUESTIONS) + " |"

    lines = [
        f"# Pointing game on the demo's test split: {meta['name']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['images']} test images of {cfg['data']['image_size']} px, a {cam} x {cam} CAM (32 px cells), "
        f"K = {k} ROIs of {cfg['dcg']['roi_size']} px, a texture of {cfg['data']['synthetic']['pattern_size']} px. "
        f"Trained DCG: `{meta['dcg_file']}` ({cfg['dcg']['epochs']} epochs{made}), test accuracy "
        f"{trained['acc']:.3f}. Random init: {len(random)} DCGs (seeds {cfg['seed']}.."
        f"{cfg['seed'] + len(random) - 1}), mean ± standard deviation, accuracy {rand['acc'][0]:.3f}.",
        "",
        "Share of test images whose class texture's centre lies in the CAM cell where the saliency of the predicted "
        "class peaks, in at least one ROI box, and in the ROI of the largest attention weight:",
        "",
        "| DCG | saliency maximum | any ROI box | top-attention ROI |",
        "|---|---|---|---|",
        row("trained", lambda q: f"{trained[f'texture/{q}']:.3f}"),
        row("random init", lambda q: f"{rand[f'texture/{q}'][0]:.3f} ± {rand[f'texture/{q}'][1]:.3f}"),
        row("uniformly random cells (exact)", lambda q: f"{chance[q]:.3f}"),
        "",
        "The same for the distractor blob's centre (lower is better: the guidance is not drawn to the wrong object):",
        "",
        "| DCG | saliency maximum | any ROI box | top-attention ROI |",
        "|---|---|---|---|",
        row("trained", lambda q: f"{trained[f'distractor/{q}']:.3f}"),
        row("random init", lambda q: f"{rand[f'distractor/{q}'][0]:.3f} ± {rand[f'distractor/{q}'][1]:.3f}"),
        "",
        "With the saliency of the true class instead of the predicted one: trained "
        f"{trained['texture/saliency_true']:.3f}, random init {rand['texture/saliency_true'][0]:.3f} ± "
        f"{rand['texture/saliency_true'][1]:.3f}.",
        "",
        "The ROI proposal ranks the cells by the sum of the min-max normalised class maps (SPEC 2). The cell holding "
        f"the texture's centre is the lowest-ranked one for {trained['texture/lowest_roi_score']:.3f} of the images "
        f"with the trained DCG ({rand['texture/lowest_roi_score'][0]:.3f} ± {rand['texture/lowest_roi_score'][1]:.3f} "
        f"random init; {1 / cells:.3f} for a random cell).",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "demo.yml"), help="a synthetic config")
    parser.add_argument("--random-inits", type=int, default=5, help="randomly initialised DCGs for the chance level")
    parser.add_argument("--name", default="explain_demo", help="the report's file name, without suffix")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parse_args_with_overrides(parser, argv)
    setup_logging()
    start = time.time()
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg["data"]["dataset"] != "synthetic":
            raise ConfigError("benchmarks/explain_demo.py needs the demo's synthetic set (data.dataset: synthetic)")
        if args.random_inits < 1:
            raise ConfigError(f"--random-inits {args.random_inits}: give at least 1")
        check_paths(cfg, need_dcg=False)
        datasets = build_datasets(cfg)
        dcg, path, made = trained_dcg(cfg, datasets)
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    test, batch = datasets["test"], cfg["dcg"]["batch_size"]
    trained = pointing_game(dcg, test, batch)
    random = [pointing_game(d, test, batch) for d in random_dcgs(cfg, args.random_inits)]
    words = sys.argv[1:] if argv is None else list(argv)
    meta = {
        "name": args.name,
        "command": " ".join(["python -m benchmarks.explain_demo", *words]),
        "images": len(test),
        "dcg_file": str(path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path),
        "trained_now": made,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "seconds": time.time() - start,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(
        out / f"{args.name}.json", json.dumps({"meta": meta, "trained": trained, "random": random}, indent=2)
    )
    write_atomically(out / f"{args.name}.md", report(cfg, trained, random, meta))
    logger.info("wrote %s and %s", out / f"{args.name}.md", out / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
