"""What a sampled image costs with DiffMIC-v2 and with DiffMIC (v1): the paper's claim that v2 is about 3x cheaper
at inference (fewer sampling iterations), measured on one machine in one run.

For each method at its released settings (configs/isic.yml: 10 DDIM steps; configs/isic_v1.yml: 250 ancestral
steps, and configs/aptos_v1.yml's 60), with random weights at 224 px:
  - FLOPs per sampled image (torch.utils.flop_counter, device-independent), as the authors' code runs (v2: the DCG
    and both encoders at every DDIM step; v1: the ResNet-18 encoder at every step) and with the guidance and the
    encoders once per image, as this project samples (outputs identical, tests/test_pipeline.py and
    tests/test_diffmic_v1.py);
  - seconds per sampled image: the median over --repeats of one batch, every variant measured in turn inside each
    repeat, so that the machine's load falls on all of them alike.
Writes benchmarks/results/method_cost_<device>.{json,md}.

    python -m benchmarks.method_cost [--batch-size 2] [--repeats 3] [--device cpu] [--v1-steps 250 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, command_line
from benchmarks.speed import count_flops, machine, sample_once, sample_reencoding, timed
from diffmic.config import PROJECT_ROOT, load_config, parse_args_with_overrides
from diffmic.durable import write_atomically
from diffmic.seeding import start_noise
from diffmic.utils import setup_logging
from diffmic.v1 import DiffMICv1
from diffmic.v1.card import card_sample
from diffmic.v2.system import DiffMICv2

logger = logging.getLogger("benchmarks.method_cost")


class _EveryStep:
    """A v1 denoiser whose `denoise` runs the whole model, image encoder included, as the authors' v1 sampler does
    at every step (its DCG prior is computed once, before the loop)."""

    def __init__(self, step: Callable[..., torch.Tensor]) -> None:
        self.denoise = step


def v1_sampler(system: DiffMICv1, image: torch.Tensor, every_step: bool) -> torch.Tensor:
    if not every_step:
        return system.sample(image, torch.arange(image.shape[0]))
    steps, classes = system.cfg["v1"]["sampling_steps"], system.cfg["data"]["num_classes"]
    noise = start_noise(system.cfg["seed"], torch.arange(image.shape[0]), (steps, 1, classes), normal=True)
    y_hat, _, _ = system.priors(image)

    def step(condition, y_t, prior, t):
        return system.denoiser(image, y_t, prior, t)  # the authors' model(x, y, t, yhat): encoder every step

    return card_sample(
        _EveryStep(step), system.scheduler, image.new_zeros(image.shape[0], 1), y_hat, noise.permute(1, 2, 0, 3)
    ).softmax(-1)


def machine_text(m: dict) -> str:
    return f"{m['device']}, {m['cpu_threads']} threads, Python {m['python']}, torch {m['torch']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--v1-steps", type=int, nargs="+", default=[250, 60], help="v1's ancestral steps to measure")
    parser.add_argument("--v2-config", default=str(PROJECT_ROOT / "configs" / "isic.yml"))
    parser.add_argument("--v1-config", default=str(PROJECT_ROOT / "configs" / "isic_v1.yml"))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("overrides", nargs="*", help="key.sub=value for both configs (smoke tests)")
    args = parse_args_with_overrides(parser, argv)
    setup_logging()
    device = torch.device(args.device)
    torch.manual_seed(0)
    v2 = DiffMICv2(load_config(args.v2_config, args.overrides)).to(device).eval()
    size = v2.cfg["data"]["image_size"]
    index = torch.arange(args.batch_size)  # speed.py's samplers, float32: the same starts as DiffMICv2.sample
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "v2, 10 DDIM steps, encoders once": lambda x: sample_once(v2, {"image": x, "index": index}, "32-true"),
        "v2, 10 DDIM steps, DCG once, encoders every step (authors' code)": lambda x: sample_reencoding(
            v2, {"image": x, "index": index}, "32-true"
        ),
    }
    systems = {}
    for steps in args.v1_steps:
        systems[steps] = DiffMICv1(load_config(args.v1_config, [*args.overrides, f"v1.sampling_steps={steps}"]))
        systems[steps].to(device).eval()
        variants[f"v1, {steps} steps, encoder once"] = lambda x, s=systems[steps]: v1_sampler(s, x, False)
        variants[f"v1, {steps} steps, encoder every step (authors' code)"] = lambda x, s=systems[steps]: v1_sampler(
            s, x, True
        )
    image = torch.randn(args.batch_size, 3, size, size, device=device)
    logger.info("random weights (no pretrained EfficientSAM / ImageNet here): costs do not depend on the weights")
    results = {}
    with torch.no_grad():
        for name, run in variants.items():
            results[name] = {"gflop_per_image": count_flops(lambda r=run: r(image)) / args.batch_size / 1e9}
            logger.info("%s: %.1f GFLOP per image", name, results[name]["gflop_per_image"])
        names = list(variants)  # pairs: encoders once, then every step
        same = {
            names[i]: torch.allclose(variants[names[i]](image), variants[names[i + 1]](image), atol=1e-5)
            for i in range(0, len(names), 2)
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, run in variants.items():
                times[name].append(timed(lambda r=run: r(image), device) / args.batch_size)
            logger.info("repeat %d of %d done", repeat + 1, args.repeats)
    for name in variants:
        results[name]["s_per_image"] = statistics.median(times[name])
        results[name]["s_per_image_all"] = times[name]
    reference = results[list(variants)[0]]
    for entry in results.values():
        entry["gflop_ratio_to_v2"] = entry["gflop_per_image"] / reference["gflop_per_image"]
        entry["time_ratio_to_v2"] = entry["s_per_image"] / reference["s_per_image"]
    report = {
        "command": command_line("benchmarks.method_cost", argv),
        "machine": machine_text(machine(device)),
        "device": device.type,
        "precision": "float32",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "image_size": size,
        "every_step_output_equals_encoders_once": same,
        "variants": results,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / f"method_cost_{device.type}.json", json.dumps(report, indent=2))
    lines = [
        f"# Cost of a sampled image: DiffMIC-v2 vs DiffMIC (v1), {device.type}",
        "",
        f"`{report['command']}` on {report['machine']}; float32, batch {args.batch_size}, {size} px, random weights, "
        f"median of {args.repeats} repeats (all variants in turn in each repeat).",
        "",
        "| variant | GFLOP / image | x v2 | s / image | x v2 |",
        "|---|---|---|---|---|",
    ]
    for name, e in results.items():
        lines.append(
            f"| {name} | {e['gflop_per_image']:.1f} | {e['gflop_ratio_to_v2']:.2f} | {e['s_per_image']:.3f} | "
            f"{e['time_ratio_to_v2']:.2f} |"
        )
    write_atomically(out / f"method_cost_{device.type}.md", "\n".join(lines) + "\n")
    logger.info("wrote %s", out / f"method_cost_{device.type}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
