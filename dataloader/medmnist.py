"""MedMNIST v2/v3 2D data sets: the official `.npz` files (28, 64, 128 or 224 px), checked and
optionally downloaded, read into a Dataset of (image, label) dicts like the other data sets.

Facts (tasks, class names, MD5 sums, URLs) are from the official `medmnist/info.py`, v3.0.2
(MedMNIST/MedMNIST, commit 3bb56be69bca38e5f105b21e4d6482b91354d3a4)."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataloader.transforms import item
from diffmic.config import ConfigError

logger = logging.getLogger(__name__)

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"
DOWNLOAD_TIMEOUT_S = 60


def _flag(task: str, class_names: list[str], *md5: str) -> dict:
    return {
        "task": task,
        "num_classes": len(class_names),
        "class_names": class_names,
        "md5": dict(zip(SIZES, md5, strict=True)),
    }


_ORGANS = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
MEDMNIST_2D: dict[str, dict] = {
    "pathmnist": _flag(
        "multi-class",
        [
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ],
        "a8b06965200029087d5bd730944a56c1",
        "55aa9c1e0525abe5a6b9d8343a507616",
        "ac42d08fb904d92c244187169d1fd1d9",
        "2c51a510bcdc9cf8ddb2af93af1eadec",
    ),
    "chestmnist": _flag(
        "multi-label, binary-class",
        [
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ],
        "02c8a6516a18b556561a56cbdd36c4a8",
        "9de6cd0b934ebb5b7426cfba5efbae16",
        "db107e5590b27930b62dbaf558aebee3",
        "45bd33e6f06c3e8cdb481c74a89152aa",
    ),
    "dermamnist": _flag(
        "multi-class",
        [
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ],
        "0744692d530f8e62ec473284d019b0c7",
        "b70a2f5635c6199aeaa28c31d7202e1f",
        "2defd784463fa5243564e855ed717de1",
        "8974907d8e169bef5f5b96bc506ae45d",
    ),
    "octmnist": _flag(
        "multi-class",
        ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
        "c68d92d5b585d8d81f7112f81e2d0842",
        "e229e9440236b774d9f0dfef9d07bdaf",
        "0a97e76651ace45c5d943ee3f65b63ae",
        "abc493b6d529d5de7569faaef2773ba3",
    ),
    "pneumoniamnist": _flag(
        "binary-class",
        ["normal", "pneumonia"],
        "28209eda62fecd6e6a2d98b1501bb15f",
        "8f4eceb4ccffa70c672198ea285246c6",
        "05b46931834c231683c68f40c47b2971",
        "d6a3c71de1b945ea11211b03746c1fe1",
    ),
    "retinamnist": _flag(
        "ordinal-regression",
        ["0", "1", "2", "3", "4"],
        "bd4c0672f1bba3e3a89f0e4e876791e4",
        "afda852cc34dcda56f86ad2b2457dbcc",
        "e48e916a24454daf90583d4e6efb1a18",
        "eae7e3b6f3fcbda4ae613ebdcbe35348",
    ),
    "breastmnist": _flag(
        "binary-class",
        ["malignant", "normal, benign"],
        "750601b1f35ba3300ea97c75c52ff8f6",
        "742edef2a1fd1524b2efff4bd7ba9364",
        "363e4b3f8d712e9b5de15470a2aaadf1",
        "b56378a6eefa9fed602bb16d192d4c8b",
    ),
    "bloodmnist": _flag(
        "multi-class",
        [
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ],
        "7053d0359d879ad8a5505303e11de1dc",
        "2b94928a2ae4916078ca51e05b6b800b",
        "adace1e0ed228fccda1f39692059dd4c",
        "b718ff6835fcbdb22ba9eacccd7b2601",
    ),
    "tissuemnist": _flag(
        "multi-class",
        [
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ],
        "ebe78ee8b05294063de985d821c1c34b",
        "123ece2eba09d0aa5d698fda57103344",
        "61b955355d7425a89687b06cca3ce0c2",
        "b077128c4a949f0a4eb01517f9037b9c",
    ),
    # The organ sets' 28 px files were re-released in v3: their MD5s differ from v2's.
    "organamnist": _flag(
        "multi-class",
        _ORGANS,
        "68e3f8846a6bd62f0c9bf841c0d9eacc",
        "2dcccc29b88e6da5a01161ef20cda288",
        "eeae80d0a227a8d099027e1b3cfd3b60",
        "50747347e05c87dd3aaf92c49f9f3170",
    ),
    "organcmnist": _flag(
        "multi-class",
        _ORGANS,
        "b9ceb9546e10131b32923c5bbeaea2b1",
        "3ce34a8724ea6f548e6db4744d03b6a9",
        "773c1f009daa3fe5d9a2a201b2a7ed94",
        "050f5e875dc056f6768abf94ec9995d1",
    ),
    "organsmnist": _flag(
        "multi-class",
        _ORGANS,
        "9ab87b696fb54e2a387ebe992d6ed5f1",
        "53a6d115339d874c25e309a994ff46d3",
        "ded0c5fa01a95dc4978b956f613e9b8e",
        "b354719e553fbbb2513d5533f52a4cb1",
    ),
}


def medmnist_path(root: str | Path, flag: str, size: int) -> Path:
    """`root/{flag}.npz` for 28 px (the official name has no suffix), else `root/{flag}_{size}.npz`."""
    if flag not in MEDMNIST_2D:
        raise ConfigError(f"data.flag {flag!r} is not a 2D MedMNIST data set; use one of {', '.join(MEDMNIST_2D)}")
    if size not in SIZES:
        raise ConfigError(
            f"data.medmnist_size {size!r} is not a MedMNIST size; use one of {', '.join(map(str, SIZES))}"
        )
    return Path(root) / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def _download(url: str, path: Path, expected_md5: str) -> None:
    """Stream `url` to a temporary file next to `path`, check its MD5, then rename it into place,
    so an interrupted or corrupt download never leaves a file under the final name."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != expected_md5:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"download of {path.name} from {url} into {path.parent} is corrupt: MD5 "
            f"{digest.hexdigest()}, expected {expected_md5}; retry, or fetch the file by hand"
        )
    os.replace(tmp, path)


