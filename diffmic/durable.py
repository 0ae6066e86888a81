"""Files that survive a full disk and a kill: every file a run writes goes to a temporary file beside its destination
(its own folder, never the system temp folder), is flushed and fsynced, then renamed over the destination. A reader
sees the previous file or the new one, never half of one; a write that fails removes its temporary file and leaves
the destination as it was, and says so in one line (WriteFailed, exit code EXIT_WRITE).

A temporary file is named `<name>.<host>.<pid>.partial`. One left behind by a killed process (SIGKILL, the OOM killer,
a pre-empted job) is removed by the next write of the same file on the same machine, once its process is gone; a
leftover of another machine is left alone (and ignored: nothing reads `.partial` files).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

# the exit code of a run that could not write one of its files (faults.py lists the others)
EXIT_WRITE = 5

# what to do, by the error a write met
_ADVICE = {
    errno.ENOSPC: "free space on that disk or point trainer.log_dir (or --out) at a larger one",
    errno.EDQUOT: "free space within your quota, raise it, or point trainer.log_dir (or --out) at another disk",
    errno.EACCES: "make the folder writable, or point trainer.log_dir (or --out) elsewhere",
    errno.EPERM: "make the folder writable, or point trainer.log_dir (or --out) elsewhere",
    errno.EROFS: "the disk is mounted read-only: point trainer.log_dir (or --out) at a writable one",
}
_DEFAULT_ADVICE = "check the disk (an I/O error, a network file system that went away)"


class WriteFailed(Exception):
    """A file of the run could not be written; the message is the one line the user reads: which file, why, the
    free space and the size it needed, and that the previous file is untouched."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def human_size(size: float) -> str:
    """Bytes in the unit a user reads: 512 KB, 330 MB, 1.59 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def free_space(folder: Path) -> int | None:
    """Bytes free for this user on the file system of `folder` (or of its nearest existing parent); None where the
    file system does not say."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # a file system that went away: the message then says "unknown"
        return None


def write_failed(path: Path, err: OSError, needed: int | None, written: int | None) -> WriteFailed:
    """The WriteFailed for `err` met while writing `path`: `needed` is the file's size where known, else at least
    the `written` bytes that had gone to disk."""
    reason = err.strerror or str(err) or type(err).__name__
    free = free_space(path.parent)
    free_text = "unknown space" if free is None else human_size(free)
    if needed is not None:
        size_text = f"it needed about {human_size(needed)}"
    elif written:
        size_text = f"it needed more than the {human_size(written)} written"
    else:
        size_text = "its size is not known"
    kept = f"the previous {path.name} is kept as it was" if path.is_file() else f"no {path.name} was written"
    advice = _ADVICE.get(err.errno, _DEFAULT_ADVICE)
    return WriteFailed(
        f"could not write {path} ({reason}): {free_text} free there, {size_text}; {kept}. What to do: {advice}",
        path,
    )


def partial_path(path: Path) -> Path:
    """The temporary file beside `path` that this process writes (named for its machine and process, so that two
    writers never share one)."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.partial")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary files of `path` that processes of this machine left when they were killed mid-write
    (their process is gone); returns them. Those of a live process (a writer at work) or of another machine are
    left alone."""
    pattern = re.compile(rf"{re.escape(path.name)}\.{re.escape(socket.gethostname())}\.(\d+)\.partial")
    removed = []
    for candidate in path.parent.glob(f"{glob_escape(path.name)}.*.partial"):
        match = pattern.fullmatch(candidate.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_exists(int(match.group(1))):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
        logger.info("removed %s, left by a write that was killed", candidate)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _discard(partial: Path) -> None:
    """Remove a temporary file after a failed write; a failure to remove it is said, not raised: the write's own
    error is the one to report."""
    try:
        partial.unlink(missing_ok=True)
    except OSError as err:
        logger.warning("could not remove the temporary file %s (%s): delete it by hand", partial, err)


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power cut. Some file systems cannot (EINVAL): then the
    rename is as durable as they make it."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", size: Callable[[], int] | None = None, **kwargs) -> Iterator[IO]:
    """Open the temporary file of `path` for writing (`mode` "wb" or "w", `kwargs` to open); when the block ends
    without an error it is flushed, fsynced and renamed over `path`. Any error removes it and leaves `path` as it
    was; an OSError of the writing (no space, quota, permissions, an I/O error) becomes WriteFailed, which names
    the free space and the size the file needed (`size`, called only then, else at least what was written)."""
    path = Path(path)
    partial = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path)
        handle = open(partial, mode, **kwargs)  # noqa: SIM115 - closed below, before the rename
    except OSError as err:
        raise write_failed(path, err, size() if size else None, None) from err
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        _sync_folder(path.parent)
    except OSError as err:
        written = partial.stat().st_size if partial.is_file() else None
        _discard(partial)
        raise write_failed(path, err, size() if size else None, written) from err
    except BaseException:  # a signal or any other error mid-write: the destination stays as it was
        _discard(partial)
        raise


def write_atomically(path: str | Path, content: bytes | str) -> None:
    """Write `content` (bytes, or text as UTF-8) to `path` through atomic_open: a reader never sees half a file."""
    data = content.encode() if isinstance(content, str) else content
    with atomic_open(path, "wb", size=lambda: len(data)) as handle:
        handle.write(data)
