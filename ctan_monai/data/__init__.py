"""Generic data pieces: validation reports, samplers, 2D slices of NIfTI volumes (``slices``), checks of an inference
input (``inputs``) and the DICOM-RT format (``dicom_rt``). Each dataset's own code is in ``ctan_monai.apps.<dataset>``.
"""

from ctan_monai.data.samplers import RandomSubsetSampler, WeightedSubsetSampler
from ctan_monai.data.validation import DataProblem, DatasetValidationError, ValidationReport

__all__ = ["DataProblem", "DatasetValidationError", "RandomSubsetSampler", "ValidationReport", "WeightedSubsetSampler"]
