"""MedMNIST: the file table, naming, download (network mocked), loading and every broken-file error."""
from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from config import ConfigError
from dataloader import medmnist
from dataloader.medmnist import MEDMNIST_2D, MedMNISTSplit, ensure_medmnist, medmnist_path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
COUNTS = {"train": 6, "val": 3, "test": 4}


def write_npz(path: Path, channels: int | None = None, num_labels: int = 1, num_classes: int = 3,
              drop: str | None = None) -> Path:
    """A small file in the official layout: uint8 {split}_images and {split}_labels (N, num_labels)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in COUNTS.items():
        shape = (n, 28, 28) if channels is None else (n, 28, 28, channels)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        high = 2 if num_labels > 1 else num_classes
        arrays[f"{split}_labels"] = rng.integers(0, high, (n, num_labels), dtype=np.uint8)
    arrays.pop(drop, None)
    np.savez_compressed(path, **arrays)
    return path


def test_table_covers_every_2d_flag():
    assert set(MEDMNIST_2D) == {"pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist",
                                "retinamnist", "breastmnist", "bloodmnist", "tissuemnist", "organamnist",
                                "organcmnist", "organsmnist"}
    for flag, entry in MEDMNIST_2D.items():
        assert entry["num_classes"] == len(entry["class_names"]), flag
        assert set(entry["md5"]) == {28, 64, 128, 224}, flag
        assert all(len(m) == 32 and int(m, 16) >= 0 for m in entry["md5"].values()), flag
    assert MEDMNIST_2D["chestmnist"]["task"] == "multi-label, binary-class"
    assert MEDMNIST_2D["chestmnist"]["num_classes"] == 14
    assert MEDMNIST_2D["retinamnist"]["task"] == "ordinal-regression"
    assert MEDMNIST_2D["breastmnist"]["class_names"] == ["malignant", "normal, benign"]


def test_grey_file_loads_as_rgb_single_label(tmp_path):
    path = write_npz(tmp_path / "breastmnist.npz")
    data = MedMNISTSplit(path, "train", transform=lambda image: torch.tensor(np.asarray(image)))
    assert len(data) == 6 and data.labels.dtype == np.int64 and data.labels.shape == (6,)
    assert data.ids[0] == "breastmnist_train_00000" and len(data.ids) == 6
    item = data[2]
    assert item["index"] == 2 and isinstance(item["label"], int) and item["label"] == data.labels[2]
    assert item["image"].shape == (28, 28, 3)
    grey = data.images[2]
    assert all(torch.equal(item["image"][..., c], torch.from_numpy(grey)) for c in range(3))


def test_rgb_file_keeps_colours_and_counts_each_split(tmp_path):
    path = write_npz(tmp_path / "retinamnist_64.npz", channels=3)
    for split, n in COUNTS.items():
        data = MedMNISTSplit(path, split)
        assert len(data) == n and data.ids[-1] == f"retinamnist_64_{split}_{n - 1:05d}"
    item = data[1]  # no transform: the PIL image itself
    assert item["image"].mode == "RGB" and np.array_equal(np.asarray(item["image"]), data.images[1])


def test_multilabel_file(tmp_path):
    path = write_npz(tmp_path / "chestmnist.npz", num_labels=14)
    data = MedMNISTSplit(path, "val", multilabel=True)
    assert data.labels.dtype == np.float32 and data.labels.shape == (3, 14)
    label = data[0]["label"]
    assert label.dtype == torch.float32 and label.shape == (14,) and set(label.tolist()) <= {0.0, 1.0}


def test_wrong_task_is_a_config_error(tmp_path):
    multi = write_npz(tmp_path / "chestmnist.npz", num_labels=14)
    with pytest.raises(ConfigError, match="multi-label.*data.task: multilabel"):
        MedMNISTSplit(multi, "train")
    single = write_npz(tmp_path / "breastmnist.npz")
    with pytest.raises(ConfigError, match="single-label"):
        MedMNISTSplit(single, "train", multilabel=True)


def test_missing_key_names_key_and_file(tmp_path):
    path = write_npz(tmp_path / "breastmnist.npz", drop="val_images")
    MedMNISTSplit(path, "train")  # the other splits still load
    with pytest.raises(ConfigError, match="breastmnist.npz.*'val_images'") as err:
        MedMNISTSplit(path, "val")
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [np.random.default_rng(1).bytes(4096), b"PK\x03\x04truncated"])
def test_corrupt_file_names_the_file(tmp_path, content):
    path = tmp_path / "pathmnist.npz"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="pathmnist.npz.*download it again") as err:
        MedMNISTSplit(path, "train")
    assert str(tmp_path) in str(err.value)


def test_bad_shapes_are_config_errors(tmp_path):
    np.savez(tmp_path / "a.npz", train_images=np.zeros((2, 28, 28, 4), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(ConfigError, match="train_images"):
        MedMNISTSplit(tmp_path / "a.npz", "train")
    np.savez(tmp_path / "b.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((3, 1)))
    with pytest.raises(ConfigError, match="train_labels has shape"):
        MedMNISTSplit(tmp_path / "b.npz", "train")


def test_medmnist_path_naming_and_errors(tmp_path):
    assert medmnist_path(tmp_path, "dermamnist", 28) == tmp_path / "dermamnist.npz"
    assert medmnist_path(str(tmp_path), "dermamnist", 64) == tmp_path / "dermamnist_64.npz"
    with pytest.raises(ConfigError, match="data.flag.*pathmnist"):
        medmnist_path(tmp_path, "organmnist3d", 28)
    with pytest.raises(ConfigError, match="data.medmnist_size.*28, 64, 128, 224"):
        medmnist_path(tmp_path, "dermamnist", 32)


def test_existing_file_is_returned_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    path = write_npz(tmp_path / "breastmnist.npz")
    assert ensure_medmnist(tmp_path, "breastmnist", 28, download=True) == path


def test_missing_file_without_download(tmp_path):
    with pytest.raises(ConfigError) as err:
        ensure_medmnist(tmp_path / "data", "retinamnist", 128, download=False)
    message = str(err.value)
    assert "retinamnist_128.npz" in message and str(tmp_path / "data") in message
    assert "https://zenodo.org/records/10519652/files/retinamnist_128.npz?download=1" in message
    assert MEDMNIST_2D["retinamnist"]["md5"][128] in message


def test_offline_download_is_a_config_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConfigError, match=r"records/10519652/files/breastmnist\.npz") as err:
        ensure_medmnist(tmp_path / "new", "breastmnist", 28, download=True)
    assert "no route to host" in str(err.value)
    assert list((tmp_path / "new").iterdir()) == []  # no temporary file left behind


def test_download_lands_file_after_md5_check(tmp_path, monkeypatch):
    payload = b"fake npz bytes" * 1000
    monkeypatch.setitem(MEDMNIST_2D["bloodmnist"]["md5"], 64, hashlib.md5(payload).hexdigest())
    urls = []

    def fetch(url, timeout):
        urls.append(url)
        return io.BytesIO(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fetch)
    path = ensure_medmnist(tmp_path / "medmnist", "bloodmnist", 64, download=True)
    assert path == tmp_path / "medmnist" / "bloodmnist_64.npz" and path.read_bytes() == payload
    assert urls == ["https://zenodo.org/records/10519652/files/bloodmnist_64.npz?download=1"]
    assert [p.name for p in path.parent.iterdir()] == ["bloodmnist_64.npz"]


def test_md5_mismatch_deletes_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"truncated"))
    with pytest.raises(ConfigError) as err:
        ensure_medmnist(tmp_path, "octmnist", 28, download=True)
    message = str(err.value)
    assert MEDMNIST_2D["octmnist"]["md5"][28] in message and hashlib.md5(b"truncated").hexdigest() in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (SHARED_DATA / "retinamnist.npz").is_file(),
                    reason=f"real MedMNIST files not in {SHARED_DATA}")
@pytest.mark.parametrize("flag, sizes, rgb, train_counts", [
    ("retinamnist", (1080, 120, 400), True, {0: 486, 1: 128, 2: 206, 3: 194, 4: 66}),
    ("breastmnist", (546, 78, 156), False, {0: 147, 1: 399}),
])
def test_real_files(flag, sizes, rgb, train_counts):
    path = ensure_medmnist(SHARED_DATA, flag, 28, download=False)
    assert hashlib.md5(path.read_bytes()).hexdigest() == MEDMNIST_2D[flag]["md5"][28]
    for split, n in zip(medmnist.SPLITS, sizes):
        data = MedMNISTSplit(path, split)
        assert len(data) == n and data.images.shape[1:] == ((28, 28, 3) if rgb else (28, 28))
    assert len(train_counts) == MEDMNIST_2D[flag]["num_classes"]
    train = MedMNISTSplit(path, "train")
    assert dict(sorted(Counter(train.labels.tolist()).items())) == train_counts
    assert train[0]["image"].size == (28, 28) and train[0]["image"].mode == "RGB"
