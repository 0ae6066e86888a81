"""Speed benchmark: what a training image and a sampled image cost, on the device it runs on.

For each config (by default the paper's settings, configs/isic.yml, the BreastMNIST bench and the demo), from
random weights:
  FLOPs per image (torch.utils.flop_counter, device- and precision-independent): a training step (forward and
  backward) and its parts (DCG, encoders, body); a sampled image with the DCG and encoders once (this project) and
  with the encoders re-run at every DDIM step (the authors' code: their DCG runs once per batch), for the config's
  steps and for S = diffusion.eval_samples;
  images per second, medians over repeats measured side by side in one run, per precision: training model-only
  (tensors on the device: forward, backward, Adam) and end to end (Lightning's fit on the real DataModule, real
  images, loader included), the data loader alone, sampling with the encoders once and re-run; peak memory;
  a profile of one training step and one sampled batch (top operators and modules by time) and the fraction of
  the device's dense-matmul rate that each reaches.
Writes <out>/speed_<device>.md and .json with the command, machine, versions and precisions.

    python -m benchmarks.speed [--config configs/isic.yml ...] [--device cpu|cuda] [--precision 32-true bf16-mixed]
                               [--batch-size 4] [--repeats 3] [--steps 10] [--out benchmarks/results] [--profile]
    python -m benchmarks.speed --data-path [--count 256] [--images DIR]  # the training data path alone (data_path.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.utilities import move_data_to_device
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import data_path
from benchmarks.common import RESULTS_DIR, command_line, cpu_name
from dataloader.datamodule import DiffMICDataModule, build_datasets
from diffmic.config import PROJECT_ROOT, ConfigError, load_config, parse_args_with_overrides
from diffmic.durable import write_atomically
from diffmic.precision import apply_float32_policy
from diffmic.seeding import start_noise
from diffmic.utils import adam, setup_logging
from diffmic.v2.pipeline import guided_prior_map
from diffmic.v2.system import DiffMICv2

logger = logging.getLogger("benchmarks.speed")
DEFAULT_CONFIGS = ("configs/isic.yml", "configs/bench_breastmnist.yml", "configs/demo.yml")
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
HAM_ZIP = SHARED_DATA / "ham10000_200x150" / "images.zip"
HAM_TRAIN = SHARED_DATA / "diffmic_splits" / "isic2018_train.csv"
TIMED = ("train_model", "sample_once", "sample_reencode")
LOADER_BATCHES = 32  # batches the data loader alone is timed over (for list data sets made from HAM10000)


# ---------------------------------------------------------------------------------------------- the measured work


def precision_context(precision: str, device: torch.device):
    """The autocast Lightning's Trainer puts around every training, validation, test and predict step."""
    if precision in ("32-true", "32"):
        return nullcontext()
    if precision in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(precision, device.type).forward_context()
    raise ConfigError(f"--precision: 32-true, bf16-mixed or 16-mixed, got {precision!r}")


