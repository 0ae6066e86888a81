"""The task configs on real medical images from ../shared/data (read in place, never copied into the
repository): BreastMNIST and RetinaMNIST, HAM10000 with the DiffMIC split, multi-label NIH ChestX-ray14.
Each run is the real command line, in-process, with the task's YAML, its paths, and settings small
enough for a few CPU steps."""

from __future__ import annotations

import csv
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import diffuser_trainer
from dataloader.datamodule import build_datasets
from dataloader.transforms import ModelInput
from diffmic.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")]

# A few CPU steps: small images and model, random init (no weights can be fetched here).
FEW_STEPS = [
    "data.image_size=64",
    "data.batch_size=16",
    "data.num_workers=0",
    "dcg.batch_size=16",
    "dcg.epochs=1",
    "dcg.num_rois=3",
    "dcg.roi_size=32",
    "dcg.backbone_weights=null",
    "model.image_encoder=vit_t",
    "model.feature_dim=16",
    "model.patch_encoder_weights=null",
    "trainer.max_epochs=1",
    "trainer.val_every=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
]


def fit(config: str, tmp_path: Path, *overrides: str) -> dict:
    logs = tmp_path / "logs"
    assert (
        diffuser_trainer.main(
            ["fit", "--config", str(ROOT / "configs" / config), *FEW_STEPS, *overrides, f"trainer.log_dir={logs}"]
        )
        == 0
    )
    (metrics,) = logs.glob("*/version_0/metrics.json")
    return json.loads(metrics.read_text())


def medmnist_overrides() -> list[str]:
    return [f"data.root={SHARED / 'medmnist'}", "data.download=false"]


@pytest.mark.parametrize(
    "config, sizes, channels_equal, train_counts",
    [
        ("retinamnist.yml", (1080, 120, 400), False, [486, 128, 206, 194, 66]),
        ("breastmnist.yml", (546, 78, 156), True, [147, 399]),
    ],
)
def test_medmnist_configs_load_the_official_files(config, sizes, channels_equal, train_counts):
    cfg = load_config(ROOT / "configs" / config, medmnist_overrides())
    sets = build_datasets(cfg)
    assert tuple(len(sets[s]) for s in ("train", "val", "test")) == sizes
    assert np.bincount(sets["train"].labels).tolist() == train_counts
    image = ModelInput()({"image": sets["test"][0]["image"][None]})["image"][0]  # normalised, as on the device
    assert image.shape == (3, 224, 224)  # 28 px resized to the model's size, grey made RGB
    assert bool((image[0] * 0.229 + 0.485 - image[1] * 0.224 - 0.456).abs().max() < 1e-5) == channels_equal


@pytest.mark.parametrize("config", ["breastmnist.yml", "retinamnist.yml"])
def test_medmnist_trains_a_few_steps(tmp_path, config):
    metrics = fit(config, tmp_path, *medmnist_overrides())
    assert metrics["selection"]["monitor"] == "val/f1"
    for split in ("val", "test"):
        assert all(math.isfinite(metrics[split][k]) for k in ("acc", "f1", "auc", "kappa")), metrics


@pytest.fixture(scope="module")
def ham_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ham")
    with zipfile.ZipFile(SHARED / "ham10000_200x150" / "images.zip") as archive:
        archive.extractall(folder)
    return folder / "images"


def isic_paths(root: Path, train: Path, test: Path) -> list[str]:
    return [f"data.root={root}", f"data.train_list={train}", f"data.test_list={test}"]


def test_isic_config_reads_the_whole_diffmic_split_changing_only_paths(ham_images):
    splits = SHARED / "diffmic_splits"
    cfg = load_config(
        ROOT / "configs" / "isic.yml",
        isic_paths(ham_images, splits / "isic2018_train.csv", splits / "isic2018_test.csv"),
    )
    sets = build_datasets(cfg)
    assert (len(sets["train"]) + len(sets["val"]), len(sets["test"])) == (7011, 3004)
    assert np.bincount(sets["test"].labels).tolist() == [
        332,
        2038,
        146,
        88,
        329,
        32,
        39,
    ]  # MEL NV BCC AKIEC BKL DF VASC
    assert sets["train"][0]["image"].shape == (3, 224, 224)


