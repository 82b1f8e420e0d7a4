"""Integrity of cached files: a size and CRC-32 recorded when a file is written, checked before it is reused.

A cache entry is trusted only when every file it consists of has the size and CRC-32 recorded when it was written;
a truncated copy, a half-synced folder or flipped bytes are caught before training instead of as a decoder
traceback in the first iteration. Files recorded before sizes and CRCs were kept (older caches) can still be
checked for completeness when they are gzip files (``.nii.gz``): gzip ends with its own CRC-32 and length.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["file_crc32", "file_problem", "file_record"]

_CHUNK = 1 << 20


def file_crc32(path: str | os.PathLike[str]) -> int:
    """The CRC-32 of a file's bytes, as ``zlib.crc32`` computes it.

    Args:
        path: the file.

    Returns:
        the CRC-32, an unsigned 32-bit integer.

    Raises:
        OSError: when the file cannot be read.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = f.write_bytes(b"abc")
        >>> file_crc32(f) == zlib.crc32(b"abc")
        True
    """
    crc = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_record(path: str | os.PathLike[str]) -> dict[str, int]:
    """What :func:`file_problem` later checks a file against: its size in bytes and its CRC-32.

    Args:
        path: the file, just written.

    Returns:
        ``{"size": bytes, "crc32": crc}``.

    Raises:
        OSError: when the file cannot be read.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = f.write_bytes(b"abc")
        >>> file_record(f)["size"]
        3
    """
    return {"size": Path(path).stat().st_size, "crc32": file_crc32(path)}


def _gzip_problem(path: Path) -> str | None:
    """Why a gzip file is incomplete or corrupt (its trailer's CRC-32 and length are checked), or None."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as err:
        return f"is not a complete gzip file ({err}): truncated or corrupt"
    return None


def file_problem(path: str | os.PathLike[str], record: Mapping[str, Any] | None = None) -> str | None:
    """Why a cached file cannot be trusted, or None when it can.

    With a ``record`` (from :func:`file_record`) the file must have the recorded size and CRC-32. Without one (a cache
    written before records were kept), a gzip file (``*.gz``) is decompressed to the end, which checks gzip's own
    CRC-32 and length; other files are only required to exist.

    Args:
        path: the cached file.
        record: ``{"size", "crc32"}`` recorded when the file was written, or None.

    Returns:
        the problem as words that follow the file name (e.g. ``"is 1000 bytes, 5120 when written: truncated or
        replaced"``), or None.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = f.write_bytes(b"abc")
        >>> record = file_record(f)
        >>> file_problem(f, record) is None
        True
        >>> _ = f.write_bytes(b"ab")
        >>> file_problem(f, record)
        'is 2 bytes, 3 when written: truncated or replaced'
    """
    path = Path(path)
    if not path.is_file():
        return "is missing"
    if record is None:
        return _gzip_problem(path) if path.name.endswith(".gz") else None
    try:
        size = path.stat().st_size
        if size != int(record["size"]):
            return f"is {size} bytes, {int(record['size'])} when written: truncated or replaced"
        if file_crc32(path) != int(record["crc32"]):
            return "has another CRC-32 than when it was written: its content is corrupt or was replaced"
    except OSError as err:
        return f"cannot be read ({err})"
    except (KeyError, TypeError, ValueError):
        return "has a malformed integrity record (expected size and crc32)"
    return None
