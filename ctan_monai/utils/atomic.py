"""Atomic file writing: a reader never sees a half-written checkpoint, prediction or report."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one ``os.replace``.

    The temporary file keeps the target's suffix (so that writers that dispatch on the extension, such
    as nibabel and SimpleITK, keep working). On an exception the temporary file is removed and the
    original ``path``, if any, is untouched.

    Args:
        path: the final file path. Parent folders are created.

    Yields:
        the temporary path to write to.

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
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8).

    Args:
        path: target file.
        text: content.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically.

    Args:
        path: target file.
        obj: a JSON-serialisable object (NaN is written as ``NaN``, as Python's json does).
        indent: indentation of the output.
    """
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")
