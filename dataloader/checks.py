"""Pre-training image checks: refuse files that are truncated or are not images, naming them,
instead of letting a loader pad a truncated file with grey and train on it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile

from diffmic.config import ConfigError

logger = logging.getLogger(__name__)

# JPEG writers sometimes append data after EOI (padding, vendor blobs); tolerate up to this much.
JPEG_TAIL_BYTES = 4096
# IEND is the last 12-byte chunk of a PNG; a little slack covers stray trailing bytes.
PNG_TAIL_BYTES = 64
# Formats checked from the tail; MPO is how PIL names multi-picture (camera) JPEGs.
TAIL_MARKERS = {
    "JPEG": (b"\xff\xd9", JPEG_TAIL_BYTES),
    "MPO": (b"\xff\xd9", JPEG_TAIL_BYTES),
    "PNG": (b"IEND", PNG_TAIL_BYTES),
}
MAX_NAMED = 5
# Kinds of failure, in the order the error message lists them.
KINDS = ("truncated", "corrupt", "not an image", "unreadable")


def _tail_has(handle: BinaryIO, marker: bytes, window: int) -> bool:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - window - len(marker)))
    return marker in handle.read()


def _check_one(path: Path, full: bool) -> str | None:
    """Return None when `path` is usable, else the kind of failure (one of KINDS)."""
    try:
        handle = path.open("rb")
    except OSError:
        return "unreadable"
    with handle:
        try:
            image = Image.open(handle)  # reads the header only
        except Exception:  # noqa: BLE001 - PIL raises many types on a bad header; all mean the same
            return "not an image"
        with image:
            tail = TAIL_MARKERS.get(image.format or "")
            if tail is not None and not _tail_has(handle, *tail):
                return "truncated"
            if not full and tail is not None:
                return None
            try:
                image.load()  # full decode: the only check for rarer formats, and for full=True
            except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
                # PIL says "truncated" when the data runs out; anything else is damage inside the file.
                return "truncated" if "truncated" in str(err) else "corrupt"
    return None


def _describe(kind: str, bad: list[Path], first: Path) -> str:
    # The first bad file overall is given in full (it shows where the files live); others by name.
    names = [str(p) if p == first else p.name for p in bad[:MAX_NAMED]]
    more = ", ..." if len(bad) > MAX_NAMED else ""
    return f"{len(bad)} {kind} ({', '.join(names)}{more})"


def verify_images(paths: Sequence[Path], list_name: str, full: bool = False, workers: int = 8) -> None:
    """Check every image of a list; raise ConfigError naming the truncated or non-image files.

    The default check reads each header and, for JPEG and PNG, looks for the end-of-image
    marker in the file's tail; other formats are fully decoded. `full=True` decodes every image,
    which also catches damage in the middle of a file, at the cost of a full read and decode.
    """
    paths = [Path(p) for p in paths]
    start = time.perf_counter()
    # A full decode only raises on truncation while this flag is False; another library may
    # have set it, so force it for the duration of the check and put the caller's value back.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        # Threads: the work is file I/O and PIL decoding, both of which release the GIL.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            kinds = list(pool.map(lambda p: _check_one(p, full), paths))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    logger.info(
        "%s: checked %d image(s) in %.1f s (%s check)",
        list_name,
        len(paths),
        time.perf_counter() - start,
        "full" if full else "cheap",
    )
    bad = [(p, k) for p, k in zip(paths, kinds, strict=True) if k is not None]
    if not bad:
        return
    parts = [
        _describe(kind, [p for p, k in bad if k == kind], bad[0][0]) for kind in KINDS if any(k == kind for _, k in bad)
    ]
    raise ConfigError(
        f"{list_name}: {len(bad)} of {len(paths)} image(s) cannot be used: "
        f"{', '.join(parts)}; re-export or remove them from the list"
    )
