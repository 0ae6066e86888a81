"""Data loading for a GPU (issue 31): data.num_workers auto, persistent workers whose training augmentations repeat
on a resume and for any worker count, the cheaper training path (reduced-size JPEG decoding, 8-bit batches turned and
normalised on the device) with the augmentation parameters of SPEC 1, the model inputs of before to the bit
(evaluation and training, on the CPU), and the benchmark of the path."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers import textured_image
from PIL import Image
from scipy import stats
from torch.utils.data import default_collate
from torchvision import transforms as T

from benchmarks import speed
from dataloader import workers
from dataloader.datamodule import DiffMICDataModule, build_datasets
from dataloader.lists import load_rgb
from dataloader.transforms import (
    ROTATION,
    FlipRotate,
    ModelInput,
    SquareCenterCrop,
    build_transform,
    item,
    rotate,
    rotation_coefficients,
)
from dataloader.unlabelled import unlabelled_images
from diffmic.config import ConfigError, load_config

HAM_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000_200x150" / "images.zip"
needs_ham = pytest.mark.skipif(not HAM_ZIP.is_file(), reason=f"{HAM_ZIP} is absent")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- how many workers


@pytest.mark.parametrize(
    "cpus, per_node, expected",
    [(2, 1, 1), (16, 1, 8), (16, 2, 7), (16, 8, 1), (64, 4, 8), (1, 1, 0), (3, 2, 0), (128, 8, 8)],
)
def test_auto_shares_the_usable_cpus_among_the_processes_of_a_machine(monkeypatch, cpus, per_node, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + cpus)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 999)  # the affinity counts, not the machine's CPUs
    assert workers.resolve_num_workers("auto", per_node) == expected
    assert workers.resolve_num_workers(3, per_node) == 3  # a number stays what it is
    assert workers.resolve_num_workers(0, per_node) == 0


def test_auto_counts_every_cpu_where_the_system_has_no_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert workers.resolve_num_workers("auto", 1) == 5


def test_num_workers_is_auto_by_default_and_takes_a_number_or_auto():
    assert load_config(None, ["data.num_workers=auto"])["data"]["num_workers"] == "auto"
    assert load_config("configs/isic.yml")["data"]["num_workers"] == "auto"
    assert load_config(None, ["data.num_workers=3"])["data"]["num_workers"] == 3
    # the configs that set a number keep it
    assert load_config("configs/demo.yml")["data"]["num_workers"] == 0
    assert load_config("configs/bench_ham10000.yml")["data"]["num_workers"] == 1
    with pytest.raises(
        ConfigError, match=r"^config key data\.num_workers: must be auto or a number >= 0 .* got 'many'$"
    ):
        load_config(None, ["data.num_workers=many"])
    with pytest.raises(ConfigError, match=r"^config key data\.num_workers: expected str"):
        load_config(None, ["data.num_workers=2.5"])


def fake_trainer(devices: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        num_devices=devices,
        world_size=devices,
        global_rank=0,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )


TINY_SET = [
    "data.image_size=32",
    "dcg.num_rois=1",
    "data.synthetic.num_train=12",
    "data.synthetic.num_val=5",
    "data.synthetic.num_test=5",
    "data.synthetic.pattern_size=8",
    "data.rotation_degrees=30",
    "data.vertical_flip=true",
    "data.batch_size=4",
]


def test_loaders_use_the_resolved_workers_persistently_and_log_them(monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    data = DiffMICDataModule(load_config(None, [*TINY_SET, "data.num_workers=auto"]))
    data.trainer = fake_trainer(devices=2)  # 8 CPUs for 2 processes: 3 workers each
    with caplog.at_level(logging.INFO, logger="dataloader.datamodule"):
        loaders = [data.train_dataloader(), data.val_dataloader(), data.test_dataloader()]
    assert [(d.num_workers, d.persistent_workers) for d in loaders] == [(3, True)] * 3
    logged = [r.getMessage() for r in caplog.records if "worker process" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("data loading: 3 worker process(es) per process"), logged
    assert "8 CPUs usable, 2 process(es)" in logged[0]
    # a persistent loader seeds its workers once, at its first epoch: not from the global generator, or a resumed
    # fit (a new loader, seeding again) would draw once more than the uninterrupted one
    state = torch.get_rng_state()
    list(loaders[1])
    assert torch.equal(state, torch.get_rng_state())

    data = DiffMICDataModule(load_config(None, [*TINY_SET, "data.num_workers=0"]))
    loader = data.train_dataloader()
    # no workers: the loader of before (the transforms draw from the global generator)
    assert loader.num_workers == 0 and not loader.persistent_workers
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler) and loader.dataset is data.datasets["train"]


# ---------------------------------------------------------------------------------------------- the same images


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    model_input = ModelInput()  # the model inputs: turned and normalised as on the device
    batches = [model_input(b) for b in loader]
    return torch.cat([b["index"] for b in batches]), torch.cat([b["image"] for b in batches])


def test_training_images_repeat_on_a_resume_and_for_any_number_of_workers():
    """Persistent workers keep their own random state between epochs, which no checkpoint holds: the augmentations
    come from per-image seeds that the main process draws, so a fresh loader after the generator's state is put back
    (a resume) gives the epoch the persistent one gives, whatever the number of workers."""

    def loader(num_workers: int):
        cfg = load_config(None, [*TINY_SET, f"data.num_workers={num_workers}"])
        return DiffMICDataModule(cfg).train_dataloader()

    torch.manual_seed(5)
    persistent = loader(1)
    first = epoch(persistent)
    state = torch.get_rng_state()
    second = epoch(persistent)
    assert not torch.equal(first[1], second[1])

    torch.set_rng_state(state)
    resumed = epoch(loader(2))
    assert torch.equal(resumed[0], second[0]) and torch.equal(resumed[1], second[1])
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(epoch(loader(2)), first, strict=True))


# ---------------------------------------------------------------------------------------------- augmentations


def old_training_transform(cfg: dict) -> T.Compose:
    """The training transform before issue 31, every step in PIL."""
    data = cfg["data"]
    size = data["image_size"]
    steps: list = [T.RandomResizedCrop(size)] if data["transform"] == "chest" else [SquareCenterCrop(), T.Resize(size)]
    steps.append(T.RandomHorizontalFlip(0.5))
    if data["vertical_flip"]:
        steps.append(T.RandomVerticalFlip(0.5))
    if data["rotation_degrees"] > 0:
        steps.append(T.RandomRotation(data["rotation_degrees"], interpolation=T.InterpolationMode.BILINEAR))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)])


class PreviousFlipRotateNormalise:
    """The training transform's tail before the 8-bit batches (issue 31, point 9), kept as it was: flips, rotation
    and normalisation of each image in the loader worker, one float tensor an image."""

    def __init__(self, vertical_flip: bool, degrees: float) -> None:
        self.tail = FlipRotate(vertical_flip, degrees)  # its draws are the ones of before (tested below)
        self.mean, self.std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        hflip, vflip, angle = self.tail.draw()
        planes = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        pixels = torch.empty(planes.shape).copy_(planes)
        if self.tail.degrees > 0:
            pixels = self.rotate(pixels, angle, hflip, vflip)
        else:
            dims = [d for d, flip in ((2, hflip), (1, vflip)) if flip]
            pixels = pixels.flip(dims) if dims else pixels
        return pixels.div_(255).sub_(self.mean).div_(self.std)

    @staticmethod
    def rotate(pixels: torch.Tensor, angle: float, hflip: bool, vflip: bool) -> torch.Tensor:
        _, height, width = pixels.shape
        a = math.radians(angle)
        cos, sin = math.cos(a), math.sin(a)
        sx, sy = (-2.0 if hflip else 2.0) / width, (-2.0 if vflip else 2.0) / height
        u = torch.arange(width, dtype=pixels.dtype) + (0.5 - width / 2)
        v = (torch.arange(height, dtype=pixels.dtype) + (0.5 - height / 2))[:, None]
        grid = torch.empty(height, width, 2, dtype=pixels.dtype)
        torch.add((sx * cos) * u, (-sx * sin) * v, out=grid[..., 0])
        torch.add((sy * sin) * u, (sy * cos) * v, out=grid[..., 1])
        out = torch.nn.functional.grid_sample(
            pixels[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False
        )[0]
        inside = grid.abs_().amax(dim=-1) < 1
        return out.add_(2**-14).floor_().mul_(inside)


def previous_training_transform(cfg: dict) -> T.Compose:
    """The training transform before the 8-bit batches: the CPU steps of today, then the tail of before."""
    steps, data = build_transform(cfg, train=True).transforms[:-1], cfg["data"]
    return T.Compose([*steps, PreviousFlipRotateNormalise(data["vertical_flip"], data["rotation_degrees"])])


def model_inputs(transform, images: list[Image.Image]) -> torch.Tensor:
    """What the models read: the CPU half on each image (in order: its draws), collated as a loader collates, then
    the device half, here on the CPU."""
    return ModelInput()(default_collate([item(transform, image) for image in images]))["image"]


# rotation, both flips, the chest transform's crop, flips without rotation
TRAINING_AUGMENTATIONS = [
    ["data.rotation_degrees=30"],
    ["data.rotation_degrees=30", "data.vertical_flip=true"],
    ["data.transform=chest", "data.rotation_degrees=20"],
    ["data.rotation_degrees=0", "data.vertical_flip=true"],
]


@pytest.mark.parametrize("overrides", TRAINING_AUGMENTATIONS)
def test_training_transform_draws_the_old_parameters_and_samples_as_pil(overrides):
    """Seeded alike, the tensor path and the old PIL path draw the same crop, flips and angle and give the same
    pixels: to the bit without rotation, else within one 8-bit level on a few pixels in 10,000."""
    cfg = load_config(None, ["data.image_size=64", *overrides])
    new, old = build_transform(cfg, train=True), old_training_transform(cfg)
    image, level = textured_image(), 1 / 255 / min(STD)
    for seed in range(12):
        torch.manual_seed(seed)
        ours, after_ours = model_inputs(new, [image])[0], torch.get_rng_state()
        torch.manual_seed(seed)
        theirs = old(image)
        assert torch.equal(after_ours, torch.get_rng_state())  # the same draws
        if cfg["data"]["rotation_degrees"] == 0:
            assert torch.equal(ours, theirs)
        else:
            off = (ours - theirs).abs()
            assert off.max() <= level * 1.001 and (off > 1e-6).float().mean() < 1e-3, (seed, off.max())


@pytest.mark.parametrize("overrides", TRAINING_AUGMENTATIONS)
def test_training_inputs_are_the_tensors_of_the_float_path_to_the_bit(overrides):
    """Seeded alike, 8-bit items turned and normalised for a whole batch at once give the float tensors that the
    worker computed for each image before, to the bit (on the CPU), after the same draws: the augmentations keep
    their distributions (SPEC 1)."""
    cfg = load_config(None, ["data.image_size=64", *overrides])
    new, old = build_transform(cfg, train=True), previous_training_transform(cfg)
    images = [textured_image(), textured_image(64, 100), textured_image().rotate(90, expand=True)] * 3
    for seed in range(4):
        torch.manual_seed(seed)
        ours, after_ours = model_inputs(new, images), torch.get_rng_state()
        torch.manual_seed(seed)
        theirs = torch.stack([old(image) for image in images])
        assert torch.equal(after_ours, torch.get_rng_state())
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs), seed
    torch.manual_seed(0)
    first = item(new, images[0])
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (3, 64, 64)
    assert (ROTATION in first) == (cfg["data"]["rotation_degrees"] > 0)


def test_model_input_passes_float_batches_and_keeps_its_constants_on_the_device():
    model_input = ModelInput()
    batch = {"image": torch.randn(2, 3, 8, 8), "index": torch.arange(2)}
    assert model_input(batch) is batch  # already normalised (tests, benchmarks' model-only batches)
    constants = model_input.constants(torch.device("cpu"))
    assert constants is model_input.constants(torch.device("cpu"))  # copied to the device once
    assert constants.flatten().tolist() == torch.tensor([255.0, *MEAN, *STD]).tolist()
    loaded = {"image": torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), "index": torch.arange(2)}
    out = model_input(loaded)
    assert loaded["image"].dtype == torch.uint8, "the loader's batch is left as it was"
    torch.testing.assert_close(out["image"][0, :, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))


def test_training_transform_keeps_the_steps_and_parameters_of_spec_1():
    standard = build_transform(load_config("configs/isic.yml", ["data.vertical_flip=true"]), train=True).transforms
    assert [type(s) for s in standard] == [SquareCenterCrop, T.Resize, FlipRotate]
    assert tuple(standard[1].size) == (224, 224) and standard[1].interpolation == T.InterpolationMode.BILINEAR
    assert (standard[2].vertical_flip, standard[2].degrees) == (True, 30.0)
    chest = build_transform(load_config("configs/chest.yml"), train=True).transforms
    crop = chest[0]
    default = T.RandomResizedCrop(224)
    assert type(crop) is T.RandomResizedCrop and (crop.size, crop.scale, crop.ratio, crop.interpolation) == (
        default.size,
        default.scale,
        default.ratio,
        default.interpolation,
    )
    assert (chest[1].vertical_flip, chest[1].degrees) == (False, 20.0)


def test_flips_and_angles_are_drawn_with_their_distributions():
    tail = FlipRotate(vertical_flip=True, degrees=30)
    torch.manual_seed(0)
    draws = [tail.draw() for _ in range(4000)]
    angles = np.array([a for _, _, a in draws])
    assert angles.min() >= -30 and angles.max() <= 30
    assert stats.kstest(angles, stats.uniform(loc=-30, scale=60).cdf).pvalue > 1e-3
    for flips in (np.array([h for h, _, _ in draws]), np.array([v for _, v, _ in draws])):
        assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(len(flips))
    # no vertical flip and no rotation: one draw (the horizontal flip), as RandomHorizontalFlip alone
    torch.manual_seed(1)
    assert FlipRotate(vertical_flip=False, degrees=0).draw()[1:] == (False, 0.0)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    torch.rand(1)
    assert torch.equal(after, torch.get_rng_state())


def test_rotation_turns_as_pil_does():
    """At angles a uniform draw gives (PIL turns by 0 or 90 degrees by copying pixels exactly)."""
    image = textured_image(48, 48)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    for angle, hflip, vflip in [(17.3, False, False), (-0.5, False, False), (-25.0, True, True), (29.9, True, False)]:
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if hflip else image
        flipped = flipped.transpose(Image.Transpose.FLIP_TOP_BOTTOM) if vflip else flipped
        expected = torch.from_numpy(np.array(flipped.rotate(angle, Image.Resampling.BILINEAR))).permute(2, 0, 1)
        coefficients = torch.tensor([rotation_coefficients(angle, hflip, vflip, 48, 48)])
        off = (rotate(pixels[None], coefficients)[0] - expected.float()).abs()
        assert off.max() <= 1 and (off > 0).float().mean() < 1e-3, (angle, off.max())


# ---------------------------------------------------------------------------------------------- real JPEGs


@pytest.fixture(scope="module")
def ham_images(tmp_path_factory) -> list[Path]:
    """Six HAM10000 JPEGs as shared (200 x 150) and the same six upscaled to the originals' 600 x 450."""
    folder = tmp_path_factory.mktemp("ham")
    paths = []
    with zipfile.ZipFile(HAM_ZIP) as archive:
        for name in sorted(n for n in archive.namelist() if n.endswith(".jpg"))[:6]:
            data = archive.read(name)
            paths.append(folder / Path(name).name)
            paths[-1].write_bytes(data)
            with Image.open(io.BytesIO(data)) as small:
                large = small.convert("RGB").resize((600, 450), Image.Resampling.BICUBIC)
            paths.append(folder / f"large_{Path(name).name}")
            large.save(paths[-1], quality=90)
    return paths


