"""Make monailabel 0.8.5 importable beside this project's stack (torch 2.13, pydicom 3, no torchvision).

Two of its imports fail there, both at module level and both in code paths our bundles never use:

- ``pydicom_seg`` (DICOM SEG conversion, imported by MONAI Label's inference endpoint) reads
  ``pydicom._storage_sopclass_uids``, a module pydicom 3 removed; its UIDs live in ``pydicom.uid`` now.
- ``monailabel.transform.post`` imports ``torchvision.utils`` for the DeepEdit / pathology image grids. PyPI's
  torchvision wheels pin one torch release each and none loads beside torch 2.13.

:func:`install` registers stand-ins for exactly those two names, and only when the real module cannot be imported:
an alias of ``pydicom.uid`` and a ``torchvision`` module whose ``utils.make_grid`` / ``utils.save_image`` raise a clear
error. It must run before ``monailabel.app`` is imported: ``start_server.py`` calls it before starting the server, and
the app's ``main.py`` calls it for the training and batch subprocesses that MONAI Label starts.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

__all__ = ["install"]

_TORCHVISION_STUB_VERSION = "0.0.0+ctan-stub"


def _missing(name: str) -> bool:
    """Whether ``name`` cannot be imported (and has no stand-in registered yet)."""
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _unavailable(feature: str) -> Any:
    """A function that raises, naming what is not available and why."""

    def raise_unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"torchvision.utils.{feature} is not available: this MONAI Label app runs without torchvision "
            "(PyPI's torchvision does not load beside torch 2.13); it is only used by DeepEdit / pathology apps"
        )

    return raise_unavailable


def _install_pydicom_uids() -> bool:
    """Alias ``pydicom._storage_sopclass_uids`` to ``pydicom.uid`` on pydicom >= 3; True when installed."""
    if not _missing("pydicom._storage_sopclass_uids"):
        return False
    import pydicom.uid

    sys.modules["pydicom._storage_sopclass_uids"] = pydicom.uid
    return True


def _install_torchvision_stub() -> bool:
    """Register a ``torchvision`` stand-in (``utils.make_grid``, ``utils.save_image``); True when installed."""
    if not _missing("torchvision"):
        return False
    package = types.ModuleType("torchvision")
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    package.__path__ = []  # a package, so that "torchvision.utils" resolves to the submodule below
    package.__version__ = _TORCHVISION_STUB_VERSION
    utils = types.ModuleType("torchvision.utils")
    utils.__spec__ = importlib.machinery.ModuleSpec("torchvision.utils", None)
    utils.make_grid = _unavailable("make_grid")
    utils.save_image = _unavailable("save_image")
    package.utils = utils
    sys.modules["torchvision"] = package
    sys.modules["torchvision.utils"] = utils
    return True


def install() -> list[str]:
    """Register the stand-ins that this environment needs (idempotent).

    Returns:
        the names of the stand-ins registered by this call (empty when nothing was needed or all were there).

    Example:
        >>> import compat  # doctest: +SKIP
        >>> compat.install()  # doctest: +SKIP
        ['pydicom._storage_sopclass_uids', 'torchvision']
    """
    installed = []
    if _install_pydicom_uids():
        installed.append("pydicom._storage_sopclass_uids")
    if _install_torchvision_stub():
        installed.append("torchvision")
    return installed