def ensure_medmnist(root: str | Path, flag: str, size: int, download: bool) -> Path:
    """The path of the official file, downloading it into `root` first when missing and allowed."""
    path = medmnist_path(root, flag, size)
    if path.is_file():
        return path
    url, md5 = URL.format(name=path.stem), MEDMNIST_2D[flag]["md5"][size]
    advice = f"download {url} (MD5 {md5}) and save it as {path.name} in {path.parent}"
    if not download:
        raise ConfigError(f"MedMNIST file {path.name} not found in {path.parent}: {advice}, or set data.download: true")
    logger.info("downloading MedMNIST %s (%d px) from %s into %s", flag, size, url, path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(url, path, md5)
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        raise ConfigError(
            f"MedMNIST file {path.name} not found in {path.parent} and could not be downloaded ({err}): {advice}"
        ) from None
    logger.info("saved %s (MD5 %s)", path, md5)
    return path


class MedMNISTSplit(Dataset):
    """One split (train, val or test) of an official MedMNIST 2D `.npz`, held in memory."""

    def __init__(self, path: Path, split: str, transform=None, multilabel: bool = False) -> None:
        path = Path(path)
        if split not in SPLITS:
            raise ConfigError(f"MedMNIST split {split!r} is not one of {', '.join(SPLITS)}")
        where = f"MedMNIST file {path.name} in {path.parent}"
        if not path.is_file():
            raise ConfigError(f"{where} not found: fetch it with ensure_medmnist or download it by hand")
        images, labels = (self._read(path, f"{split}_{part}", where) for part in ("images", "labels"))
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ConfigError(
                f"{where}: {split}_images is {images.dtype} {images.shape}; expected uint8 "
                "(N, H, W) grey or (N, H, W, 3) RGB images"
            )
        if labels.ndim == 1:  # a re-saved file with flattened single-label targets
            labels = labels[:, None]
        if labels.ndim != 2 or len(labels) != len(images):
            raise ConfigError(
                f"{where}: {split}_labels has shape {labels.shape} for {len(images)} images; "
                "expected (N, 1) or (N, C) with N the number of images"
            )
        if multilabel and labels.shape[1] == 1:
            raise ConfigError(f"{where} is single-label (one label column): set data.task: multiclass")
        if not multilabel and labels.shape[1] > 1:
            raise ConfigError(f"{where} is multi-label ({labels.shape[1]} label columns): set data.task: multilabel")
        if multilabel and not np.isin(labels, (0, 1)).all():
            raise ConfigError(f"{where}: multi-label {split}_labels must be 0 or 1")
        if not multilabel and (labels < 0).any():
            raise ConfigError(f"{where}: {split}_labels has negative class indices")
        self.images = images
        self.labels = labels.astype(np.float32) if multilabel else labels[:, 0].astype(np.int64)
        self.multilabel = multilabel
        self.ids = [f"{path.stem}_{split}_{i:05d}" for i in range(len(images))]
        self.transform = transform
        logger.debug("%s: %d %s images of shape %s", where, len(images), split, images.shape[1:])

    @staticmethod
    def _read(path: Path, key: str, where: str) -> np.ndarray:
        """One array of the archive; every way a file can be broken becomes a ConfigError."""
        try:
            with np.load(path, allow_pickle=False) as data:  # a lone .npy array is no context manager
                return data[key]
        except KeyError:
            raise ConfigError(
                f"{where} has no array {key!r}: it is not an official MedMNIST file; download it again"
            ) from None
        except (zipfile.BadZipFile, zlib.error, ValueError, TypeError, EOFError, OSError) as err:
            raise ConfigError(
                f"{where} is not a readable .npz archive ({type(err).__name__}: {err}); delete it and download it again"
            ) from None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = Image.fromarray(self.images[index]).convert("RGB")  # grey -> 3 equal channels
        label = torch.from_numpy(self.labels[index].copy()) if self.multilabel else int(self.labels[index])
        return {**item(self.transform, image), "label": label, "index": index}
