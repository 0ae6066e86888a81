"""MedMNIST: the file table checked against the official names and the real files, naming, download
(network mocked), loading and every broken-file error."""

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

from dataloader import medmnist
from dataloader.medmnist import MEDMNIST_2D, MedMNISTSplit, ensure_medmnist, medmnist_path
from diffmic.config import PROJECT_ROOT, ConfigError, load_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
COUNTS = {"train": 6, "val": 3, "test": 4}
# The 2D data sets of the MedMNIST v2/v3 release (medmnist/info.py).
OFFICIAL_2D_FLAGS = (
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
)
# Facts of the real files in shared/data/medmnist (its README): split sizes, RGB or grey, train label counts.
REAL = {
    "retinamnist": ((1080, 120, 400), True, {0: 486, 1: 128, 2: 206, 3: 194, 4: 66}),
    "breastmnist": ((546, 78, 156), False, {0: 147, 1: 399}),
}


def real_file(flag: str) -> Path:
    """The shipped official 28 px file of `flag`, read in place; the test skips when it is absent."""
    path = SHARED_DATA / f"{flag}.npz"
    if not path.is_file():
        pytest.skip(f"real MedMNIST file {path} is absent")
    return path


def write_npz(
    path: Path, channels: int | None = None, num_labels: int = 1, num_classes: int = 3, drop: str | None = None
) -> Path:
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


@pytest.mark.parametrize("flag", OFFICIAL_2D_FLAGS)
def test_every_official_2d_flag_maps_to_its_official_files(tmp_path, flag):
    # 28 px is the original file name without a suffix; MedMNIST+ sizes carry _{size}
    for size, name in [(28, f"{flag}.npz"), (64, f"{flag}_64.npz"), (128, f"{flag}_128.npz"), (224, f"{flag}_224.npz")]:
        assert medmnist_path(tmp_path, flag, size) == tmp_path / name
        # offline, the error says which official file to fetch and the MD5 to check it against
        with pytest.raises(ConfigError) as err:
            ensure_medmnist(tmp_path, flag, size, download=False)
        message = str(err.value)
        assert f"https://zenodo.org/records/10519652/files/{name}?download=1" in message
        assert f"(MD5 {MEDMNIST_2D[flag]['md5'][size]})" in message
    assert list(tmp_path.iterdir()) == []


def test_table_holds_only_official_flags_with_distinct_md5s():
    assert set(MEDMNIST_2D) <= set(OFFICIAL_2D_FLAGS)  # no 3D or made-up flag is accepted
    md5s = [m for entry in MEDMNIST_2D.values() for m in entry["md5"].values()]
    # every file of the release has its own checksum: a copied entry would accept the wrong file
    assert len(set(md5s)) == len(md5s) == 4 * len(MEDMNIST_2D)
    assert all(len(m) == 32 and set(m) <= set("0123456789abcdef") for m in md5s)


def test_grey_file_loads_as_rgb_single_label(tmp_path):
    path = write_npz(tmp_path / "breastmnist.npz")
    data = MedMNISTSplit(path, "train", transform=lambda image: torch.tensor(np.asarray(image)))
    assert len(data) == 6 and data.labels.dtype == np.int64 and data.labels.shape == (6,)
    with np.load(path) as raw:  # the train split's own arrays, labels flattened from (N, 1)
        np.testing.assert_array_equal(data.labels, raw["train_labels"][:, 0])
        np.testing.assert_array_equal(data.images, raw["train_images"])
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
    with np.load(path) as raw:
        assert np.array_equal(np.asarray(item["image"]), raw["test_images"][1])
    assert item["image"].mode == "RGB"


def test_multilabel_file(tmp_path):
    path = write_npz(tmp_path / "chestmnist.npz", num_labels=14)
    data = MedMNISTSplit(path, "val", multilabel=True)
    assert data.labels.dtype == np.float32 and data.labels.shape == (3, 14)
    label = data[0]["label"]
    assert label.dtype == torch.float32 and label.shape == (14,) and set(label.tolist()) <= {0.0, 1.0}
    with np.load(path) as raw:  # the val split's first row, as floats
        assert torch.equal(label, torch.from_numpy(raw["val_labels"][0].astype(np.float32)))


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


@pytest.mark.parametrize("flag", sorted(REAL))
def test_real_files(flag):
    sizes, rgb, train_counts = REAL[flag]
    real_file(flag)
    path = ensure_medmnist(SHARED_DATA, flag, 28, download=False)
    assert path == SHARED_DATA / f"{flag}.npz"
    assert hashlib.md5(path.read_bytes()).hexdigest() == MEDMNIST_2D[flag]["md5"][28]
    labels = []
    for split, n in zip(medmnist.SPLITS, sizes, strict=True):
        data = MedMNISTSplit(path, split)
        assert len(data) == n and data.images.shape[1:] == ((28, 28, 3) if rgb else (28, 28))
        labels.append(data.labels)
    # the table's class count and names match the classes the real labels use (all splits together)
    classes = np.unique(np.concatenate(labels)).tolist()
    assert classes == list(range(MEDMNIST_2D[flag]["num_classes"]))
    assert len(MEDMNIST_2D[flag]["class_names"]) == len(classes)
    # a single-label file (one label column) is a single-label task in the table
    with np.load(path) as raw:
        assert raw["train_labels"].shape == (sizes[0], 1)
    assert "multi-label" not in MEDMNIST_2D[flag]["task"]
    train = MedMNISTSplit(path, "train")
    assert dict(sorted(Counter(train.labels.tolist()).items())) == train_counts
    assert train[0]["image"].size == (28, 28) and train[0]["image"].mode == "RGB"


@pytest.mark.parametrize("flag", sorted(REAL))
def test_download_accepts_the_official_bytes_and_refuses_altered_ones(tmp_path, monkeypatch, flag):
    official = real_file(flag).read_bytes()
    altered = bytearray(official)
    altered[len(altered) // 2] ^= 0xFF  # one byte changed: same size, wrong MD5
    served = {"bytes": bytes(altered)}
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served["bytes"]))
    with pytest.raises(ConfigError, match=rf"{flag}\.npz .* is corrupt: MD5") as err:
        ensure_medmnist(tmp_path, flag, 28, download=True)
    assert hashlib.md5(served["bytes"]).hexdigest() in str(err.value)
    assert list(tmp_path.iterdir()) == []  # refused: nothing under the final name, no temporary file
    served["bytes"] = official  # the table's MD5 accepts the official file's bytes
    path = ensure_medmnist(tmp_path, flag, 28, download=True)
    assert path == tmp_path / f"{flag}.npz" and path.read_bytes() == official
    assert len(MedMNISTSplit(path, "test")) == REAL[flag][0][2]


def test_medmnist_task_configs_agree_with_the_table():
    """A config's data.num_classes and data.task for a MedMNIST flag are those of the flag's table entry."""
    checked = []
    for path in sorted((PROJECT_ROOT / "configs").glob("*.yml")):
        data = load_config(path)["data"]
        if data["dataset"] != "medmnist":
            continue
        entry = MEDMNIST_2D[data["flag"]]
        assert data["num_classes"] == entry["num_classes"], path.name
        assert (data["task"] == "multilabel") == ("multi-label" in entry["task"]), path.name
        checked.append(path.name)
    assert {"retinamnist.yml", "breastmnist.yml"} <= set(checked)
