"""Split lists (CSV or the authors' pickles) and image files -> a Dataset of (image, label)."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

from config import ConfigError

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "img_root", "image", "file", "image_id", "id_code")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every class: only lists, dicts, strings and numbers can be unpickled, so a list
    file cannot run code."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain lists, dicts, "
                                     "strings and numbers are allowed in a split list")


def _read_pickle(path: Path) -> pd.DataFrame:
    try:
        with path.open("rb") as handle:
            entries = _PlainUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ConfigError(f"split list {path}: not a plain pickle of {{img_root, label}} dicts ({err})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"img_root", "label"} <= e.keys()
                                                for e in entries):
        raise ConfigError(f"split list {path}: expected a list of dicts with keys img_root and label")
    return pd.DataFrame({"path": [e["img_root"] for e in entries], "label": [e["label"] for e in entries]})


def read_list(path: str | Path) -> pd.DataFrame:
    """Read a split list into a frame with columns `path` (str) and `label` (int)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"split list not found: {path}")
    if path.suffix in (".pkl", ".pickle"):
        frame = _read_pickle(path)
    else:
        frame = pd.read_csv(path)
        column = next((c for c in PATH_COLUMNS if c in frame.columns), None)
        if column is None or "label" not in frame.columns:
            raise ConfigError(f"split list {path}: needs a label column and a path column (one of "
                              f"{', '.join(PATH_COLUMNS)}); found {', '.join(map(str, frame.columns))}")
        frame = frame.rename(columns={column: "path"})[["path", "label"]]
    if len(frame) == 0:
        raise ConfigError(f"split list {path} is empty")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = frame.index[labels.isna() | (labels != labels.round())]
    if len(bad):
        raise ConfigError(f"split list {path}, row {bad[0]}: label {frame['label'][bad[0]]!r} is not an integer")
    return frame.assign(path=frame["path"].astype(str), label=labels.astype(int))


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
    """Open an image fully (a truncated file raises) and return it as 8-bit RGB."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: rescale to 8 bits
            array = np.asarray(image, dtype=np.float64)
            span = max(array.max() - array.min(), 1.0)
            image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
        return image.convert("RGB")


class ImageList(Dataset):
    """Images named by a split list, relative to `root`."""

    def __init__(self, frame: pd.DataFrame, root: str | Path, num_classes: int, list_name: str,
                 transform=None) -> None:
        root = Path(root)
        resolved = [resolve_image(root, p) for p in frame["path"]]
        missing = [p for p, r in zip(frame["path"], resolved) if r is None]
        if missing:
            raise ConfigError(f"{len(missing)} image(s) of {list_name} not found under {root}: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        labels = frame["label"].to_numpy()
        out_of_range = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(out_of_range):
            row = int(out_of_range[0])
            raise ConfigError(f"{list_name}, row {row}: label {labels[row]} is outside 0..{num_classes - 1} "
                              f"(data.num_classes = {num_classes})")
        self.paths, self.labels = resolved, labels
        self.ids = list(frame["path"])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = load_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": int(self.labels[index]), "index": index}
