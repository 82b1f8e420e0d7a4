"""The prostate bundle's dataset: DICOM-RT exports converted to the training layout (by
:mod:`ctan_monai.data.dicom_rt`), everything else of this dataset in one place.

Modules: ``demo`` (a synthetic DICOM-RT export), ``prepare`` (conversion, cache, datalists, case loading),
``inference`` (a DICOM CT series or a volume in, the label map and dose out).
"""
