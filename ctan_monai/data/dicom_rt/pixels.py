"""Pixel data access with a clear error when a compressed transfer syntax has no decoder plugin installed."""

from __future__ import annotations

import os

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

__all__ = ["DicomDecodeError", "check_decodable", "pixel_array"]


class DicomDecodeError(RuntimeError):
    """Raised when the pixel data of a DICOM file cannot be decoded (e.g. a missing compression plugin)."""


def check_decodable(ds: Dataset, path: str | os.PathLike[str]) -> None:
    """Check, before decoding, that pydicom can decode the pixel data of ``ds``.

    Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE, ...) need an optional plugin for some syntaxes
    (pylibjpeg with its libjpeg/openjpeg/rle extras, python-gdcm, pyjpegls); this names the one that is missing.

    Args:
        ds: the dataset read from ``path``.
        path: the file, for the message.

    Raises:
        DicomDecodeError: naming the file, the transfer syntax and the plugins that would decode it.

    Example:
        >>> from pydicom import dcmread
        >>> from pydicom.data import get_testdata_file
        >>> path = get_testdata_file("CT_small.dcm")
        >>> check_decodable(dcmread(path), path)
    """
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomDecodeError(
            f"{path}: pixel data uses transfer syntax {syntax.name} ({syntax}), which pydicom cannot decode"
        ) from None
    if not decoder.is_available:
        plugins = "; ".join(decoder.missing_dependencies) or "a pydicom pixel data plugin"
        raise DicomDecodeError(
            f"{path}: pixel data is compressed with {syntax.name} ({syntax}) and no installed plugin decodes it; "
            f"install one of: {plugins} (e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
            "or `pip install python-gdcm`)"
        )


def pixel_array(ds: Dataset, path: str | os.PathLike[str]) -> np.ndarray:
    """The stored pixel values of ``ds`` (no rescaling), with decoding errors turned into a clear message.

    Args:
        ds: a dataset read with its pixel data.
        path: the file, for the message.

    Returns:
        the pixel array as pydicom decodes it ([rows, cols] or [frames, rows, cols]).

    Raises:
        DicomDecodeError: when the file has no pixel data, a plugin is missing, or decoding fails.

    Example:
        >>> from pydicom import dcmread
        >>> from pydicom.data import get_testdata_file
        >>> path = get_testdata_file("CT_small.dcm")
        >>> pixel_array(dcmread(path), path).shape
        (128, 128)
    """
    if "PixelData" not in ds:
        raise DicomDecodeError(f"{path}: has no pixel data")
    check_decodable(ds, path)
    try:
        return ds.pixel_array
    except Exception as err:  # pydicom raises several types for corrupt or truncated pixel data
        raise DicomDecodeError(f"{path}: cannot decode pixel data: {err}") from err