def synthetic_batch(cfg: dict, batch_size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of normalised-image-like tensors and labels on the device (the model-only measurements)."""
    g = torch.Generator().manual_seed(seed)
    size, classes = cfg["data"]["image_size"], cfg["data"]["num_classes"]
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=g).to(device),
        "label": torch.randint(0, classes, (batch_size,), generator=g).to(device),
        "index": torch.arange(batch_size).to(device),
    }


def build_system(cfg: dict, device: torch.device) -> DiffMICv2:
    """DiffMIC-v2 of a config from random weights (seeded), on the device."""
    torch.manual_seed(cfg["seed"])
    return DiffMICv2(cfg).to(device)


def train_step(system: DiffMICv2, optimizer: torch.optim.Optimizer, batch: dict, precision: str) -> torch.Tensor:
    """One optimisation step as Lightning runs it: the loss under the precision's autocast, backward, Adam."""
    optimizer.zero_grad(set_to_none=True)
    with precision_context(precision, batch["image"].device):
        loss = system.training_loss(batch)
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def sample_once(system: DiffMICv2, batch: dict, precision: str) -> torch.Tensor:
    """This project's sampler (DiffMICv2.sample): the DCG and both encoders once per image. (B, C, K, K)."""
    with precision_context(precision, batch["image"].device):
        return system.sample(batch["image"], batch["index"])


@torch.no_grad()
def sample_reencoding(system: DiffMICv2, batch: dict, precision: str) -> torch.Tensor:
    """The authors' sampler (their validation_step and SR3Sampler.sample_high_res): the DCG and the prior map once
    per batch, both encoders again at every DDIM step (their denoiser's forward encodes the image and the ROI
    patches), and the S samples one after another; the same starts as `DiffMICv2.sample`, so the same grids.
    (B, C, K, K)."""
    image, d = batch["image"], system.cfg["diffusion"]
    grid, classes = system.denoiser.grid_size, system.cfg["data"]["num_classes"]
    noise = start_noise(system.cfg["seed"], batch["index"], (2, d["eval_samples"], classes)).to(image.device)
    scheduler = system.scheduler
    grids = []
    with precision_context(precision, image.device), system.denoiser.reuse_pointwise_weights():  # as .sample
        guide = system.guide(image)
        prior = system.prior(guide)
        for s in range(d["eval_samples"]):
            y_t = guided_prior_map(noise[:, 0, s], noise[:, 1, s], grid).to(prior)
            scheduler.set_timesteps(d["sampling_steps"])
            for t in scheduler.timesteps.tolist():
                t_cells = torch.full((image.shape[0], grid, grid), t, device=image.device, dtype=torch.long)
                eps_hat = system.denoiser(image, guide.patches, torch.cat([prior, y_t], dim=1), t_cells)
                y_t = scheduler.step(eps_hat, t, y_t)
            grids.append(y_t)
    return torch.stack(grids).mean(dim=0)


# ---------------------------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products and convolutions `fn` runs (forward and backward), as torch counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flop_report(system: DiffMICv2, batch: dict, steps: int) -> dict:
    """FLOPs per image of a training step, its parts, and sampling with the encoders once and re-run per step,
    for S = 1 and S = diffusion.eval_samples. `identity_holds`: a sampled image costs exactly the DCG and the
    encoders once plus steps x S body passes."""
    d, n = system.cfg["diffusion"], batch["image"].shape[0]
    image, grid = batch["image"], system.denoiser.grid_size
    keep = (d["sampling_steps"], d["eval_samples"])
    out: dict[str, float | int | bool] = {}

    system.train()
    out["train_step"] = count_flops(lambda: system.training_loss(batch).backward())
    guide = system.guide(image)
    out["train_dcg"] = count_flops(lambda: system.guide(image))
    out["train_encoders"] = count_flops(lambda: system.denoiser.encode(image, guide.patches).sum().backward())
    x_w = system.denoiser.encode(image, guide.patches).detach().requires_grad_(True)
    y_in = torch.cat([system.prior(guide), torch.randn_like(system.prior(guide))], dim=1)
    t_cells = torch.randint(0, d["timesteps"], (n, grid, grid), device=image.device)
    out["train_body"] = count_flops(lambda: system.denoiser.denoise(x_w, y_in, t_cells).sum().backward())
    system.zero_grad(set_to_none=True)

    system.eval()
    with torch.no_grad():
        out["dcg"] = count_flops(lambda: system.guide(image))
        out["encoders"] = count_flops(lambda: system.denoiser.encode(image, guide.patches))
        out["body_step"] = count_flops(lambda: system.denoiser.denoise(x_w, y_in, t_cells))
    samples = sorted({1, keep[1]})
    d["sampling_steps"] = steps
    identity = True
    for s in samples:
        d["eval_samples"] = s
        once = count_flops(lambda: sample_once(system, batch, "32-true"))
        again = count_flops(lambda: sample_reencoding(system, batch, "32-true"))
        out[f"sample_once_steps{steps}_S{s}"] = once
        out[f"sample_reencode_steps{steps}_S{s}"] = again
        identity &= once == out["dcg"] + out["encoders"] + steps * s * out["body_step"]
        out[f"reencode_over_once_steps{steps}_S{s}"] = again / once
    d["sampling_steps"], d["eval_samples"] = keep
    out = {k: (v / n if isinstance(v, int) else v) for k, v in out.items()}  # per image
    out["identity_holds"] = bool(identity)
    out["train_parts_sum"] = out["train_dcg"] + out["train_encoders"] + out["train_body"]
    return out


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak allocated since the last reset; CPU: the process's peak resident set so far (monotone)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_timings(
    system: DiffMICv2, batch: dict, precisions: list[str], repeats: int, device: torch.device
) -> dict[str, dict]:
    """Seconds per batch of each (precision, mode), interleaved: every repeat runs every one once, after one
    warm-up each; medians. The optimiser state persists across steps, as in training."""
    optimizer = adam(system.denoiser.parameters(), lr=1e-9)  # the project's Adam (fused), a tiny lr: same weights
    system.cfg["diffusion"]["eval_samples"] = 1
    work = {
        "train_model": lambda p: (system.train(), train_step(system, optimizer, batch, p)),
        "sample_once": lambda p: (system.eval(), sample_once(system, batch, p)),
        "sample_reencode": lambda p: (system.eval(), sample_reencoding(system, batch, p)),
    }
    times: dict[str, dict[str, list[float]]] = {p: {m: [] for m in work} for p in precisions}
    memory: dict[str, dict[str, float]] = {p: {} for p in precisions}
    for p in precisions:  # warm-up, and the peak memory of each
        for mode, fn in work.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fn(p)
            memory[p][mode] = peak_memory_mb(device)
    for r in range(repeats):
        for p in precisions:
            for mode, fn in work.items():
                times[p][mode].append(timed(lambda fn=fn, p=p: fn(p), device))
        logger.info(
            "repeat %d/%d: %s", r + 1, repeats, {p: {m: round(v[-1], 3) for m, v in times[p].items()} for p in times}
        )
    n = batch["image"].shape[0]
    return {
        p: {
            m: {
                "s_per_batch": statistics.median(v),
                "images_per_s": n / statistics.median(v),
                "all_s": v,
                "peak_memory_mb": memory[p][m],
            }
            for m, v in times[p].items()
        }
        for p in precisions
    }


