"""Split lists (CSV or the authors' pickles) and image files -> a Dataset of (image, label).

Single-label lists give one integer class per image; multi-label lists give a multi-hot row of C
findings (per-finding CSV columns named by data.class_names, a `label` column of C bits, or the
authors' pickle, whose rows may carry a 15th "no finding" bit; it is dropped only when it is 1 exactly
when none of the C findings is, in every row).

A listed path that does not resolve under the data root (the authors' lists name images like
`./dataset/isic2018/images/ISIC_0032616.jpg`) is looked up by its file name anywhere under the root."""

from __future__ import annotations

import logging
import os
import pickle
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataloader.transforms import item
from diffmic.config import ConfigError

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "img_root", "image", "file", "image_id", "id_code")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class SplitList:
    """One split: image paths (relative to the data root) and their labels, (N,) int64 class
    indices or (N, C) float32 multi-hot rows. `name` is what error messages call it; `rows` are the
    images' rows in the list file (0 for its first image, as the list's other errors count them)."""

    name: str
    paths: list[str]
    labels: np.ndarray
    rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = np.arange(len(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray, name: str) -> SplitList:
        return SplitList(name, [self.paths[i] for i in rows], self.labels[rows], self.rows[rows])


class ImageUnreadable(OSError):
    """An image of a list that could not be read while a run used it (deleted, truncated, a network file system
    that went away): the message names the file and its row in the list. Loaded in a DataLoader worker, it reaches
    the main process inside torch's message (the worker's traceback); `one_line` takes it out. An OSError, as the
    error of the image reader it replaces."""

    PREFIX = "image unreadable during the run: "

    @classmethod
    def one_line(cls, err: BaseException) -> str | None:
        """The one line of an ImageUnreadable, raised here or in a DataLoader worker; None for another error."""
        for line in reversed(str(err).splitlines()):
            if cls.PREFIX in line:
                return line[line.index(cls.PREFIX) :]
        return None


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


def _row_bits(path: Path, i: int, row, num_classes: int) -> np.ndarray:
    """One multi-hot row (a sequence or an 'a b c' / 'a|b|c' / 'a,b,c' string) -> its 0/1 values."""
    bits = row.replace("|", " ").replace(",", " ").split() if isinstance(row, str) else row
    if not isinstance(bits, (list, tuple, np.ndarray)):
        raise ConfigError(
            f"split list {path}, row {i}: label {row!r} is not a multi-hot row of "
            f"{num_classes} bits (data.task is multilabel)"
        )
    if len(bits) not in (num_classes, num_classes + 1):
        raise ConfigError(
            f"split list {path}, row {i}: multi-hot label of length {len(bits)}, expected "
            f"data.num_classes = {num_classes} (or {num_classes + 1} ending in the authors' no-finding bit); "
            f"the row holds {row!r}. Set data.num_classes to the number of findings or fix the row"
        )
    try:
        values = np.asarray([float(b) for b in bits])
    except (TypeError, ValueError):
        raise ConfigError(f"split list {path}, row {i}: label {row!r} holds something other than 0 and 1") from None
    if not np.all((values == 0) | (values == 1)):
        raise ConfigError(f"split list {path}, row {i}: label {row!r} holds something other than 0 and 1")
    return values


def _multi_hot(path: Path, rows: list, num_classes: int) -> np.ndarray:
    """Rows of bits -> (N, C) float32. Rows of C + 1 bits (the authors' chest lists) lose their last
    bit only when it is the no-finding bit: 1 exactly when none of the C findings is, in every row.
    Anything else (a 15th finding, a shifted column) would silently lose or corrupt labels, so it is
    refused, naming the first row that shows it."""
    out = np.zeros((len(rows), num_classes), np.float32)
    width = None  # the width of row 0: a list mixing C and C + 1 bits is malformed
    for i, row in enumerate(rows):
        values = _row_bits(path, i, row, num_classes)
        if width is None:
            width = len(values)
        elif len(values) != width:
            raise ConfigError(
                f"split list {path}, row {i}: multi-hot label of length {len(values)} ({row!r}), but row 0 has "
                f"{width} bits; every row must have data.num_classes = {num_classes} bits, or every row "
                f"{num_classes + 1} ending in the authors' no-finding bit"
            )
        if width == num_classes + 1:
            findings, extra = int(values[:num_classes].sum()), int(values[num_classes])
            if extra != int(findings == 0):
                found = f"together with {findings} finding(s)" if findings else "although none of the findings is 1"
                raise ConfigError(
                    f"split list {path}, row {i}: label {row!r} has {num_classes + 1} bits for data.num_classes = "
                    f"{num_classes}, and its last bit is {extra} {found}. The extra column is dropped only when it "
                    f"is the authors' no-finding bit, which must be 1 exactly when none of the first {num_classes} "
                    f"bits is 1, in every row; fix the list, or set data.num_classes = {num_classes + 1} if the "
                    "last column is a finding of its own"
                )
        out[i] = values[:num_classes]
    if width == num_classes + 1:
        logger.info(
            "%s: dropped the appended no-finding bit of %d rows (it is 1 exactly when no finding is)",
            path.name,
            len(rows),
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
    """root/name, or root/name.<suffix> for lists that give ids without extension. An absolute name
    that exists is used as it is (root / absolute_path is absolute_path)."""
    candidate = root / name
    if candidate.is_file():
        return candidate
    for suffix in IMAGE_SUFFIXES:
        if (root / (name + suffix)).is_file():
            return root / (name + suffix)
    return None


def _index_images_by_name(root: Path) -> dict[str, list[Path]]:
    """File name -> sorted paths of every image file (IMAGE_SUFFIXES, any case) anywhere under root.
    Symlinked folders are followed (data sets are often linked in), each real folder once."""
    index: dict[str, list[Path]] = defaultdict(list)
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a second link to a folder already scanned, or a link cycle
            dirs[:] = []
            continue
        seen.add(real)
        for file in files:
            if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES:
                index[file].append(Path(folder) / file)
    logger.debug("indexed %d image file name(s) under %s", len(index), root)
    return {name: sorted(paths) for name, paths in index.items()}


def _file_name(listed: str) -> str:
    """The last path component, for '/' and for the '\\' of lists written on Windows."""
    return listed.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _name_candidates(index: dict[str, list[Path]], listed: str) -> list[Path]:
    """Files whose name is the listed file name, or that name plus an image suffix (as for root/name)."""
    name = _file_name(listed)
    if not name:
        return []
    found = list(index.get(name, []))
    for suffix in IMAGE_SUFFIXES:
        found += index.get(name + suffix, [])
    # one file reached through two names (a symlinked file) is one candidate
    unique: dict[str, Path] = {}
    for candidate in found:
        unique.setdefault(os.path.realpath(candidate), candidate)
    return list(unique.values())


class NameIndex:
    """The image files under one data root by file name, built on first need and kept, so that the train, val and
    test lists of one run share a single scan (the datamodule makes one per run; an ImageList given none makes its
    own). An index that cannot answer (a name with no file, or a file gone) is rebuilt once, since files may have been
    added since it was built."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._index: dict[str, list[Path]] | None = None

    def find(self, names: list[str]) -> list[list[Path]]:
        """For each listed path, the image files under the root with its file name (a list per name)."""
        fresh = self._index is None
        if fresh:
            self._index = _index_images_by_name(self.root)
        found = [_name_candidates(self._index, n) for n in names]
        if not fresh and any(not c or not all(p.is_file() for p in c) for c in found):
            self._index = _index_images_by_name(self.root)
            found = [_name_candidates(self._index, n) for n in names]
        return found


def load_rgb(path: str | Path, draft_side: int | None = None) -> Image.Image:
    """Open an image fully (a truncated file raises, naming it) and return it as 8-bit RGB. `draft_side`: a JPEG
    may be decoded at 1/2, 1/4 or 1/8 of its size as long as both sides stay at least this (PIL's draft mode, which
    changes the pixels: for training only, see transforms.decode_side)."""
    try:
        with Image.open(path) as image:
            if draft_side is not None:
                image.draft(image.mode, (draft_side, draft_side))
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: rescale to 8 bits
                array = np.asarray(image, dtype=np.float64)
                span = max(array.max() - array.min(), 1.0)
                image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
            return image.convert("RGB")
    except OSError as err:  # PIL raises OSError for truncated and unidentifiable files
        raise OSError(f"cannot read image {path}: {err}") from err


class ImageList(Dataset):
    """Images named by a split list, relative to `root`. A listed path that does not resolve there
    (the authors' lists carry their own folders, e.g. ./dataset/isic2018/images/ISIC_0032616.jpg) is
    found by its file name anywhere under root; a name matching two files is a ConfigError, and
    missing files are a ConfigError that lists the first few and their count. `draft_side`: JPEGs decoded at reduced
    size down to it (see load_rgb; the training split of the standard transform). `names`: the root's NameIndex,
    shared by the lists of one run so that the root is scanned once."""

    def __init__(
        self,
        split: SplitList,
        root: str | Path,
        transform=None,
        draft_side: int | None = None,
        names: NameIndex | None = None,
    ) -> None:
        root = Path(root)
        # the same spelling, not only the same folder: files found by name come back under the index's root, and the
        # list's paths must all read as one root does
        if names is not None and names.root != root:
            raise ValueError(f"the NameIndex given is for {names.root}, not for this list's root {root}")
        resolved = [resolve_image(root, p) for p in split.paths]
        unresolved = [i for i, r in enumerate(resolved) if r is None]
        if unresolved:  # scan the root only when some listed path does not resolve directly
            self._resolve_by_name(split, names or NameIndex(root), resolved, unresolved)
        missing = [p for p, r in zip(split.paths, resolved, strict=True) if r is None]
        if missing:
            raise ConfigError(
                f"{len(missing)} of {len(split)} image(s) of {split.name} not found under {root}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                "(looked for root/<path>, root/<path>.<image suffix> and the file name anywhere under root); "
                "check data.root and the list"
            )
        self.paths, self.labels, self.ids = resolved, split.labels, list(split.paths)
        self.list_name, self.rows = split.name, split.rows
        self.transform, self.draft_side = transform, draft_side

    @staticmethod
    def _resolve_by_name(split: SplitList, names: NameIndex, resolved: list[Path | None], rows: list[int]) -> None:
        """Fill resolved[i] for the given rows by file name under the root (in place)."""
        root = names.root
        candidates = names.find([split.paths[i] for i in rows])
        by_name: dict[Path, str] = {}  # file -> the first listed path that took it
        merged: list[tuple[str, str, Path]] = []  # distinct listed paths that share one file
        found = 0
        for i, files in zip(rows, candidates, strict=True):
            if len(files) > 1:
                raise ConfigError(
                    f"{split.name}: {split.paths[i]!r} is not under {root}, and its file name "
                    f"{_file_name(split.paths[i])!r} matches {len(files)} files there: {files[0]}, {files[1]}; "
                    "remove or rename the duplicates, or point data.root at the folder the list's paths are "
                    "relative to"
                )
            if files:
                resolved[i], found = files[0], found + 1
                other = by_name.setdefault(files[0], split.paths[i])
                if other != split.paths[i]:
                    merged.append((other, split.paths[i], files[0]))
        if merged:  # the list tells these files apart by folder, the tree under root does not
            logger.warning(
                "%s: %d listed path(s) resolve by file name to a file another listed path also resolves to, "
                "e.g. %r and %r both to %s; check data.root",
                split.name,
                len(merged),
                *merged[0],
            )
        if found:
            logger.info(
                "%s: %d of %d image(s) found by file name under %s (their listed folders are not under data.root)",
                split.name,
                found,
                len(split),
                root,
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        try:
            image = load_rgb(self.paths[index], self.draft_side)
        except OSError as err:  # checked before the run, so it went away since: the whole run cannot go on
            cause = err.__cause__ or err
            raise ImageUnreadable(
                f"{ImageUnreadable.PREFIX}{self.paths[index]} (row {int(self.rows[index])} of {self.list_name}): "
                f"{getattr(cause, 'strerror', None) or cause}. Restore the file (or remove its row from the list) "
                "and run again (a fit: resume with --ckpt last); the checkpoints written before are kept as they were"
            ) from err
        label = self.labels[index]
        label = torch.from_numpy(label) if label.ndim else int(label)
        return {**item(self.transform, image), "label": label, "index": index}
