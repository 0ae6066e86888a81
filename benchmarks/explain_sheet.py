"""Explanations of the first test images of a data set, on one sheet: `predict --explain` on the first N images of
the config's test list (their labels known, so each figure shows the true class's grid where it differs), stacked
into one PNG with a provenance note (checkpoint, its SHA-256, the command) beside it.

    python -m benchmarks.explain_sheet --config configs/bench_ham10000.yml --ckpt path/to/best.ckpt \\
        --count 4 --out docs/explain_ham10000.png [key=value ...]

The evaluation noise of an image depends on the seed and its index only (seeding.start_noise), and the first N rows
of the list keep their indices, so the figures are the ones `predict` on the whole test list would draw for them.
Writes <out> and <out>.md (the same name, .md).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import sys
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image

from benchmarks.common import command_line
from diffmic import api
from diffmic.config import ConfigError, load_config, parse_args_with_overrides
from diffmic.durable import write_atomically
from diffmic.explain.outputs import figure_names
from diffmic.faults import exit_code
from diffmic.utils import setup_logging

logger = logging.getLogger("benchmarks.explain_sheet")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stack(figures: list[Path], out: Path) -> tuple[int, int]:
    """The figures one under another on white, quantised to 256 colours (they are flat-coloured plots); its size."""
    images = [Image.open(p).convert("RGB") for p in figures]
    width = max(i.width for i in images)
    sheet = Image.new("RGB", (width, sum(i.height for i in images)), "white")
    top = 0
    for image in images:
        sheet.paste(image, (0, top))
        top += image.height
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256).save(out, optimize=True)
    return sheet.size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the config the checkpoint was trained with")
    parser.add_argument("--ckpt", required=True, help="a DiffMIC-v2 or v1 checkpoint (best.ckpt)")
    parser.add_argument("--count", type=int, default=4, help="the first N images of the test list")
    parser.add_argument("--out", required=True, help="the sheet's PNG")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parse_args_with_overrides(parser, argv)
    setup_logging()
    try:
        if args.count < 1:
            raise ConfigError(f"--count must be at least 1, got {args.count}")
        cfg = load_config(args.config, args.overrides)
        if cfg["data"]["dataset"] != "list" or cfg["data"]["task"] != "multiclass":
            raise ConfigError(
                "the sheet takes the first images of data.test_list: a multiclass config of data.dataset list"
            )
        ckpt = Path(args.ckpt)
        if not ckpt.is_file():
            raise ConfigError(f"--ckpt {ckpt}: no such file")
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2
    out = Path(args.out)
    class_names = cfg["data"]["class_names"] or [str(c) for c in range(cfg["data"]["num_classes"])]
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "test_first.csv"
        pd.read_csv(cfg["data"]["test_list"]).head(args.count).to_csv(first, index=False)
        figures, predictions = Path(tmp) / "figures", Path(tmp) / "predictions.csv"
        try:
            api.predict(
                args.config,
                overrides=[*args.overrides, f"data.test_list={first}", f"trainer.log_dir={Path(tmp) / 'logs'}"],
                ckpt=ckpt,
                out=predictions,
                explain=figures,
            )
        except Exception as err:  # one line and the command line's exit code (faults.exit_code)
            return exit_code(err, cfg, debug=False)
        rows = list(csv.DictReader(predictions.open()))
        names = figure_names([r["image"] for r in rows])
        size = stack([figures / n for n in names], out)
    command = command_line("benchmarks.explain_sheet", argv)
    lines = [
        f"# {out.name}",
        "",
        f"`predict --explain` figures of the first {args.count} images of `{Path(cfg['data']['test_list']).name}`, "
        f"stacked ({size[0]} x {size[1]} px):",
        "",
        "| image | label | prediction | max_prob |",
        "|---|---|---|---|",
        *[f"| {r['image']} | {class_names[int(r['label'])]} | {r['pred_name']} | {r['max_prob']} |" for r in rows],
        "",
        f"Checkpoint: `{ckpt.name}`, SHA-256 `{sha256(ckpt)[:16]}`, config `{Path(args.config).name}`.",
        "",
        f"Command: `{command}`",
        "",
    ]
    write_atomically(out.with_suffix(".md"), "\n".join(lines))
    logger.info("wrote %s and %s", out, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
