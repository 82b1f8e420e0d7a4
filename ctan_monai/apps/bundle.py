"""Bundle helpers: find a bundle's folder, load trained weights for inference."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["find_bundle_root", "load_weights"]

logger = logging.getLogger("ctan_monai.bundle")


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


def load_weights(
    network: torch.nn.Module, ckpt_path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load trained weights into ``network`` and put it in eval mode.

    Accepts the bundle's ``models/model.pt`` (a bare state dict), a checkpoint dict holding it under ``model`` and
    weights saved from a ``DistributedDataParallel`` network (``module.`` prefixes).

    Args:
        network: the network (or a DDP wrapper of it).
        ckpt_path: the checkpoint file.
        device: where to map the tensors.

    Returns:
        the network, weights loaded, in eval mode.

    Raises:
        FileNotFoundError: naming the checkpoint and its folder when the file does not exist.
        ValueError: naming the file when it is not a state dict or does not fit ``network``.

    Example:
        >>> net = load_weights(net, "models/model.pt")  # doctest: +SKIP
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path.name!r} not found in {str(path.parent)!r}: train the model first "
            "(configs/train.yaml writes models/model.pt) or pass --ckpt_path"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a TorchScript archive, a truncated file, a pickle with arbitrary objects
        raise ValueError(f"checkpoint {str(path)!r} is not a readable PyTorch state dict: {err}") from err
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    target = network.module if hasattr(network, "module") else network
    try:
        target.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit this network (trained with another --arch, --backbone or task "
            f"settings?): {str(err).splitlines()[0]}"
        ) from err
    logger.info("loaded weights from %s", path)
    return network.eval()