class BatchClock(pl.Callback):
    """Wall time between consecutive training batch ends: the whole cost of a batch, data loading included."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.ends.append(time.perf_counter())


def real_data_config(cfg: dict, images: int, folder: Path) -> dict:
    """The config with its data: as it is for the demo and MedMNIST sets; for list data sets whose images are
    not on this machine, the first `images` HAM10000 training images of DiffMIC's ISIC split from the project's
    shared data (200 x 150 JPEGs: smaller files than the ISIC originals, so decoding is cheaper)."""
    cfg = copy.deepcopy(cfg)
    data = cfg["data"]
    if data["dataset"] != "list" or (data["root"] and Path(data["root"]).is_dir()):
        return cfg
    if not HAM_ZIP.is_file():
        raise ConfigError(f"{data['root']} does not exist and neither does {HAM_ZIP}: give data.root and the lists")
    split = pd.read_csv(HAM_TRAIN)  # every class (the data layer checks data.num_classes against the labels)
    rows = split.groupby("label", group_keys=False).head(-(-images // split["label"].nunique())).head(max(images, 7))
    with zipfile.ZipFile(HAM_ZIP) as archive:
        for name in rows["image_id"]:
            archive.extract(f"images/{name}.jpg", folder)
    rows[["image_id", "label"]].to_csv(folder / "train.csv", index=False)
    data.update(
        root=str(folder / "images"),
        train_list=str(folder / "train.csv"),
        val_list=str(folder / "train.csv"),
        test_list=str(folder / "train.csv"),
        verify_images="off",
    )
    return cfg


def end_to_end(
    cfg: dict, precisions: list[str], batch_size: int, batches: int, device: torch.device, datasets: dict
) -> dict[str, dict]:
    """Lightning's fit on the real DataModule: images per second from the median batch-to-batch time after the
    first batch (workers starting, first-call costs); and the data loader alone, over every batch of the data
    from the loader's start: batch-to-batch gaps would time the queue of batches the workers prefetched, not
    their decoding and augmentation. The loader's batches are moved to the device and finished there as in a fit
    (the rotation and the normalisation: DiffMICDataModule.on_after_batch_transfer)."""
    out: dict[str, dict] = {}
    data = DiffMICDataModule(cfg, batch_size=batch_size, datasets=datasets)
    images, start = 0, time.perf_counter()
    for batch in data.train_dataloader():
        batch = data.on_after_batch_transfer(move_data_to_device(batch, device), 0)
        images += batch["image"].shape[0]
    sync(device)
    seconds = time.perf_counter() - start
    out["loader"] = {"images_per_s": images / seconds, "images": images, "workers": data.num_workers}
    for p in precisions:
        system, clock = build_system(cfg, device), BatchClock()
        trainer = pl.Trainer(
            accelerator=device.type if device.type != "cuda" else "gpu",
            devices=1,
            precision=p,
            max_epochs=1,
            limit_train_batches=batches,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[clock],
        )
        trainer.fit(system, datamodule=DiffMICDataModule(cfg, batch_size=batch_size, datasets=datasets))
        gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
        out[p] = {"s_per_batch": statistics.median(gaps), "images_per_s": batch_size / statistics.median(gaps)}
    return out


# ---------------------------------------------------------------------------------------------- profile and peak


MODULES = (
    "dcg",
    "denoiser.image_encoder",
    "denoiser.image_proj",
    "denoiser.patch_encoder",
    "denoiser.cc1",
    "denoiser.cc2",
    "denoiser.cc3",
    "denoiser.out",
)


@contextmanager
def module_ranges(system: DiffMICv2) -> Iterator[None]:
    """Name the forward pass of each module of MODULES in the profiler's trace (record_function ranges)."""
    handles, open_ranges = [], {}
    for name in MODULES:
        module = system.get_submodule(name)

        def enter(mod, args, name=name):
            open_ranges[name] = torch.profiler.record_function(f"module::{name}")
            open_ranges[name].__enter__()

        def leave(mod, args, output, name=name):
            open_ranges.pop(name).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profile(fn: Callable[[], object], system: DiffMICv2, device: torch.device, top: int = 10) -> dict:
    """Top operators (self time) and modules (forward time, with what they call) of one call of `fn`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with module_ranges(system), torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    self_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    ops = [e for e in events if not e.key.startswith("module::")]
    total = sum(getattr(e, self_key) for e in ops) or 1.0
    rows = sorted(ops, key=lambda e: getattr(e, self_key), reverse=True)[:top]
    modules = sorted((e for e in events if e.key.startswith("module::")), key=lambda e: -getattr(e, total_key))
    return {
        "total_ms": total / 1000,
        "operators": [
            {
                "name": e.key,
                "self_ms": getattr(e, self_key) / 1000,
                "share": getattr(e, self_key) / total,
                "calls": e.count,
            }
            for e in rows
        ],
        "modules_forward": [
            {"name": e.key.removeprefix("module::"), "ms": getattr(e, total_key) / 1000, "calls": e.count}
            for e in modules
        ],
    }


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """The device's dense matrix-product rate in FLOP/s for `dtype` (best of 5): the reference for the fraction of
    peak that the model reaches (a measured peak, not the vendor's figure)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(5))
    return 2 * size**3 / best


# ---------------------------------------------------------------------------------------------- one config


def benchmark_config(args: argparse.Namespace, path: str, device: torch.device) -> dict:
    cfg = load_config(path, args.overrides)
    cfg["trainer"]["precision"] = "32-true"
    batch_size = args.batch_size or cfg["data"]["batch_size"]
    steps = args.steps or cfg["diffusion"]["sampling_steps"]
    cfg["diffusion"]["sampling_steps"] = steps
    if args.workers is not None:
        cfg["data"]["num_workers"] = args.workers
    name = Path(path).stem
    # the float32 policy a run of this config applies (its Trainer does), also for the model-only timings
    apply_float32_policy(cfg["trainer"]["float32_matmul_precision"])
    logger.info(
        "=== %s: batch %d, %d DDIM steps, %s on %s, float32 policy %s ===",
        name,
        batch_size,
        steps,
        args.precision,
        device,
        cfg["trainer"]["float32_matmul_precision"],
    )
    system = build_system(cfg, device)
    batch = synthetic_batch(cfg, batch_size, device)
    result: dict = {
        "config": path,
        "settings": {
            "image_size": cfg["data"]["image_size"],
            "image_encoder": cfg["model"]["image_encoder"],
            "feature_dim": cfg["model"]["feature_dim"],
            "K": cfg["dcg"]["num_rois"],
            "sampling_steps": steps,
            "eval_samples": cfg["diffusion"]["eval_samples"],
            "batch_size": batch_size,
            "config_batch_size": cfg["data"]["batch_size"],
            "num_workers": cfg["data"]["num_workers"],
        },
    }
    flop_batch = {k: v[: min(2, batch_size)] for k, v in batch.items()}
    result["flops_per_image"] = flop_report(system, flop_batch, steps)
    logger.info("FLOPs per image: %s", {k: v for k, v in result["flops_per_image"].items()})

    # the identity of the two samplers, bit for bit, in float32 (S = 1)
    system.eval()
    system.cfg["diffusion"]["eval_samples"] = 1
    once, again = sample_once(system, batch, "32-true"), sample_reencoding(system, batch, "32-true")
    result["samplers_identical"] = bool(torch.equal(once, again))
    result["bf16_argmax_agrees"] = None
    if "bf16-mixed" in args.precision:
        low = sample_once(system, batch, "bf16-mixed")
        result["bf16_argmax_agrees"] = float((low.mean((2, 3)).argmax(1) == once.mean((2, 3)).argmax(1)).float().mean())
        result["bf16_scores_dtype"] = str(low.dtype)

    # the matmul rate is probed before and after the timings and the higher kept: one probe on a shared machine
    # read 151 GFLOP/s where others read 198, and the model then reached 117 % of it
    dtypes = {p: torch.bfloat16 if "bf16" in p else torch.float32 for p in args.precision}
    peaks = {p: matmul_peak(device, dtypes[p], args.matmul_size) for p in args.precision}
    result["model"] = model_timings(system, batch, args.precision, args.repeats, device)
    if not args.no_end_to_end:
        with tempfile.TemporaryDirectory(prefix="speed_") as folder:
            # enough batches that the loader's rate is not its workers' first prefetched ones
            real = real_data_config(cfg, batch_size * max(args.repeats + 3, LOADER_BATCHES), Path(folder))
            datasets = build_datasets(real)
            result["end_to_end"] = end_to_end(real, args.precision, batch_size, args.repeats + 2, device, datasets)
    if args.profile:
        optimizer = adam(system.denoiser.parameters(), lr=1e-9)
        result["profile"] = {}
        for p in args.precision:
            system.train()
            train = profile(lambda p=p: train_step(system, optimizer, batch, p), system, device)
            system.eval()
            sample = profile(lambda p=p: sample_once(system, batch, p), system, device)
            result["profile"][p] = {"train_step": train, "sample_once": sample}
    result["ratios"] = ratios(result, args.precision)
    peaks = {p: max(peaks[p], matmul_peak(device, dtypes[p], args.matmul_size)) for p in args.precision}
    flops = result["flops_per_image"]
    result["peak_fraction"] = {
        p: {
            "matmul_peak_gflops": peaks[p] / 1e9,
            "train_model": flops["train_step"] * result["model"][p]["train_model"]["images_per_s"] / peaks[p],
            "sample_once": flops[f"sample_once_steps{steps}_S1"]
            * result["model"][p]["sample_once"]["images_per_s"]
            / peaks[p],
        }
        for p in args.precision
    }
    return result


def ratios(result: dict, precisions: list[str]) -> dict:
    """The ratios the issue asks for: re-encoding / encoders once (time), model-only / end to end, bf16 / fp32."""
    model, out = result["model"], {}
    for p in precisions:
        out[f"reencoding_over_encoders_once_time_{p}"] = (
            model[p]["sample_reencode"]["s_per_batch"] / model[p]["sample_once"]["s_per_batch"]
        )
        if "end_to_end" in result:
            out[f"model_only_over_end_to_end_{p}"] = (
                model[p]["train_model"]["images_per_s"] / result["end_to_end"][p]["images_per_s"]
            )
    steps = result["settings"]["sampling_steps"]
    out["reencoding_over_encoders_once_flops"] = result["flops_per_image"][f"reencode_over_once_steps{steps}_S1"]
    base = "32-true"
    for p in precisions:
        if p == base or base not in precisions:
            continue
        for mode in TIMED:
            out[f"{p}_speedup_{mode}"] = model[base][mode]["s_per_batch"] / model[p][mode]["s_per_batch"]
        if "end_to_end" in result:
            out[f"{p}_speedup_train_end_to_end"] = (
                result["end_to_end"][p]["images_per_s"] / result["end_to_end"][base]["images_per_s"]
            )
    return out


# ---------------------------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    cpu = cpu_name()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": pl.__version__,
    }


