"""ROI name matching: organ names of a config to the free-text ROI names of clinical RTSTRUCTs."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

import yaml

__all__ = [
    "DEFAULT_SYNONYMS",
    "PROSTATE_ORGANS",
    "THORAX_ORGANS",
    "BODY_SYNONYMS",
    "normalise_roi_name",
    "build_synonym_table",
    "load_synonyms",
    "match_rois",
]

PROSTATE_ORGANS: tuple[str, ...] = ("Rectum", "Bladder", "Femur_L", "Femur_R")
THORAX_ORGANS: tuple[str, ...] = ("HEART", "SPINALCORD", "LUNG_L", "LUNG_R")

# Our default table, from names seen in clinical exports and the TG-263 nomenclature. Matching ignores case and
# separators (see normalise_roi_name), so "FEMUR_L", "femur l" and "Femur-L" need no entries of their own.
DEFAULT_SYNONYMS: dict[str, list[str]] = {
    "Rectum": ["Rectum", "Rectum_wall-free", "Rectum_Wall", "Rect", "Rectum_OAR"],
    "Bladder": ["Bladder", "Urinary_Bladder", "Bladder_wall-free", "Bladder_Wall", "Blad", "Bladder_OAR"],
    "Femur_L": [
        "Femur_L",
        "FemoralHead_L",
        "Femoral_Head_L",
        "Femur_Head_L",
        "FemurHead_L",
        "Lt Femoral Head",
        "Left Femoral Head",
        "Femur_Lt",
        "Lt Femur",
        "Left Femur",
        "Femur Left",
        "L Femur",
        "L Femoral Head",
    ],
    "Femur_R": [
        "Femur_R",
        "FemoralHead_R",
        "Femoral_Head_R",
        "Femur_Head_R",
        "FemurHead_R",
        "Rt Femoral Head",
        "Right Femoral Head",
        "Femur_Rt",
        "Rt Femur",
        "Right Femur",
        "Femur Right",
        "R Femur",
        "R Femoral Head",
    ],
    "HEART": ["Heart", "Coeur"],
    "SPINALCORD": ["SpinalCord", "Spinal_Cord", "Cord", "SpinalCanal"],
    "LUNG_L": ["Lung_L", "Lt Lung", "Left Lung", "Lung Left", "L Lung", "Lung_Lt"],
    "LUNG_R": ["Lung_R", "Rt Lung", "Right Lung", "Lung Right", "R Lung", "Lung_Rt"],
}

# Names of the external contour, used for the dose mask when present.
BODY_SYNONYMS: tuple[str, ...] = ("BODY", "External", "EXTERNAL_ROI", "Outline", "Skin", "Patient", "Body_Contour")

_SEPARATORS = re.compile(r"[\s_\-.]+")


def normalise_roi_name(name: str) -> str:
    """Canonical form of an ROI name for matching: lower case, without spaces, underscores, hyphens and dots.

    Args:
        name: a free-text ROI name.

    Returns:
        the normalised name.

    Example:
        >>> normalise_roi_name(" Lt Femoral-Head ")
        'ltfemoralhead'
    """
    return _SEPARATORS.sub("", str(name).strip().casefold())


def build_synonym_table(
    organs: Sequence[str], extra: Mapping[str, Iterable[str]] | None = None
) -> dict[str, list[str]]:
    """The synonyms of each organ: the organ's own name, the default table's entries, then ``extra``'s.

    Organs are looked up in the default table and in ``extra`` by normalised name, so ``"heart"`` finds ``"HEART"``.

    Args:
        organs: the organs of the label map, in label order (label i = organs[i - 1]).
        extra: additional synonyms per organ (e.g. from a YAML file); they extend, not replace, the defaults.

    Returns:
        an ordered mapping organ -> synonyms (earlier synonyms win when an RTSTRUCT has several matching ROIs).

    Raises:
        ValueError: when ``organs`` is empty or repeats an organ, or one synonym would name two organs.

    Example:
        >>> build_synonym_table(["Rectum"], {"Rectum": ["RECTUM_PRV0"]})["Rectum"][-1]
        'RECTUM_PRV0'
    """
    if not organs:
        raise ValueError("at least one organ must be given")
    keys = [normalise_roi_name(o) for o in organs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"organs repeat (names compare case- and separator-insensitively): {list(organs)}")
    sources = [DEFAULT_SYNONYMS, dict(extra or {})]
    table: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for organ in organs:
        names = [organ]
        for source in sources:
            for key, values in source.items():
                if normalise_roi_name(key) == normalise_roi_name(organ):
                    names.extend([values] if isinstance(values, str) else list(values))
        table[organ] = []
        for name in names:
            norm = normalise_roi_name(name)
            if owner.get(norm, organ) != organ:
                raise ValueError(f"ROI synonym {name!r} is given for both {owner[norm]!r} and {organ!r}")
            owner[norm] = organ
            if name not in table[organ]:
                table[organ].append(str(name))
    return table


def load_synonyms(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read extra synonyms from a YAML file mapping each organ to a list of ROI names.

    Args:
        path: YAML file, e.g. ``{"Rectum": ["RECTUM_PRV0", "Rektum"], "Bladder": ["Vessie"]}``.

    Returns:
        the mapping organ -> list of names.

    Raises:
        ValueError: naming the file when it is not such a mapping.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "syn.yaml"
        >>> _ = p.write_text("Rectum: [Rektum]")
        >>> load_synonyms(p)
        {'Rectum': ['Rektum']}
    """
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: synonyms must be a mapping organ -> list of ROI names, got {type(data).__name__}")
    table: dict[str, list[str]] = {}
    for organ, names in data.items():
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise ValueError(f"{path}: synonyms of {organ!r} must be a list of ROI names, got {names!r}")
        table[str(organ)] = [str(n) for n in names]
    return table


def match_rois(roi_names: Iterable[str], table: Mapping[str, Sequence[str]]) -> dict[str, str | None]:
    """Pick, for each organ, the ROI of an RTSTRUCT that it names.

    Args:
        roi_names: the ROI names of one RTSTRUCT.
        table: organ -> synonyms, as built by :func:`build_synonym_table`; the first synonym that matches wins.

    Returns:
        organ -> the matched ROI name as written in the RTSTRUCT, or None when no ROI matches.

    Example:
        >>> table = build_synonym_table(["Rectum", "Femur_L"])
        >>> match_rois(["RECTUM", "Lt Femoral Head", "PTV"], table)
        {'Rectum': 'RECTUM', 'Femur_L': 'Lt Femoral Head'}
    """
    by_norm: dict[str, str] = {}
    for name in roi_names:
        by_norm.setdefault(normalise_roi_name(name), name)
    matched: dict[str, str | None] = {}
    for organ, synonyms in table.items():
        matched[organ] = next((by_norm[n] for n in map(normalise_roi_name, synonyms) if n in by_norm), None)
    return matched
