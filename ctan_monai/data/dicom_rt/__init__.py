"""DICOM-RT (CT series + RTSTRUCT + RTDOSE) reading and conversion to NIfTI for the prostate bundle.

Modules, one job each: ``discovery`` (group files into studies by tags), ``pixels`` (decoding, compressed syntaxes),
``ct_series`` (CT volume with its geometry), ``rtstruct`` (contours to masks), ``rtdose`` (dose in Gy on the CT
grid), ``synonyms`` (ROI name matching), ``body`` (body mask), ``convert`` (NIfTI + manifest + report; the CLI is
``python -m ctan_monai.data.dicom_rt convert``).
"""

from ctan_monai.data.dicom_rt.body import body_mask_from_ct
from ctan_monai.data.dicom_rt.convert import CaseConversionError, ConversionResult, convert_dicom_rt, convert_study
from ctan_monai.data.dicom_rt.ct_series import DicomSeriesError, read_ct_series
from ctan_monai.data.dicom_rt.discovery import DicomFile, DicomRTStudy, DicomSeries, find_studies, scan_dicom_files
from ctan_monai.data.dicom_rt.pixels import DicomDecodeError, check_decodable, pixel_array
from ctan_monai.data.dicom_rt.rtdose import DoseUnitsError, dose_support, read_rtdose, resample_dose
from ctan_monai.data.dicom_rt.rtstruct import RTStruct, RTStructROI, rasterise_contours, read_rtstruct
from ctan_monai.data.dicom_rt.synonyms import (
    BODY_SYNONYMS,
    DEFAULT_SYNONYMS,
    PROSTATE_ORGANS,
    THORAX_ORGANS,
    build_synonym_table,
    load_synonyms,
    match_rois,
    normalise_roi_name,
)

__all__ = [
    "BODY_SYNONYMS",
    "DEFAULT_SYNONYMS",
    "PROSTATE_ORGANS",
    "THORAX_ORGANS",
    "CaseConversionError",
    "ConversionResult",
    "DicomDecodeError",
    "DicomFile",
    "DicomRTStudy",
    "DicomSeries",
    "DicomSeriesError",
    "DoseUnitsError",
    "RTStruct",
    "RTStructROI",
    "body_mask_from_ct",
    "build_synonym_table",
    "check_decodable",
    "convert_dicom_rt",
    "convert_study",
    "dose_support",
    "find_studies",
    "load_synonyms",
    "match_rois",
    "normalise_roi_name",
    "pixel_array",
    "rasterise_contours",
    "read_ct_series",
    "read_rtdose",
    "read_rtstruct",
    "resample_dose",
    "scan_dicom_files",
]
