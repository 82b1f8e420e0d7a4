"""Lazy package exports (PEP 562): a package names what its modules define without importing them, so that importing
one piece (``from ctan_monai.engines import MixedPrecision``) loads that piece's module only, and a bundle's import
closure stays the core it uses plus its own dataset."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """The ``__getattr__``, ``__dir__`` and ``__all__`` of a package whose names are imported on first use.

    ``exports`` must be a literal dict in the package's ``__init__`` (``_EXPORTS = {...}``): ``ctan_monai.zoo``
    reads it from the source to find what a bundle needs. A name that is not exported but is a submodule is imported
    too, so that ``import ctan_monai`` followed by ``ctan_monai.engines.checkpoints`` works in config expressions.

    Args:
        package: the package's ``__name__``.
        exports: submodule name (relative, e.g. ``"checkpoints"``) to the names it defines that the package exports.

    Returns:
        ``(__getattr__, __dir__, __all__)`` for the package's module namespace.

    Raises:
        ValueError: when a name is exported by two submodules.

    Example:
        >>> getattr_, dir_, all_ = lazy_exports("ctan_monai.engines", {"schedules": ["build_lr_schedule"]})
        >>> getattr_("build_lr_schedule").__name__
        'build_lr_schedule'
    """
    owner: dict[str, str] = {}
    for submodule, names in exports.items():
        for name in names:
            if name in owner:
                raise ValueError(f"{package}: {name!r} is exported by both .{owner[name]} and .{submodule}")
            owner[name] = submodule

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module hook's required name)
        if name in owner:
            return getattr(importlib.import_module(f"{package}.{owner[name]}"), name)
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(owner) | set(exports))

    return __getattr__, __dir__, sorted(owner)
