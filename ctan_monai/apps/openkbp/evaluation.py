"""OpenKBP's part of the evaluation: the structures the official DVH score is computed on."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctan_monai.apps.openkbp.reader import read_patient

__all__ = ["openkbp_dvh_structures"]


def openkbp_dvh_structures(case: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Sequence[float]] | None:
    """All OpenKBP structures (OARs and PTVs) of a case, read from its source patient folder, for the DVH score.

    Args:
        case: a batch/manifest entry with ``source`` (the patient folder) and ``spacing``.

    Returns:
        ``(masks, spacing)``, or None when the entry has no source folder.

    Example:
        >>> openkbp_dvh_structures({"source": None}) is None
        True
    """
    source = case.get("source")
    if not source or not os.path.isdir(str(source)):
        return None
    patient = read_patient(str(source))
    return dict(patient.structures), patient.voxel_size_mm
