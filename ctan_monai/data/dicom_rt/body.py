"""The patient's body on a CT grid, for the dose mask when an RTSTRUCT has no external contour."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["body_mask_from_ct"]


def body_mask_from_ct(ct: np.ndarray, threshold_hu: float = -400.0) -> np.ndarray:
    """Body mask of a CT volume: tissue above ``threshold_hu``, largest connected part, holes filled per slice.

    An opening first cuts thin bridges to the couch; holes (lungs, bowel gas) are filled slice by slice, since in 3D
    the airways connect them to the outside.

    Args:
        ct: CT in HU, [z, y, x].
        threshold_hu: tissue threshold; air is about -1000 HU, fat about -100 HU.

    Returns:
        a bool array of ``ct``'s shape (all False for a CT without tissue).

    Example:
        >>> ct = np.full((3, 15, 15), -1000.0)
        >>> ct[:, 3:12, 3:12] = 40.0
        >>> ct[:, 7, 7] = -900.0  # a hole inside the body
        >>> int(body_mask_from_ct(ct).sum())
        243
    """
    tissue = ndimage.binary_opening(ct > threshold_hu, structure=np.ones((1, 3, 3), dtype=bool))
    labels, count = ndimage.label(tissue)
    if count == 0:
        return tissue
    sizes = ndimage.sum_labels(tissue, labels, index=np.arange(1, count + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    return np.stack([ndimage.binary_fill_holes(layer) for layer in body])
