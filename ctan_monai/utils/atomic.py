"""Atomic, durable file writing: a reader never sees a half-written checkpoint, prediction or report, and a written
file survives a power loss (file and folder fsync'ed); a full disk is reported with the path and the free space."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["DiskFullError", "atomic_path", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_file"]

# errors that mean "no room left": the device is full, or the user's quota is
_DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)
# a folder that cannot be opened or fsync'ed on this file system (some network and FUSE file systems): not an error
_DIR_FSYNC_UNSUPPORTED = frozenset(
    code
    for code in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR, getattr(errno, "ENOTSUP", None))
    if code is not None
)


class DiskFullError(OSError):
    """A write failed because the disk (or the quota) is full; ``errno`` is ``ENOSPC``.

    The message names the file that could not be written and the free space left on its file system; the file
    that was there before, if any, is untouched and no partial file is left (:func:`atomic_path`).

    Attributes:
        path: the file that could not be written.
        free_bytes: the free space on its file system when the error was raised (None when unknown).

    Example:
        >>> error = DiskFullError("/data/model.pt", 1024)
        >>> error.errno == errno.ENOSPC, "/data/model.pt" in str(error), "1.0 KiB (1024 bytes) free" in str(error)
        (True, True, True)
    """

    def __init__(self, path: str | os.PathLike[str], free_bytes: int | None) -> None:
        self.path = Path(path)
        self.free_bytes = free_bytes
        if free_bytes is None:
            free = "free space unknown"
        else:
            free = f"{_size(free_bytes)} ({free_bytes} bytes) free on its file system"
        super().__init__(
            errno.ENOSPC, f"disk full: could not write {self.path} ({free}; the previous file, if any, is kept)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.free_bytes))


def _size(n_bytes: int) -> str:
    """A byte count for people: ``1.5 GiB``."""
    if n_bytes < 1024:
        return f"{n_bytes} B"
    value = n_bytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _disk_full_cause(error: BaseException) -> OSError | None:
    """The disk-full ``OSError`` in ``error``'s chain (itself, its cause or context), if any.

    ``torch.save`` into a Python file reports a failed write as a ``RuntimeError`` whose context is the ``OSError``.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return current
        todo.extend((current.__cause__, current.__context__))
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to the disk (``fsync``), e.g. before renaming it into place.

    Args:
        path: an existing file.

    Raises:
        OSError: when the file cannot be opened or flushed (e.g. ``ENOSPC`` or ``EIO`` reported at flush time).

    Example:
        >>> import tempfile
        >>> fsync_file(tempfile.mkstemp()[1])
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries to the disk, so that a file renamed into it survives a power loss.

    File systems that cannot open or fsync a folder are skipped silently (nothing else can be done there).

    Args:
        path: an existing folder.

    Raises:
        OSError: for other errors (e.g. ``EIO``).

    Example:
        >>> import tempfile
        >>> fsync_dir(tempfile.mkdtemp())
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        if error.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and replaces ``path`` in one ``os.replace``,
    and the folder is fsync'ed, so that after a crash or power loss ``path`` holds either the old or the new content.

    The temporary file keeps the target's suffix (so that writers that dispatch on the extension, such
    as nibabel and SimpleITK, keep working). On an exception the temporary file is removed and the
    original ``path``, if any, is untouched.

    Args:
        path: the final file path. Parent folders are created.

    Yields:
        the temporary path to write to.

    Raises:
        DiskFullError: when the disk or quota is full (``ENOSPC`` / ``EDQUOT`` anywhere in the error's chain, e.g. a
            ``RuntimeError`` of ``torch.save`` caused by a failed write), naming ``path`` and the free space; the
            previous file survives and no partial file is left.

    Example:
        >>> import torch, tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> with atomic_path(target) as tmp:
        ...     torch.save({"a": 1}, tmp)
        >>> os.path.exists(target)
        True
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file 0600; give the final file the permissions a plain open() would (umask applied)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        fsync_file(tmp)  # the data reaches the disk before the rename makes it the file
        os.replace(tmp, final)
        fsync_dir(final.parent)  # and the rename itself
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if _disk_full_cause(error) is not None and not isinstance(error, DiskFullError):
            raise DiskFullError(final, _free_bytes(final.parent)) from error
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (UTF-8).

    Args:
        path: target file.
        text: content.

    Raises:
        DiskFullError: when the disk is full (the previous file survives).

    Example:
        >>> import tempfile, os
        >>> atomic_write_text(os.path.join(tempfile.mkdtemp(), "a.txt"), "hello")
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically and durably.

    Args:
        path: target file.
        obj: a JSON-serialisable object (NaN is written as ``NaN``, as Python's json does).
        indent: indentation of the output.

    Raises:
        DiskFullError: when the disk is full (the previous file survives).

    Example:
        >>> import tempfile, os
        >>> atomic_write_json(os.path.join(tempfile.mkdtemp(), "a.json"), {"epoch": 1})
    """
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")
