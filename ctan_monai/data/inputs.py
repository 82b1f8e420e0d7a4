"""Checks of one input a caller hands over for inference (MONAI Label, ``--image``): shared by every bundle's loader,
so that a bad input gets the same clear error (the MONAI Label app turns it into an HTTP 422 reply)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["InputImageError", "check_input_file"]


class InputImageError(ValueError):
    """An input image that the bundle cannot take (empty, unreadable, wrong number of channels or dimensions)."""


def check_input_file(path: str | os.PathLike[str]) -> Path:
    """Check that an input image file (or DICOM folder) exists and is not empty.

    Args:
        path: the file or folder.

    Returns:
        the path.

    Raises:
        InputImageError: naming the path when it does not exist, is an empty file or an empty folder.

    Example:
        >>> check_input_file("ct.nii.gz")  # doctest: +SKIP
        PosixPath('ct.nii.gz')
    """
    p = Path(path)
    if p.is_dir():
        if not any(f.is_file() for f in p.rglob("*")):
            raise InputImageError(f"input {str(p)!r} is an empty folder (expected the files of one DICOM CT series)")
    elif not p.is_file():
        raise InputImageError(f"input {str(p)!r} does not exist")
    elif p.stat().st_size == 0:
        raise InputImageError(f"input {str(p)!r} is an empty file (0 bytes)")
    return p