def test_isic_200_image_subset_trains_and_validates(tmp_path, ham_images):
    splits = SHARED / "diffmic_splits"
    # 20 training and about 9 test images of each of the 7 classes, drawn with a fixed seed
    train = pd.read_csv(splits / "isic2018_train.csv").groupby("label").sample(20, random_state=0)
    test = pd.read_csv(splits / "isic2018_test.csv").groupby("label").sample(9, random_state=0).head(60)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    metrics = fit("isic.yml", tmp_path, *isic_paths(ham_images, tmp_path / "train.csv", tmp_path / "test.csv"))
    # every image is scored: the 14 carved for validation (ceil(0.1 * 140), 2 per class, one batch) and all
    # 60 test images, so each accuracy is a whole number of images out of that count
    for split, n in (("val", 14), ("test", 60)):
        acc = metrics[split]["acc"]
        assert 0.0 <= acc <= 1.0 and acc * n == pytest.approx(round(acc * n)), (split, acc)
        # with one DDIM sample (FEW_STEPS) the scores that compare samples are undefined: NaN, never a made-up 0;
        # every other metric is a number
        undefined = {k for k in metrics[split] if k.endswith(("/agreement", "/sample_spread"))}
        assert undefined and all(math.isnan(metrics[split][k]) for k in undefined), metrics[split]
        assert all(math.isfinite(v) for k, v in metrics[split].items() if k not in undefined), metrics[split]


def test_chest_multilabel_trains_and_reports_mean_auroc(tmp_path):
    with zipfile.ZipFile(SHARED / "nih_chestxray14_64px" / "images.zip") as archive:
        archive.extractall(tmp_path)
    labels = pd.read_csv(SHARED / "nih_chestxray14_64px" / "labels.csv")
    for split in ("train", "val", "test"):
        labels[labels["split_chexnet"] == split].to_csv(tmp_path / f"{split}.csv", index=False)
    cfg = load_config(ROOT / "configs" / "chest.yml")
    findings = cfg["data"]["class_names"]
    overrides = [
        f"data.root={tmp_path / 'images'}",
        *(f"data.{s}_list={tmp_path / f'{s}.csv'}" for s in ("train", "val", "test")),
        "dcg.num_rois=4",
        "model.patch_encoder=resnet18",
    ]
    metrics = fit("chest.yml", tmp_path, *overrides)
    assert metrics["selection"]["monitor"] == "val/auc"
    assert math.isfinite(metrics["test"]["auc"]) and 0.0 <= metrics["test"]["auc"] <= 1.0
    assert {f"auc/{name}" for name in findings} <= set(metrics["test"])
    # a finding's AUROC is undefined exactly when the 181 test images hold no positive (or no negative) of it,
    # and the reported AUROC is the mean over the defined ones
    test_truth = labels[labels["split_chexnet"] == "test"]
    for name in findings:
        defined = 0 < int(test_truth[name].sum()) < len(test_truth)
        assert math.isfinite(metrics["test"][f"auc/{name}"]) == defined, name
    per_finding = [metrics["test"][f"auc/{name}"] for name in findings]
    assert metrics["test"]["auc"] == pytest.approx(float(np.nanmean(per_finding)))
    # predict: one score per finding for each of the 181 test images
    ckpt = next((tmp_path / "logs").glob("chest/version_0/checkpoints/best.ckpt"))
    out = tmp_path / "predictions.csv"
    assert (
        diffuser_trainer.main(
            [
                "predict",
                "--config",
                str(ROOT / "configs" / "chest.yml"),
                "--ckpt",
                str(ckpt),
                "--out",
                str(out),
                *FEW_STEPS,
                *overrides,
                "dcg.num_rois=4",
                f"trainer.log_dir={tmp_path / 'logs'}",
            ]
        )
        == 0
    )
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 181 and [f"score_{n}" for n in findings] == [k for k in rows[0] if k.startswith("score_")]
    truth = labels[labels["split_chexnet"] == "test"].set_index("image")
    first = rows[0]
    assert first["label"] == "|".join(n for n in findings if truth.loc[first["image"], n] == 1)
