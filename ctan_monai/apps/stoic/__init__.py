"""STOIC2021 chest CT: labels, datalists, validation, lung preprocessing, and 2.5D / 3D datasets.

On-disk layout (as published by STOIC2021)::

    <root>/data/mha/<PatientID>.mha        chest CT, Hounsfield units
    <root>/metadata/reference.csv          PatientID,probCOVID,probSevere  (0/1; empty = unknown)

Tasks: ``covid`` (COVID-19 positive) and ``severe`` (intubation or death within one month), both binary and
image level. An empty label cell is a *missing* label (``<task>_present = 0``), never a negative.

Preprocessing (``preprocess_volume``), our documented choices:

1. resample (linear) onto an axis-aligned grid at ``spacing`` (default 1.5 x 1.5 x 2 mm, x/y/z), so that flipped or
   tilted acquisitions end up in one orientation;
2. body mask: voxels above -500 HU; an in-plane opening (radius ``BODY_OPENING_MM``) detaches the scanner table; the
   largest 3D connected component is the body, and its per-slice convex hull is "inside the patient";
3. lung mask: air (-500 HU or less) enclosed by denser tissue within its own axial slice (un-opened, so thin chest
   walls still enclose) and inside the body hull; of its 3D connected components the two largest are kept when
   each is at least 10 % of the largest (bowel gas and the air under the table drop out), then holes are filled
   slice by slice so that dense lesions inside the lungs count as lung;
4. crop: in-plane to the body's bounding box, axially to the lungs' extent, each with a margin, then padded with air
   to a square in-plane so that a later resize keeps the aspect ratio.

The cache keeps HU (int16) rather than the windowed intensities: the lung window (default -1000..400 HU to [0, 1]) is
applied on load by ``ScaleIntensityRanged``, so that it can be changed without reconverting. Inference reads the
original file and runs the same preprocessing on the fly (``LoadStoicCTd``, ``stoic_transform(source="original")``).

2.5D centre slices: axial slices whose lung area (from the lung mask above) is at least ``min_area_fraction``
(default 0.25) of the largest slice's, with a neighbour on both sides.

Modules: ``labels`` (reference.csv, datalists), ``checks`` (up-front validation), ``preprocessing``, ``conversion``
(the NIfTI cache), ``transforms`` (on-the-fly loading, 2.5D slabs, the input chain), ``datasets``, ``demo`` (synthetic
CTs), ``prepare`` (the bundle's data preparation), ``inference``.
"""

from ctan_monai.utils.lazy import lazy_exports

# Read from the source by ctan_monai.zoo (keep it a literal): submodule -> the names it exports.
_EXPORTS = {
    "checks": ["check_header", "intensity_problems", "read_checked_volume", "validate_dataset"],
    "conversion": ["convert_dataset"],
    "datasets": ["Stoic25DDataset", "Stoic3DDataset", "aggregate_patient_probabilities"],
    "labels": [
        "LABEL_COLUMNS",
        "build_datalist",
        "case_sort_key",
        "datalist_entry",
        "find_stoic_root",
        "read_reference",
    ],
    "preprocessing": [
        "CROP_MARGIN_MM",
        "DEFAULT_SPACING",
        "MIN_LUNG_AREA_FRACTION",
        "PreprocessedCT",
        "evenly_spaced",
        "lung_slice_candidates",
        "preprocess_volume",
        "preprocess_with_lung_slices",
        "select_lung_slices",
    ],
    "transforms": ["LABEL_KEYS", "LUNG_WINDOW", "LoadStoicCTd", "SampleAxialSlabsd", "stoic_transform"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