def gflop(x: float) -> str:
    return f"{x / 1e9:.2f}"


def loader_text(loader: dict) -> str:
    """The loader's rate; reports written before it was timed from the loader's start timed the median gap between
    its first 5 batches, which with workers is the queue they had prefetched, not their rate."""
    text = f"Data loader alone: {loader['images_per_s']:.1f} images/s ({loader['workers']} workers"
    if "images" in loader:
        return text + f", {loader['images']} images from its start)."
    if loader["workers"]:
        return text + "; timed between prefetched batches: an overestimate, superseded by timing from its start)."
    return text + ")."


def write_report(out_dir: Path, device: torch.device, report: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"speed_{device.type}"
    write_atomically(stem.with_suffix(".json"), json.dumps(report, indent=2))
    lines = [
        f"# Speed benchmark on {device.type}",
        "",
        "One section a measurement (config, batch, machine), the newest last. Random weights; times are medians over "
        "the repeats, every mode and precision run side by side in each; ratios are taken within one measurement.",
        "",
    ]
    for name, r in report["configs"].items():
        s, f, m = r["settings"], r["flops_per_image"], r["machine"]
        steps = s["sampling_steps"]
        lines += [
            f"## {name} ({r['config']})",
            "",
            f"Command: `{r['command']}`",
            "",
            f"Machine: {m['device'] if m['device'] == m['cpu'] else m['device'] + ', CPU ' + m['cpu']}, "
            f"{m['cpu_threads']} torch threads; Python {m['python']}, "
            f"torch {m['torch']}, torchvision {m['torchvision']}, Lightning {m['lightning']}. "
            f"Precisions: {', '.join(r['model'])}.",
            "",
            f"{s['image_size']} px, {s['image_encoder']}, F = {s['feature_dim']}, K = {s['K']}, {steps} DDIM steps, "
            f"S = {s['eval_samples']}; measured at batch {s['batch_size']} (config: {s['config_batch_size']}).",
            "",
            "FLOPs per image (GFLOP; forward and backward for training):",
            "",
            "| training step | DCG | encoders | body | sum of parts | DCG (eval) | encoders (eval) | body, one step |",
            "|---|---|---|---|---|---|---|---|",
            f"| {gflop(f['train_step'])} | {gflop(f['train_dcg'])} | {gflop(f['train_encoders'])} | "
            f"{gflop(f['train_body'])} | {gflop(f['train_parts_sum'])} | {gflop(f['dcg'])} | {gflop(f['encoders'])} | "
            f"{gflop(f['body_step'])} |",
            "",
            "| sampled image | encoders once | re-run per step (authors) | ratio |",
            "|---|---|---|---|",
        ]
        for key in [k for k in f if k.startswith("sample_once_")]:
            tail = key.removeprefix("sample_once_")
            lines.append(
                f"| {tail.replace('steps', '').replace('_S', ' steps, S = ')} | {gflop(f[key])} | "
                f"{gflop(f['sample_reencode_' + tail])} | {f['reencode_over_once_' + tail]:.2f}x |"
            )
        lines += [
            "",
            f"Encoders once = DCG + encoders + steps x S x body, exactly: **{f['identity_holds']}**. "
            f"Both samplers give identical grids (float32, bit for bit): **{r['samplers_identical']}**."
            + (
                f" bf16 argmax agrees with float32 on {r['bf16_argmax_agrees']:.0%} of the batch."
                if r.get("bf16_argmax_agrees") is not None
                else ""
            ),
            "",
            "Images per second (model-only: tensors on the device; end to end: Lightning fit on the real DataModule):",
            "",
            "| precision | train model-only | train end to end | sample, encoders once | sample, re-encoding | "
            "peak memory MB (train / once / re-encode) |",
            "|---|---|---|---|---|---|",
        ]
        for p, t in r["model"].items():
            e2e = r.get("end_to_end", {}).get(p, {}).get("images_per_s")
            lines.append(
                f"| {p} | {t['train_model']['images_per_s']:.2f} | {'–' if e2e is None else f'{e2e:.2f}'} | "
                f"{t['sample_once']['images_per_s']:.2f} | {t['sample_reencode']['images_per_s']:.2f} | "
                f"{t['train_model']['peak_memory_mb']:.0f} / {t['sample_once']['peak_memory_mb']:.0f} / "
                f"{t['sample_reencode']['peak_memory_mb']:.0f} |"
            )
        if "end_to_end" in r:
            lines += ["", loader_text(r["end_to_end"]["loader"])]
        lines += ["", "Ratios:", ""] + [f"- `{k}`: {v:.2f}" for k, v in r["ratios"].items()]
        lines += ["", "Fraction of the measured dense-matmul rate reached:", ""]
        for p, v in r["peak_fraction"].items():
            lines.append(
                f"- {p}: matmul {v['matmul_peak_gflops']:.0f} GFLOP/s; training {v['train_model']:.1%}, "
                f"sampling {v['sample_once']:.1%}"
            )
        for p, prof in r.get("profile", {}).items():
            for what, pr in prof.items():
                lines += ["", f"Profile, {what}, {p} ({pr['total_ms']:.0f} ms of operator self time):", ""]
                lines += ["| operator | self ms | share | calls |", "|---|---|---|---|"]
                lines += [
                    f"| `{o['name']}` | {o['self_ms']:.1f} | {o['share']:.1%} | {o['calls']} |" for o in pr["operators"]
                ]
                lines += ["", "| module (forward) | ms | calls |", "|---|---|---|"]
                lines += [f"| {o['name']} | {o['ms']:.1f} | {o['calls']} |" for o in pr["modules_forward"]]
        lines.append("")
    write_atomically(stem.with_suffix(".md"), "\n".join(lines))
    logger.info("wrote %s and %s", stem.with_suffix(".md"), stem.with_suffix(".json"))
    return stem.with_suffix(".md"), stem.with_suffix(".json")


def entry_label(stem: str, batch_size: int, machine: dict) -> str:
    """A measurement's key in the report: the config, the batch and the machine (CPU and threads, or the GPU)."""
    where = (
        machine["device"]
        if machine["device"] != machine["cpu"]
        else f"{machine['cpu']}, {machine['cpu_threads']} threads"
    )
    return f"{stem}, batch {batch_size}, {where}"


def earlier_entries(path: Path) -> dict[str, dict]:
    """The measurements of an earlier report on this device, each under its label with its own machine: a new run
    replaces only the measurement of the same config, batch and machine (reports written before entries carried
    their machine take the report's)."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    entries = {}
    for entry in earlier.get("configs", {}).values():
        entry = {"machine": earlier["machine"], **entry}
        entries[entry_label(Path(entry["config"]).stem, entry["settings"]["batch_size"], entry["machine"])] = entry
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS), help="configs to measure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--batch-size", type=int, help="default: the config's data.batch_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the config's diffusion.sampling_steps)")
    parser.add_argument("--workers", type=int, help="data loader workers (default: the config's data.num_workers)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the matrices of the peak-rate probe")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip Lightning's fit on the real data")
    parser.add_argument("--profile", action="store_true", help="profile one training step and one sampled batch")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    data_path.add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key.sub=value for every config")
    args = parse_args_with_overrides(parser, argv)
    setup_logging()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.error("--device cuda, but CUDA is not available on this machine")
        return 2
    command = command_line("benchmarks.speed", argv)
    if args.data_path:  # the CPU cost of the training data path alone
        try:
            return data_path.run(args, command, machine(torch.device("cpu")), HAM_ZIP)
        except ConfigError as err:
            logger.error("config error: %s", err)
            return 2
    report = {"command": command, "machine": machine(device), "precisions": args.precision, "repeats": args.repeats}
    # what earlier runs measured on this device stays in the report, each with its own command and machine
    report["configs"] = earlier_entries(Path(args.out) / f"speed_{device.type}.json")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|in eval mode).*")
        for path in args.config:
            try:
                entry = {**benchmark_config(args, path, device), "command": command, "machine": report["machine"]}
            except ConfigError as err:
                logger.error("config error: %s", err)
                return 2
            label = entry_label(Path(path).stem, entry["settings"]["batch_size"], entry["machine"])
            report["configs"].pop(label, None)  # the newest measurement last
            report["configs"][label] = entry
            write_report(Path(args.out), device, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
