"""The training data path's cost (`python -m benchmarks.speed --data-path`): CPU time per training image, decoding,
augmenting and batching included, read from the CPU clock of one loader worker (a process of one thread), at the
config's size (224 px for configs/isic.yml) from 600 x 450 JPEGs, the size of the HAM10000 / ISIC 2018 originals.
Timed side by side, every repeat running each once (medians):
- "pil": the path before the reduced decoding and the tensor augmentation, every step in PIL (kept here as it was);
- "float": the path before the 8-bit batches: reduced decoding, then flips, rotation and normalisation of each image
  in the worker, float32 batches (its last step kept here as it was, `WorkerNormalised`);
- "current": reduced decoding, 8-bit batches with each image's rotation coefficients; the rotation and the
  normalisation run on the model's device, for a whole batch (transforms.ModelInput); their cost when that device is
  this CPU is timed apart ("device_half_on_cpu", the main process's CPU time per image, one thread);
- what collating and handing over a batch alone costs, of float32 images and of 8-bit ones.
From the cost: images a second per core, and the workers that 2,000 images a second need.

The originals are not on this machine: the benchmark upscales HAM10000's 200 x 150 JPEGs from the shared data to
600 x 450 (bicubic) and saves them as JPEGs of quality 90 in a temporary folder, unless --images names a folder of
JPEGs. Upscaled images hold less fine detail than the originals, so their files are smaller and decode faster.

Writes <out>/data_path.{md,json}; a new run replaces only the measurement of the same machine."""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T

from dataloader.datamodule import build_datasets
from dataloader.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FlipRotate,
    ModelInput,
    SquareCenterCrop,
    as_uint8,
    decode_side,
    rotate,
    rotation_coefficients,
)
from dataloader.workers import usable_cpus
from diffmic.config import ConfigError, load_config
from diffmic.durable import write_atomically

logger = logging.getLogger("benchmarks.speed")
ORIGINAL_SIZE = (600, 450)  # HAM10000 / ISIC 2018 Task 3 originals, width x height
TARGET_RATE = 2000  # images a second the loader of one GPU should deliver (issue 31)
JPEG_QUALITY = 90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-path", action="store_true", help="measure the training data path's CPU cost only")
    parser.add_argument("--images", help="--data-path: a folder of JPEGs (default: upscaled HAM10000 images)")
    parser.add_argument("--count", type=int, default=256, help="--data-path: images per repeat")


def upscaled_originals(zip_path: Path, count: int, folder: Path) -> list[Path]:
    """`count` HAM10000 images of the shared 200 x 150 archive, upscaled to 600 x 450 and saved as JPEGs."""
    if not zip_path.is_file():
        raise ConfigError(f"{zip_path} does not exist: give --images, a folder of 600 x 450 JPEGs")
    paths = []
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith(".jpg"))[:count]
        for name in names:
            with Image.open(io.BytesIO(archive.read(name))) as small:
                large = small.convert("RGB").resize(ORIGINAL_SIZE, Image.Resampling.BICUBIC)
            paths.append(folder / Path(name).name)
            large.save(paths[-1], quality=JPEG_QUALITY)
    return paths


def pil_path(cfg: dict) -> Callable[[Path], torch.Tensor]:
    """The training data path as it was before (full decoding, every step in PIL, then ToTensor and Normalize)."""
    data = cfg["data"]
    size = data["image_size"]
    steps: list = (
        [T.RandomResizedCrop(size)] if data["transform"] == "chest" else [SquareCenterCrop(), T.Resize((size, size))]
    )
    steps.append(T.RandomHorizontalFlip(0.5))
    if data["vertical_flip"]:
        steps.append(T.RandomVerticalFlip(0.5))
    if data["rotation_degrees"] > 0:
        steps.append(T.RandomRotation(data["rotation_degrees"], interpolation=T.InterpolationMode.BILINEAR))
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def load(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            image.load()
            return transform(image.convert("RGB"))

    return load


class PILPath(Dataset):
    """The images through the path of before, as a data set."""

    def __init__(self, cfg: dict, paths: list[Path]) -> None:
        self.load, self.paths = pil_path(cfg), paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.load(self.paths[index]), "index": index}


