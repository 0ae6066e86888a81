"""Images without labels, for `predict --input`: every image of a folder (recursively) or of a list with a path
column, or (the Python API's predict) a list of image files. Every image gets a row in the predictions; one that
cannot be read is reported in its row, not skipped."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from dataloader.lists import IMAGE_SUFFIXES, PATH_COLUMNS, load_rgb, resolve_image
from dataloader.transforms import item
from diffmic.config import OptionError

logger = logging.getLogger(__name__)


class UnlabelledImages(Dataset):
    """Images by path, each with its id (how the folder or list names it). An image that cannot be read gives a
    blank image and its reason in `error` ("" when it was read), so that the batch still runs and the row is
    reported. `labels` is None: there is nothing to score against."""

    labels = None

    def __init__(self, paths: list[Path], ids: list[str], transform, image_size: int) -> None:
        assert len(paths) == len(ids), "one id per path"
        self.paths, self.ids, self.transform, self.image_size = paths, ids, transform, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            image, error = item(self.transform, load_rgb(self.paths[index])), ""
        except OSError as err:  # missing, truncated or not an image: reported in the predictions
            # a black image in the evaluation transform's 8 bits, so that the batch collates; its row has no scores
            image, error = {"image": torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)}, str(err)
        return {**image, "label": -1, "index": index, "error": error}


def image_files(files: Sequence[str | Path], transform, image_size: int) -> UnlabelledImages:
    """Image files by path (relative to the working directory), in the given order, each named by its path as given;
    a missing or unreadable one is reported in its row, as a list's is."""
    files = list(files)
    if not files:
        raise OptionError("images", None, ": an empty list; give at least one image file")
    wrong = next((f for f in files if not isinstance(f, (str, Path))), None)
    if wrong is not None:
        raise OptionError("images", None, f": expected paths of image files, got a {type(wrong).__name__}")
    paths = [Path(f).expanduser().resolve() for f in files]
    return UnlabelledImages(paths, [str(f) for f in files], transform, image_size)


def unlabelled_images(
    source: str | Path | Sequence[str | Path], root: str | Path | None, transform, image_size: int
) -> UnlabelledImages:
    """The images of a folder (every file with an image suffix, recursively, in sorted order; ids relative to the
    folder), of a CSV list with a path column (paths relative to `root` when given, else to the list's folder;
    ids as the list writes them), or of image files (image_files): a list of them, or one."""
    if not isinstance(source, (str, Path)):
        return image_files(source, transform, image_size)
    # one image (`--input scan.png`), not a folder or a list
    if Path(source).suffix.lower() in IMAGE_SUFFIXES and not Path(source).is_dir():
        return image_files([source], transform, image_size)
    source = Path(source).expanduser().resolve()
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise OptionError("images", source, f": no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        if len(images) < len(files):
            logger.info("%s: %d files without an image suffix left out", source, len(files) - len(images))
        return UnlabelledImages(images, [p.relative_to(source).as_posix() for p in images], transform, image_size)
    if not source.is_file():
        raise OptionError("images", source, ": no such folder or list")
    try:
        frame = pd.read_csv(source)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise OptionError("images", source, f" is not a readable CSV ({err})".replace("\n", " ")) from None
    column = next((c for c in PATH_COLUMNS if c in frame.columns), None)
    if column is None or frame.empty:
        raise OptionError(
            "images",
            source,
            f": needs a path column (one of {', '.join(PATH_COLUMNS)}) and at least one row; "
            f"found columns {', '.join(map(str, frame.columns))}",
        )
    base = Path(root) if root is not None else source.parent
    names = frame[column].astype(str).tolist()
    paths = [resolve_image(base, name) or base / name for name in names]  # a missing file is reported in its row
    return UnlabelledImages(paths, names, transform, image_size)
