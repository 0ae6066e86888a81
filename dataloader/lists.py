"""Split lists (CSV or the authors' pickles) and image files -> a Dataset of (image, label).

Single-label lists give one integer class per image; multi-label lists give a multi-hot row of C
findings (per-finding CSV columns named by data.class_names, a `label` column of C bits, or the
authors' pickle, whose rows may carry a 15th "no finding" bit that is dropped)."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from config import ConfigError

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "img_root", "image", "file", "image_id", "id_code")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class SplitList:
    """One split: image paths (relative to the data root) and their labels, (N,) int64 class
    indices or (N, C) float32 multi-hot rows. `name` is what error messages call it."""

    name: str
    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray, name: str) -> SplitList:
        return SplitList(name, [self.paths[i] for i in rows], self.labels[rows])


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every class: only lists, dicts, strings and numbers can be unpickled, so a list
    file cannot run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain lists, dicts, "
            "strings and numbers are allowed in a split list"
        )


def _read_pickle(path: Path) -> tuple[list, list]:
    try:
        with path.open("rb") as handle:
            entries = _PlainUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ConfigError(f"split list {path}: not a plain pickle of {{img_root, label}} dicts ({err})") from None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"img_root", "label"} <= e.keys() for e in entries
    ):
        raise ConfigError(f"split list {path}: expected a list of dicts with keys img_root and label")
    return [str(e["img_root"]) for e in entries], [e["label"] for e in entries]


def _class_labels(path: Path, raw: list, num_classes: int) -> np.ndarray:
    labels = pd.to_numeric(pd.Series(raw, dtype=object), errors="coerce")
    bad = np.flatnonzero(labels.isna() | (labels != labels.round()))
    if len(bad):
        raise ConfigError(f"split list {path}, row {bad[0]}: label {raw[bad[0]]!r} is not an integer class")
    labels = labels.to_numpy().astype(np.int64)
    outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(outside):
        raise ConfigError(
            f"split list {path}, row {outside[0]}: label {labels[outside[0]]} is outside "
            f"0..{num_classes - 1} (data.num_classes = {num_classes}; {len(outside)} such rows)"
        )
    return labels


def _multi_hot(path: Path, rows: list, num_classes: int) -> np.ndarray:
    """Rows of bits (sequences or 'a b c' / 'a|b|c' strings) -> (N, C) float32."""
    out = np.zeros((len(rows), num_classes), np.float32)
    extra_bit = 0
    for i, row in enumerate(rows):
        bits = row.replace("|", " ").replace(",", " ").split() if isinstance(row, str) else row
        if not isinstance(bits, (list, tuple, np.ndarray)):
            raise ConfigError(
                f"split list {path}, row {i}: label {row!r} is not a multi-hot row of "
                f"{num_classes} bits (data.task is multilabel)"
            )
        if len(bits) == num_classes + 1:  # the authors' chest lists append a "no finding" bit
            bits, extra_bit = bits[:num_classes], extra_bit + 1
        if len(bits) != num_classes:
            raise ConfigError(
                f"split list {path}, row {i}: multi-hot label of length {len(bits)}, expected "
                f"data.num_classes = {num_classes} (or {num_classes + 1} with a trailing no-finding bit)"
            )
        try:
            values = np.asarray([float(b) for b in bits])
        except (TypeError, ValueError):
            raise ConfigError(f"split list {path}, row {i}: label {row!r} holds something other than 0 and 1") from None
        if not np.all((values == 0) | (values == 1)):
            raise ConfigError(f"split list {path}, row {i}: label {row!r} holds something other than 0 and 1")
        out[i] = values
    if extra_bit:
        logger.info(
            "%s: dropped the appended no-finding bit of %d rows (it is 1 exactly when no finding is)",
            path.name,
            extra_bit,
        )
    return out


def read_list(
    path: str | Path, num_classes: int, multilabel: bool = False, class_names: list[str] | None = None
) -> SplitList:
    """Read and check a split list: every label must fit data.num_classes (and, multi-label, be a
    row of C bits). Errors name the file and the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"split list not found: {path}")
    if path.suffix in (".pkl", ".pickle"):
        paths, raw = _read_pickle(path)
    else:
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ConfigError(f"split list {path} is not a readable CSV ({err})".replace("\n", " ")) from None
        column = next((c for c in PATH_COLUMNS if c in frame.columns), None)
        finding_columns = multilabel and class_names is not None and set(class_names) <= set(frame.columns)
        if column is None or not (finding_columns or "label" in frame.columns):
            wanted = (
                "one 0/1 column per entry of data.class_names or a label column" if multilabel else "a label column"
            )
            raise ConfigError(
                f"split list {path}: needs {wanted} and a path column (one of "
                f"{', '.join(PATH_COLUMNS)}); found {', '.join(map(str, frame.columns))}"
            )
        paths = frame[column].astype(str).tolist()
        raw = frame[class_names].to_numpy().tolist() if finding_columns else frame["label"].tolist()
    if not paths:
        raise ConfigError(f"split list {path} is empty")
    labels = _multi_hot(path, raw, num_classes) if multilabel else _class_labels(path, raw, num_classes)
    duplicates = len(paths) - len(set(paths))
    if duplicates:
        logger.warning("%s lists %d image(s) more than once; every row is used", path, duplicates)
    return SplitList(str(path), paths, labels)


def resolve_image(root: Path, name: str) -> Path | None:
    """root/name, or root/name.<suffix> for lists that give ids without extension."""
    candidate = root / name
    if candidate.is_file():
        return candidate
    for suffix in IMAGE_SUFFIXES:
        if (root / (name + suffix)).is_file():
            return root / (name + suffix)
    return None


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image fully (a truncated file raises, naming it) and return it as 8-bit RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: rescale to 8 bits
                array = np.asarray(image, dtype=np.float64)
                span = max(array.max() - array.min(), 1.0)
                image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
            return image.convert("RGB")
    except OSError as err:  # PIL raises OSError for truncated and unidentifiable files
        raise OSError(f"cannot read image {path}: {err}") from err


class ImageList(Dataset):
    """Images named by a split list, relative to `root`; missing files are a ConfigError that lists
    the first few and their count."""

    def __init__(self, split: SplitList, root: str | Path, transform=None) -> None:
        root = Path(root)
        resolved = [resolve_image(root, p) for p in split.paths]
        missing = [p for p, r in zip(split.paths, resolved, strict=True) if r is None]
        if missing:
            raise ConfigError(
                f"{len(missing)} of {len(split)} image(s) of {split.name} not found under {root}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        self.paths, self.labels, self.ids = resolved, split.labels, list(split.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = load_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        label = self.labels[index]
        label = torch.from_numpy(label) if label.ndim else int(label)
        return {"image": image, "label": label, "index": index}
