"""What the MONAI Label app needs to know about a CTAN bundle, read from its ``configs/metadata.json``."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TRAIN_OVERRIDES_FILE", "bundle_profile", "filter_datalist", "train_overrides"]


def bundle_profile(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The MONAI Label view of a bundle: model type, dimension, labels and the outputs besides ``pred``.

    The type is ``classification`` when the first output (``pred``) is class scores (``format: classes``), else
    ``segmentation``; the dimension is 3 for a CT input (the CT bundles' 2D-slice networks predict whole volumes),
    2 otherwise; the labels are the first output's channels without the background, or, for a classifier, the
    names of its ``post_processed_outputs`` (``probCOVID``, ``probSevere``).

    Args:
        path: the bundle folder.

    Returns:
        ``{"type", "dimension", "labels": {name: index}, "info": {"input": ..., "outputs": {...}}}``.

    Raises:
        FileNotFoundError: naming the file when the bundle has no ``configs/metadata.json``.
        ValueError: naming the file when it has no ``network_data_format`` inputs / outputs.

    Example:
        >>> bundle_profile("bundles/ctan_stoic")["labels"]  # doctest: +SKIP
        {'probCOVID': 0, 'probSevere': 1}
    """
    meta_file = Path(path) / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"bundle {str(path)!r} has no configs/metadata.json")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    fmt = meta.get("network_data_format", {})
    inputs, outputs = fmt.get("inputs", {}), fmt.get("outputs", {})
    if not inputs or not outputs:
        raise ValueError(f"{meta_file}: network_data_format needs inputs and outputs")
    image = next(iter(inputs.values()))
    pred_name, pred = next(iter(outputs.items()))
    classification = pred.get("format") == "classes"
    if classification:
        names = list(meta.get("post_processed_outputs") or fmt.get("post_processed_outputs") or {})
        if not names:
            names = [pred.get("channel_def", {}).get("0", pred_name)]
        labels = {n: i for i, n in enumerate(names)}
    else:
        labels = {v: int(k) for k, v in pred.get("channel_def", {}).items() if str(v).lower() != "background"}
    extra = {
        name: {
            "type": o.get("type"),
            "format": o.get("format"),
            "channels": list(o.get("channel_def", {}).values()),
            "in_response": f"result JSON ({'dose' if o.get('format') == 'magnitude' else 'diagnosis'})",
        }
        for name, o in outputs.items()
        if name != pred_name and not classification
    }
    return {
        "type": "classification" if classification else "segmentation",
        "dimension": 3 if str(image.get("modality", "")).upper() == "CT" else 2,
        "labels": labels,
        "info": {
            "input": {"modality": image.get("modality"), "format": image.get("format")},
            "outputs": extra,
        },
    }


#: A bundle's overrides of ``train.yaml`` for training from MONAI Label's datastore.
TRAIN_OVERRIDES_FILE = "monailabel_train.yaml"


def train_overrides(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A bundle's ``configs/monailabel_train.yaml`` (config id -> value), or None when it has none.

    Args:
        path: the bundle folder.

    Returns:
        the overrides, or None.

    Raises:
        ValueError: naming the file when it is not a mapping.

    Example:
        >>> sorted(train_overrides("bundles/ctan_openkbp"))[:2]  # doctest: +SKIP
        ['output_dir', 'resume']
    """
    import yaml

    file = Path(path) / "configs" / TRAIN_OVERRIDES_FILE
    if not file.is_file():
        return None
    overrides = yaml.safe_load(file.read_text(encoding="utf-8"))
    if not isinstance(overrides, dict):
        raise ValueError(f"{file}: expected a mapping of config ids to values, got {type(overrides).__name__}")
    return overrides


def filter_datalist(datalist: list[dict[str, Any]], pattern: str) -> list[dict[str, Any]]:
    """The datastore items whose image file name matches ``pattern`` (``fnmatch``; ``*`` keeps all).

    Args:
        datalist: ``[{"image": path, "label": path}, ...]``.
        pattern: a file-name pattern, e.g. ``okbp_*``.

    Returns:
        the matching items.

    Example:
        >>> filter_datalist([{"image": "/s/okbp_1.nii.gz"}, {"image": "/s/ham_1.png"}], "okbp_*")
        [{'image': '/s/okbp_1.nii.gz'}]
    """
    return [d for d in datalist if fnmatch.fnmatch(Path(str(d["image"])).name, pattern)]
