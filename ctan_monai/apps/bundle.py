"""Bundle helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["find_bundle_root"]


def find_bundle_root(name: str, start: str | os.PathLike[str] = ".") -> str:
    """Locate a bundle folder, so that its configs work whether run from the bundle folder (model-zoo style) or
    from the repository root (``--config_file bundles/<name>/configs/train.yaml``).

    Looks at ``start`` itself, then ``start/bundles/<name>``, then ``start/<name>``: the first holding
    ``configs/metadata.json`` whose ``name`` (or folder name) is ``name``.

    Args:
        name: the bundle's folder name, e.g. ``"ctan_openkbp"``.
        start: where to look from (the current directory by default).

    Returns:
        the bundle folder (absolute path).

    Raises:
        FileNotFoundError: when no such bundle is found; pass ``--bundle_root`` then.

    Example:
        >>> find_bundle_root("ctan_openkbp")  # doctest: +SKIP
        '/work/ctan_monai/bundles/ctan_openkbp'
    """
    base = Path(start).resolve()
    for candidate in (base, base / "bundles" / name, base / name):
        meta = candidate / "configs" / "metadata.json"
        if not meta.is_file():
            continue
        try:
            declared = json.loads(meta.read_text(encoding="utf-8")).get("name", "")
        except ValueError:
            declared = ""
        if candidate.name == name or declared == name:
            return str(candidate)
    raise FileNotFoundError(
        f"bundle {name!r} not found from {base}: run from the bundle folder or the repository root, "
        "or pass --bundle_root <folder>"
    )