def as_evaluated_before(path: Path, size: int) -> torch.Tensor:
    """An evaluation input as the code computed it before issue 31, written out in PIL and torch: full decoding,
    RGB, the centred square of side min(h, w), PIL's bilinear resize, 8 bits to [0, 1], ImageNet normalisation."""
    with Image.open(path) as image:
        image.load()
        rgb = image.convert("RGB")
    width, height = rgb.size
    side = min(width, height)
    left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
    square = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(square, np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
    return x.sub_(torch.tensor(MEAN)[:, None, None]).div_(torch.tensor(STD)[:, None, None])


def list_config(folder: Path, paths: list[Path], *overrides: str) -> dict:
    rows = pd.DataFrame({"image_id": [p.name for p in paths], "label": np.arange(len(paths)) % 2})
    rows.to_csv(folder / "list.csv", index=False)
    lists = [f"data.{key}={folder / 'list.csv'}" for key in ("train_list", "val_list", "test_list")]
    return load_config(
        None,
        ["data.dataset=list", f"data.root={folder}", *lists, "data.num_classes=2", "data.class_names=null", *overrides],
    )


@needs_ham
@pytest.mark.parametrize("size", [224, 64])
def test_evaluation_inputs_are_the_tensors_of_before(ham_images, size):
    """On real JPEGs the normalised evaluation batch is the float pipeline's of before, bit for bit: the val, test and
    predict --input items (8 bits) collated and normalised, and DiffMICDataModule's loader through its hook."""
    folder = ham_images[0].parent
    cfg = list_config(folder, ham_images, f"data.image_size={size}", "data.batch_size=5")
    sets = build_datasets(cfg)
    predict = unlabelled_images(
        folder, None, build_transform(load_config(None, [f"data.image_size={size}"]), False), size
    )
    by_name = {Path(p).name: i for i, p in enumerate(predict.paths)}
    expected = torch.stack([as_evaluated_before(path, size) for path in ham_images])
    model_input = ModelInput()
    for split in ("val", "test"):
        assert sets[split][0]["image"].dtype == torch.uint8 and sets[split].draft_side is None
        batch = model_input(default_collate([sets[split][i] for i in range(len(ham_images))]))
        assert batch["image"].dtype == torch.float32 and torch.equal(batch["image"], expected)
    unlabelled = default_collate([predict[by_name[path.name]] for path in ham_images])
    assert torch.equal(model_input(unlabelled)["image"], expected)
    data = DiffMICDataModule(cfg, datasets=sets)
    loaded = [data.on_after_batch_transfer(batch, 0)["image"] for batch in data.val_dataloader()]
    assert [len(b) for b in loaded] == [5, 5, 2] and torch.equal(torch.cat(loaded), expected)


@needs_ham
def test_training_batches_of_real_jpegs_are_the_tensors_of_before(ham_images):
    """The training split of real JPEGs at the paper's size (reduced decoding, rotation): seeded alike, the batch the
    models read is, to the bit, the one the worker's float path gave image by image."""
    folder = ham_images[0].parent
    cfg = list_config(folder, ham_images, "data.image_size=224", "data.rotation_degrees=30")
    train = build_datasets(cfg)["train"]
    assert train.draft_side == 224
    before = copy.copy(train)
    before.transform = previous_training_transform(cfg)
    torch.manual_seed(0)
    ours = ModelInput()(default_collate([train[i] for i in range(len(train))]))["image"]
    torch.manual_seed(0)
    theirs = torch.stack([before[i]["image"] for i in range(len(before))])
    assert ours.shape == (12, 3, 224, 224) and torch.equal(ours, theirs)


class Recorder(pl.LightningModule):
    """Keeps the batches as the loaders gave them and as its training and validation steps receive them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[str, list[dict]] = {"train": [], "val": []}
        self.loaded: list[dict] = []

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        self.loaded.append({key: value.clone() for key, value in batch.items()})
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen["train"].append(batch)
        return self.weight.sum()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.seen["val"].append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You have overridden `on_before_batch_transfer`")
@pytest.mark.parametrize(
    "precision, dtype", [("32-true", torch.float32), ("bf16-mixed", torch.float32), ("64-true", torch.float64)]
)
def test_lightning_hands_every_model_normalised_images_in_the_dtype_of_before(tmp_path, precision, dtype):
    """Through Lightning's loops (fit and validate) the models read the images the loaders' 8-bit batches stand for,
    normalised float32 as before (64-true: widened to float64, as Lightning widened the float batches before); the
    rotation's coefficients are used up on the way."""
    cfg = load_config(None, [*TINY_SET, "data.num_workers=0"])
    data = DiffMICDataModule(cfg)
    model = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    assert (len(model.seen["train"]), len(model.seen["val"]), len(model.loaded)) == (3, 2, 5)  # 12 and 5 images
    for k, (batch, loaded) in enumerate(zip(model.seen["train"] + model.seen["val"], model.loaded, strict=True)):
        assert loaded["image"].dtype == torch.uint8 and (ROTATION in loaded) == (k < 3)  # training batches only
        expected = ModelInput()(loaded)["image"]  # on the CPU, in float32
        assert ROTATION not in batch and batch["image"].dtype == dtype
        assert torch.equal(batch["image"], expected.to(dtype))


@needs_ham
def test_training_decodes_jpegs_at_reduced_size_only_down_to_the_image_size(ham_images):
    large = [p for p in ham_images if p.name.startswith("large_")]
    assert load_rgb(large[0], 224).size == (300, 225)  # 1/2: both sides stay >= 224
    assert load_rgb(large[0], 64).size == (150, 113)  # 1/4: 450 // 64 = 7, and the scales are powers of two
    assert load_rgb(large[0], 32).size == (75, 57)  # 1/8
    assert load_rgb(large[0]).size == (600, 450)
    small = [p for p in ham_images if not p.name.startswith("large_")]
    assert load_rgb(small[0], 224).size == (200, 150)  # already smaller than the side: decoded in full
    folder = ham_images[0].parent
    assert build_datasets(list_config(folder, ham_images))["train"].draft_side == 64  # the demo config's size
    chest = build_datasets(list_config(folder, ham_images, "data.transform=chest"))
    assert chest["train"].draft_side is None  # RandomResizedCrop may enlarge a small part: full resolution


@needs_ham
def test_the_speed_benchmark_measures_the_data_path(tmp_path):
    argv = ["--data-path", "--count", "4", "--repeats", "1", "--batch-size", "2", "--out", str(tmp_path)]
    assert speed.main(argv) == 0
    (entry,) = json.loads((tmp_path / "data_path.json").read_text()).values()
    assert entry["settings"]["image_sizes"] == "600 x 450" and entry["settings"]["images"] == 4
    timings = entry["timings"]
    for path in ("pil", "float", "current", "batching_float", "batching_uint8", "device_half_on_cpu"):
        timing = timings[path]
        assert timing["cpu_ms_per_image"] > 0 and timing["workers_for_target"] >= 1
        assert timing["images_per_s_per_core"] == pytest.approx(1000 / timing["cpu_ms_per_image"])
    assert timings["speed_up"] == pytest.approx(
        timings["float"]["cpu_ms_per_image"] / timings["current"]["cpu_ms_per_image"]
    )
    assert len(timings["ratios_new_over_old"]) == 1
    report = (tmp_path / "data_path.md").read_text()
    assert "| now: reduced decoding, 8-bit batches, rotation and normalisation on the device |" in report
    assert "New over old (8-bit over float32 batches)" in report
    assert entry["timings"]["draft_difference_levels"]["max"] >= entry["timings"]["draft_difference_levels"]["mean"]
    text = (tmp_path / "data_path.md").read_text()
    assert "upscaled" in text and "workers for 2,000 images/s" in text and "load average" in text