class WorkerNormalised:
    """The last step of the training transform before the 8-bit batches: the flips and the angle drawn as FlipRotate
    draws them, then the image flipped, turned and normalised in the worker, one float32 tensor an image (the same
    operations as then, through today's `rotate` with a batch of one)."""

    def __init__(self, tail: FlipRotate) -> None:
        self.tail = tail
        self.mean, self.std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        hflip, vflip, angle = self.tail.draw()
        planes = as_uint8(image)
        pixels = torch.empty(planes.shape).copy_(planes)
        if self.tail.degrees > 0:
            coefficients = torch.tensor([rotation_coefficients(angle, hflip, vflip, *pixels.shape[1:])])
            pixels = rotate(pixels[None], coefficients)[0]
        else:
            dims = [d for d, flip in ((2, hflip), (1, vflip)) if flip]
            pixels = pixels.flip(dims) if dims else pixels
        return pixels.div_(255).sub_(self.mean).div_(self.std)


class BatchingOnly(Dataset):
    """A stored image, copied for each index: what handing an image over costs whatever made it (float32 or 8 bits)."""

    def __init__(self, count: int, size: int, dtype: torch.dtype) -> None:
        self.count, self.image = count, torch.zeros(3, size, size, dtype=dtype)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return {"image": self.image.clone(), "index": index}


def with_worker_clock(samples: list) -> tuple[dict, float]:
    """default_collate (into shared memory, in a worker), and the worker's CPU clock when the batch is made."""
    return default_collate(samples), time.process_time()


