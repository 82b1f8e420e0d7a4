"""Readers, validation, datalists, transforms and synthetic demo writers for the four datasets."""

from ctan_monai.data.samplers import RandomSubsetSampler, WeightedSubsetSampler
from ctan_monai.data.validation import DataProblem, DatasetValidationError, ValidationReport

__all__ = ["DataProblem", "DatasetValidationError", "RandomSubsetSampler", "ValidationReport", "WeightedSubsetSampler"]
