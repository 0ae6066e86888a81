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
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from card import card_sample
from config import PROJECT_ROOT, load_config
from diffmic_v1 import DiffMICv1
from diffmic_v2 import DiffMICv2
from pipeline import ddim_sample, guided_prior_map
from seeding import start_noise
from utils import setup_logging

logger = logging.getLogger("benchmarks.method_cost")


class _EveryStep:
    """A denoiser whose `denoise` re-runs what the authors' samplers run at every step: for v2 the DCG and both
    encoders, for v1 the image encoder (its DCG prior is computed once, before the loop)."""

    def __init__(self, step: Callable[..., torch.Tensor]) -> None:
        self.denoise = step


def v2_sampler(system: DiffMICv2, image: torch.Tensor, every_step: bool) -> torch.Tensor:
    """One DDIM sample per image (diffusion.eval_samples = 1, the paper) from the same start as `sample`."""
    if not every_step:
        return system.sample(image, torch.arange(image.shape[0]))
    d, grid, classes = system.cfg["diffusion"], system.denoiser.grid_size, system.cfg["data"]["num_classes"]
    start = start_noise(system.cfg["seed"], torch.arange(image.shape[0]), (2, 1, classes)).permute(1, 2, 0, 3)
    guide = system.dcg(image)
    prior = system.prior(guide)
    y_start = guided_prior_map(start[0].flatten(0, 1), start[1].flatten(0, 1), grid)

    def step(condition, y_in, t):
        again = system.dcg(image)  # the authors' loop: guidance and encoders inside the step
        return system.denoiser(image, again.patches, torch.cat([system.prior(again), y_in[:, classes:]], 1), t)

    grids = ddim_sample(
        _EveryStep(step),
        system.scheduler,
        image.new_zeros(image.shape[0], 1),
        prior,
        y_start.view(1, *y_start.shape),
        d["sampling_steps"],
    )
    return grids.mean(dim=0)


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


def flops_per_image(run: Callable[[], torch.Tensor], batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / batch


def machine(device: torch.device) -> str:
    """The CPU model (from /proc/cpuinfo where there is one) or the GPU, the threads and the versions."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return f"{name}, {torch.get_num_threads()} threads, Python {platform.python_version()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--v1-steps", type=int, nargs="+", default=[250, 60], help="v1's ancestral steps to measure")
    parser.add_argument("--v2-config", default=str(PROJECT_ROOT / "configs" / "isic.yml"))
    parser.add_argument("--v1-config", default=str(PROJECT_ROOT / "configs" / "isic_v1.yml"))
    parser.add_argument("--out-dir", default=str(PROJECT_ROOT / "benchmarks" / "results"))
    parser.add_argument("overrides", nargs="*", help="key.sub=value for both configs (smoke tests)")
    args = parser.parse_args(argv)
    setup_logging()
    device = torch.device(args.device)
    torch.manual_seed(0)
    v2 = DiffMICv2(load_config(args.v2_config, args.overrides)).to(device).eval()
    size = v2.cfg["data"]["image_size"]
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "v2, 10 DDIM steps, encoders once": lambda x: v2_sampler(v2, x, False),
        "v2, 10 DDIM steps, DCG and encoders every step (authors' code)": lambda x: v2_sampler(v2, x, True),
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
            results[name] = {"gflop_per_image": flops_per_image(lambda r=run: r(image), args.batch_size) / 1e9}
            logger.info("%s: %.1f GFLOP per image", name, results[name]["gflop_per_image"])
        names = list(variants)  # pairs: encoders once, then every step
        same = {
            names[i]: torch.allclose(variants[names[i]](image), variants[names[i + 1]](image), atol=1e-5)
            for i in range(0, len(names), 2)
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, run in variants.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                run(image)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - start) / args.batch_size)
            logger.info("repeat %d of %d done", repeat + 1, args.repeats)
    for name in variants:
        results[name]["s_per_image"] = statistics.median(times[name])
        results[name]["s_per_image_all"] = times[name]
    reference = results[list(variants)[0]]
    for entry in results.values():
        entry["gflop_ratio_to_v2"] = entry["gflop_per_image"] / reference["gflop_per_image"]
        entry["time_ratio_to_v2"] = entry["s_per_image"] / reference["s_per_image"]
    report = {
        "command": "python -m benchmarks.method_cost " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": machine(device),
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
    (out / f"method_cost_{device.type}.json").write_text(json.dumps(report, indent=2))
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
    (out / f"method_cost_{device.type}.md").write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", out / f"method_cost_{device.type}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