def worker_ms_per_image(dataset: Dataset, batch_size: int) -> float:
    """CPU milliseconds one loader worker spends per image in its steady state: from the end of its first batch to the
    end of its last (decoding, augmenting, batching into shared memory, handing batches over), its start excluded."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=1, collate_fn=with_worker_clock)
    clocks = [clock for _, clock in loader]
    if len(clocks) < 2:
        raise ConfigError(f"--count {len(dataset)}: the data path needs at least two batches of {batch_size} images")  # type: ignore[arg-type]
    return (clocks[-1] - clocks[0]) / (len(dataset) - batch_size) * 1000  # type: ignore[arg-type]


def device_half_ms_per_image(dataset: Dataset, batch_size: int) -> float:
    """CPU milliseconds per image of the device half (the rotation and the normalisation of a batch) when the device
    is this CPU, in this process on one thread: the median over the loader's full batches of one pass."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker; the main process of a CPU fit would use its threads
    try:
        model_input, times = ModelInput(), []
        for batch in DataLoader(dataset, batch_size=batch_size, drop_last=True):
            start = time.process_time()
            model_input(batch)
            times.append((time.process_time() - start) / batch_size * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def draft_difference(paths: list[Path], side: int) -> dict[str, float]:
    """What decoding at reduced size changes in the deterministic part of the standard path (square crop and
    resize to `side`): absolute differences in 8-bit levels over every pixel of the images."""
    crop, resize = SquareCenterCrop(), T.Resize((side, side))
    diffs = []
    for path in paths:
        with Image.open(path) as full:
            full.load()
            before = np.asarray(resize(crop(full.convert("RGB"))), dtype=np.int16)
        with Image.open(path) as reduced:
            reduced.draft(reduced.mode, (side, side))
            reduced.load()
            after = np.asarray(resize(crop(reduced.convert("RGB"))), dtype=np.int16)
        diffs.append(np.abs(before - after).ravel())
    every = np.concatenate(diffs)
    return {"mean": float(every.mean()), "p99": float(np.percentile(every, 99)), "max": float(every.max())}


def measure(cfg: dict, paths: list[Path], repeats: int, batch_size: int) -> dict:
    """Median CPU ms per image of each path over the repeats, interleaved."""
    cfg = copy.deepcopy(cfg)
    labels = pd.DataFrame({"image_id": [p.stem for p in paths], "label": np.arange(len(paths)) % 2})
    listing = paths[0].parent / "data_path.csv"
    labels.to_csv(listing, index=False)
    cfg["data"].update(
        dataset="list",
        root=str(paths[0].parent),
        train_list=str(listing),
        val_list=str(listing),
        test_list=str(listing),
        num_classes=2,
        class_names=None,
        verify_images="off",
    )
    current = build_datasets(cfg)["train"]
    previous = copy.copy(current)  # the same images, decoding and CPU steps; the last step as it was
    previous.transform = T.Compose(
        [*current.transform.transforms[:-1], WorkerNormalised(current.transform.transforms[-1])]
    )
    size = cfg["data"]["image_size"]
    datasets: dict[str, Dataset] = {
        "pil": PILPath(cfg, paths),
        "float": previous,
        "current": current,
        "batching_float": BatchingOnly(len(paths), size, torch.float32),
        "batching_uint8": BatchingOnly(len(paths), size, torch.uint8),
    }
    times: dict[str, list[float]] = {name: [] for name in [*datasets, "device_half_on_cpu"]}
    for r in range(repeats):
        for name, dataset in datasets.items():
            times[name].append(worker_ms_per_image(dataset, batch_size))
        times["device_half_on_cpu"].append(device_half_ms_per_image(current, batch_size))
        logger.info("repeat %d/%d: %s ms per image", r + 1, repeats, {k: round(v[-1], 3) for k, v in times.items()})
    out: dict = {}
    for name, values in times.items():
        ms = statistics.median(values)
        out[name] = {
            "cpu_ms_per_image": ms,
            "images_per_s_per_core": 1000 / ms,
            "workers_for_target": math.ceil(TARGET_RATE * ms / 1000),
            "all_ms": values,
        }
    ms = {name: out[name]["cpu_ms_per_image"] for name in times}
    out["speed_up"] = ms["float"] / ms["current"]  # the 8-bit batches against the float ones, in this run
    out["speed_up_over_pil"] = ms["pil"] / ms["current"]
    # the same ratio repeat by repeat (both paths ran back to back in each): its spread shows the shared cores' noise
    out["ratios_new_over_old"] = [c / f for c, f in zip(times["current"], times["float"], strict=True)]
    before, now = ms["float"] - ms["batching_float"], ms["current"] - ms["batching_uint8"]
    out["speed_up_before_batching"] = before / now if now > 0 else None  # a few images: the noise may exceed it
    side = decode_side(cfg, train=True)
    out["draft_difference_levels"] = draft_difference(paths[: min(len(paths), 32)], side) if side else None
    return out


def run(args: argparse.Namespace, command: str, machine: dict, zip_path: Path) -> int:
    """The --data-path mode of benchmarks/speed.py on the first --config."""
    cfg = load_config(args.config[0], args.overrides)
    batch_size = args.batch_size or cfg["data"]["batch_size"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="data_path_") as folder:
        if args.images:
            paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[
                : args.count
            ]
            source = f"from {args.images}"
            if not paths:
                raise ConfigError(f"--images {args.images}: no .jpg or .jpeg files there")
        else:
            paths = upscaled_originals(zip_path, args.count, Path(folder))
            source = f"HAM10000's 200 x 150 JPEGs upscaled (bicubic) and saved at quality {JPEG_QUALITY}"
        sizes = sorted({Image.open(p).size for p in paths})
        timings = measure(cfg, paths, args.repeats, batch_size)
    load_after = os.getloadavg()[0]
    cpus = usable_cpus()
    report = {
        "command": command,
        "machine": {**machine, "usable_cpus": cpus, "pillow": PIL.__version__},
        "note": f"load average {load_before:.1f} at the start, {load_after:.1f} at the end: "
        + ("other work shared these CPUs" if max(load_before, load_after) > 1.5 else "little else ran"),
        "settings": {
            "config": args.config[0],
            "image_size": cfg["data"]["image_size"],
            "transform": cfg["data"]["transform"],
            "rotation_degrees": cfg["data"]["rotation_degrees"],
            "images": len(paths),
            "image_sizes": ", ".join(f"{w} x {h}" for w, h in sizes),
            "source": source,
            "batch_size": batch_size,
            "repeats": args.repeats,
        },
        "timings": timings,
    }
    for name in ("pil", "float", "current"):
        t = timings[name]
        logger.info(
            "%s: %.2f ms of CPU per image, %.0f images/s per core, %d workers for %d images/s",
            name,
            t["cpu_ms_per_image"],
            t["images_per_s_per_core"],
            t["workers_for_target"],
            TARGET_RATE,
        )
    write_report(Path(args.out), report, f"{machine['cpu']}, {cpus} CPUs")
    return 0


def write_report(out_dir: Path, report: dict, label: str) -> tuple[Path, Path]:
    """Add this run to <out>/data_path.{json,md}, replacing an earlier one of the same machine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / "data_path"  # not speed_*: those are speed.py's reports, each drawn as a figure
    entries = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {}
    entries.pop(label, None)
    entries[label] = report
    write_atomically(stem.with_suffix(".json"), json.dumps(entries, indent=2))
    lines = [
        "# The training data path on the CPU",
        "",
        "CPU time per training image (decoding, augmentation, batching into shared memory) on the CPU clock of one",
        "loader worker, from the end of its first batch to the end of its last; medians over the repeats, each path",
        f"run once per repeat. Workers for {TARGET_RATE:,} images/s: the cost times {TARGET_RATE:,}, one worker a",
        "core. The device half of the 8-bit path (rotation and normalisation of a batch) runs on the model's device;",
        "its cost on this CPU, one thread, is the last row. One section a machine.",
        "",
    ]
    for name, r in entries.items():
        m, s = r["machine"], r["settings"]
        lines += [
            f"## {name}",
            "",
            f"Command: `{r['command']}`",
            "",
            f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs ({r['note']}); torch {m['torch']}, "
            f"torchvision {m['torchvision']}, Pillow {m['pillow']}.",
            "",
            f"{s['config']}: {s['image_size']} px, {s['transform']} transform, rotation ±{s['rotation_degrees']}°; "
            f"{s['images']} JPEGs of {s['image_sizes']} ({s['source']}), batches of {s['batch_size']}, "
            f"{s['repeats']} repeats.",
            "",
            "| path | CPU ms per image | images/s per core | workers for 2,000 images/s |",
            "|---|---|---|---|",
        ]
        for key, what in (
            ("pil", "full decoding, every step in PIL"),
            ("float", "reduced decoding, flips, rotation and normalisation in the worker, float32 batches"),
            ("current", "now: reduced decoding, 8-bit batches, rotation and normalisation on the device"),
            ("batching_float", "batching alone: a float32 image copied, batched and handed over"),
            ("batching_uint8", "batching alone: an 8-bit image copied, batched and handed over"),
            ("device_half_on_cpu", "the device half on this CPU (main process, one thread; not in the worker)"),
        ):
            t = r["timings"].get(key)
            if t is None:  # a run of an earlier version of this benchmark
                continue
            lines.append(
                f"| {what} | {t['cpu_ms_per_image']:.2f} | {t['images_per_s_per_core']:.0f} | "
                f"{t['workers_for_target'] if key != 'device_half_on_cpu' else ''} |"
            )
        t = r["timings"]
        alone = t["speed_up_before_batching"]
        if "float" in t:
            ratios = t["ratios_new_over_old"]
            lines += [
                "",
                f"New over old (8-bit over float32 batches), in the worker: {1 / t['speed_up']:.2f} "
                f"({t['speed_up']:.2f}x faster; repeat by repeat {min(ratios):.2f} to {max(ratios):.2f}); "
                f"{t['speed_up_over_pil']:.2f}x faster than the PIL path. Before batching (each path's cost less its "
                "own batching): " + (f"{alone:.2f}x." if alone is not None else "not measurable."),
            ]
        else:
            lines += [
                "",
                f"Speed-up: {t['speed_up']:.2f}x; "
                + (f"{alone:.2f}x" if alone is not None else "not measurable")
                + " for decoding and augmenting alone (each path's cost less the batching).",
            ]
        diff = r["timings"]["draft_difference_levels"]
        if diff:
            lines += [
                "",
                f"Reduced-size decoding changes the square crop resized to {s['image_size']} px by {diff['mean']:.2f} "
                f"8-bit levels on average (99th percentile {diff['p99']:.0f}, max {diff['max']:.0f}).",
            ]
        lines.append("")
    write_atomically(stem.with_suffix(".md"), "\n".join(lines))
    logger.info("wrote %s and %s", stem.with_suffix(".md"), stem.with_suffix(".json"))
    return stem.with_suffix(".md"), stem.with_suffix(".json")
