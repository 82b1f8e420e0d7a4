"""DICOM-RT (CT series + RTSTRUCT + RTDOSE) reading and conversion to NIfTI for the prostate bundle.

Modules, one job each: ``discovery`` (group files into studies by tags), ``pixels`` (decoding, compressed syntaxes),
``ct_series`` (CT volume with its geometry), ``rtstruct`` (contours to masks), ``rtdose`` (dose in Gy on the CT
grid), ``synonyms`` (ROI name matching), ``body`` (body mask), ``inputs`` (CT series of a folder for inference),
``convert`` (NIfTI + manifest + report; the CLI is ``python -m ctan_monai.data.dicom_rt convert``).
"""

from ctan_monai.utils.lazy import lazy_exports

# Read from the source by ctan_monai.zoo (keep it a literal): submodule -> the names it exports.
_EXPORTS = {
    "body": ["body_mask_from_ct"],
    "convert": ["CaseConversionError", "ConversionResult", "convert_dicom_rt", "convert_study"],
    "ct_series": ["DicomSeriesError", "read_ct_series"],
    "inputs": ["find_ct_series", "ras_affine"],
    "discovery": ["DicomFile", "DicomRTStudy", "DicomSeries", "find_studies", "scan_dicom_files"],
    "pixels": ["DicomDecodeError", "check_decodable", "pixel_array"],
    "rtdose": ["DoseUnitsError", "dose_support", "read_rtdose", "resample_dose"],
    "rtstruct": ["RTStruct", "RTStructROI", "rasterise_contours", "read_rtstruct"],
    "synonyms": [
        "BODY_SYNONYMS",
        "DEFAULT_SYNONYMS",
        "PROSTATE_ORGANS",
        "THORAX_ORGANS",
        "build_synonym_table",
        "load_synonyms",
        "match_rois",
        "normalise_roi_name",
    ],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
