"""Up-front checks of STOIC volumes: header (size, spacing, axial orientation), intensities (Hounsfield units of a
chest CT), and the whole dataset at once."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctan_monai.apps.stoic.labels import case_sort_key, find_stoic_root, read_reference
from ctan_monai.data.validation import DatasetValidationError, ValidationReport

__all__ = ["check_header", "intensity_problems", "read_checked_volume", "validate_dataset", "volume_read_problem"]

# Plausibility limits of a chest CT; outside them the file is reported, not trained on.
IN_PLANE_SPACING_MM = (0.2, 5.0)
SLICE_SPACING_MM = (0.2, 10.0)
MIN_IN_PLANE_VOXELS = 32
MIN_SLICES = 3  # a 2.5D sample needs slices z-1, z, z+1
AIR_PERCENTILE_MAX_HU = -500.0  # the 1st percentile must be air (lungs, outside the body)
TISSUE_PERCENTILE_MIN_HU = -200.0  # the 99th percentile must be soft tissue or bone
HU_LIMITS = (-4000.0, 40000.0)  # anything beyond is not a Hounsfield unit


# MetaImage element types and their sizes in bytes (MetaIO's metaTypes.h)
_MET_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
_META_HEADER_MAX = 1 << 16  # a MetaImage header is a few hundred bytes of "Key = Value" lines


def _metaimage_problem(path: Path) -> str | None:
    """What is wrong with a MetaImage file (``.mha`` / ``.mhd``) that ITK cannot read, from its header and size;
    None when nothing is found."""
    with open(path, "rb") as handle:
        head = handle.read(_META_HEADER_MAX)
    size = path.stat().st_size
    fields: dict[str, str] = {}
    header_end = None
    offset = 0
    for raw in head.splitlines(keepends=True):
        offset += len(raw)
        key, sep, value = raw.decode("latin-1").partition("=")
        if not sep:
            break
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            header_end = offset
            break
    if not fields:
        return "not a MetaImage file: it does not start with 'Key = Value' header lines (corrupt, or not a .mha)"
    missing = [k for k in ("NDims", "DimSize", "ElementType", "ElementDataFile") if k not in fields]
    if missing:
        return f"the MetaImage header is incomplete (no {', '.join(missing)}): the file is cut short or corrupt"
    if fields["ElementDataFile"] != "LOCAL":
        data_file = path.parent / fields["ElementDataFile"]
        return None if data_file.is_file() else f"its voxel file {data_file} (ElementDataFile) does not exist"
    data_bytes = size - int(header_end or 0)
    try:
        dims = [int(d) for d in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        compressed = fields.get("CompressedData", "False").lower() == "true"
        packed = int(fields["CompressedDataSize"]) if "CompressedDataSize" in fields else None
    except ValueError:
        return f"the MetaImage header has unreadable sizes (DimSize = {fields['DimSize']!r}): the file is corrupt"
    if compressed:
        if packed is not None and data_bytes < packed:
            return f"the compressed voxel data is cut short: {data_bytes} of {packed} bytes (a truncated copy?)"
        return "the compressed voxel data cannot be decompressed: the file is corrupt"
    if fields["ElementType"] not in _MET_BYTES:
        return f"unknown ElementType {fields['ElementType']!r} in the MetaImage header"
    expected = int(np.prod(dims)) * channels * _MET_BYTES[fields["ElementType"]]
    if data_bytes < expected:
        return f"the voxel data is cut short: {data_bytes} of {expected} bytes (a truncated copy?)"
    return None


def volume_read_problem(path: str | os.PathLike[str], error: BaseException) -> str:
    """Why SimpleITK could not read a volume file that exists, in words (not ITK's, whose "Reason: No such file or
    directory" only says that its read failed).

    For MetaImage files (``.mha`` / ``.mhd``) the header and the file size say what is wrong: a header cut short or
    missing fields, voxel data shorter than the header's size, compressed data that does not decompress.

    Args:
        path: the file.
        error: SimpleITK's error.

    Returns:
        the problem, e.g. ``"corrupt or truncated file: the voxel data is cut short: 2048 of 4096 bytes (...)"``.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "1.mha"
        >>> header = b"NDims = 3\\nDimSize = 4 4 4\\nElementType = MET_SHORT\\nElementDataFile = LOCAL\\n"
        >>> _ = f.write_bytes(header + bytes(10))
        >>> volume_read_problem(f, RuntimeError("Reason: No such file or directory"))
        'corrupt or truncated file: the voxel data is cut short: 10 of 128 bytes (a truncated copy?)'
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes)"
        detail = _metaimage_problem(path) if path.suffix.lower() in (".mha", ".mhd") else None
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if detail is None:
        # ITK's own words, less what misleads: the object address and the errno of a read that merely failed
        lines = [line.strip() for line in str(error).strip().splitlines()]
        lines = [line for line in lines if line and not line.startswith(("Reason:", "Exception thrown in"))]
        detail = re.sub(r"\(0x[0-9a-f]+\)", "", lines[-1]) if lines else "SimpleITK cannot read it"
    return f"corrupt or truncated file: {detail}"


def check_header(path: Path, case: str, report: ValidationReport) -> bool:
    """Check a volume's header (size, spacing, orientation, pixel type) without reading its voxels.

    Args:
        path: the volume file.
        case: the case id named in problems.
        report: where problems are recorded.

    Returns:
        True when the header is that of a plausible axial chest CT.

    Example:
        >>> ok = check_header(Path("1.mha"), "1", ValidationReport("stoic"))  # doctest: +SKIP
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        report.add(str(path), f"unreadable volume: {volume_read_problem(path, err)}", case)
        return False
    problems = []
    if reader.GetDimension() != 3:
        problems.append(f"expected a 3D volume, got {reader.GetDimension()}D")
    elif reader.GetNumberOfComponents() != 1:
        problems.append(f"expected one component per voxel, got {reader.GetNumberOfComponents()}")
    else:
        size, spacing = reader.GetSize(), reader.GetSpacing()
        if min(size[:2]) < MIN_IN_PLANE_VOXELS or size[2] < MIN_SLICES:
            problems.append(f"size {size} too small for a chest CT (>= {MIN_IN_PLANE_VOXELS}^2 x {MIN_SLICES})")
        low, high = IN_PLANE_SPACING_MM
        if not all(low <= s <= high for s in spacing[:2]):
            problems.append(f"implausible in-plane spacing {spacing[:2]} mm (expected {low}..{high})")
        low, high = SLICE_SPACING_MM
        if not low <= spacing[2] <= high:
            problems.append(f"implausible slice spacing {spacing[2]} mm (expected {low}..{high})")
        # The third image axis must run head-foot, or "axial slices" would be something else.
        if abs(reader.GetDirection()[8]) < 0.9:
            problems.append(f"third axis is not the head-foot axis (direction {reader.GetDirection()}): not axial")
    for message in problems:
        report.add(str(path), message, case)
    return not problems


def intensity_problems(hu: np.ndarray) -> list[str]:
    """What makes an HU array implausible for a chest CT.

    Args:
        hu: the voxels, any shape.

    Returns:
        the problems in words (empty when plausible).

    Example:
        >>> intensity_problems(np.full((4, 4, 4), 40.0))[0].startswith("no air")
        True
    """
    if hu.size == 0 or not np.isfinite(hu).all():
        return ["voxels are empty or not finite"]
    low, high = float(hu.min()), float(hu.max())
    if low < HU_LIMITS[0] or high > HU_LIMITS[1]:
        return [f"intensities {low:.0f}..{high:.0f} are not Hounsfield units (expected within {HU_LIMITS})"]
    # Percentiles on a strided subsample: cheap and robust to a few outlier voxels.
    p1, p99 = np.percentile(hu.ravel()[:: max(1, hu.size // 200_000)], [1, 99])
    problems = []
    if p1 > AIR_PERCENTILE_MAX_HU:
        problems.append(f"no air: 1st HU percentile is {p1:.0f} (> {AIR_PERCENTILE_MAX_HU:.0f}); not HU, or no lungs?")
    if p99 < TISSUE_PERCENTILE_MIN_HU:
        problems.append(f"no tissue: 99th HU percentile is {p99:.0f} (< {TISSUE_PERCENTILE_MIN_HU:.0f})")
    return problems


def validate_dataset(root: str | os.PathLike[str], check_intensities: bool = True) -> ValidationReport:
    """Check every case of a STOIC dataset and report every problem at once.

    Labels are checked as in ``read_reference``. For each labelled patient: the file exists and its header reads
    (size, spacing, axial orientation, one component; header only, fast); with ``check_intensities`` the voxels are
    read too and must look like a chest CT in Hounsfield units (air and tissue present, values in range), which also
    catches truncated files. Images without a row in reference.csv are ignored (they have no labels).

    Args:
        root: the dataset folder (see ``find_stoic_root``).
        check_intensities: also read the voxels (slower: a full read per case).

    Returns:
        the report; ``valid_cases`` lists the patients without problems.

    Raises:
        FileNotFoundError: when ``root`` holds no STOIC dataset.

    Example:
        >>> report = validate_dataset("stoic2021")  # doctest: +SKIP
        >>> report.raise_if_problems()  # doctest: +SKIP
    """
    root = find_stoic_root(root)
    report = ValidationReport(str(root))
    labels = read_reference(root / "metadata" / "reference.csv", report)
    for case in sorted(labels, key=case_sort_key):
        if all(value is None for value in labels[case].values()):
            report.add(str(root / "metadata" / "reference.csv"), "no label for any task", case)
            continue
        path = root / "data" / "mha" / f"{case}.mha"
        if not path.is_file():
            report.add(str(path), "image file not found (listed in reference.csv)", case)
            continue
        if not check_header(path, case, report) or not check_intensities:
            continue
        try:
            volume = sitk.ReadImage(str(path))
        except RuntimeError as err:
            report.add(str(path), f"voxels unreadable: {volume_read_problem(path, err)}", case)
            continue
        for message in intensity_problems(sitk.GetArrayViewFromImage(volume)):
            report.add(str(path), message, case)
    bad = set(report.bad_cases())
    report.valid_cases = [c for c in sorted(labels, key=case_sort_key) if c not in bad]
    return report


def read_checked_volume(path: str | os.PathLike[str], case: str | None = None) -> sitk.Image:
    """Read one chest CT after checking it as ``validate_dataset`` does (header, then intensities).

    Args:
        path: the volume file (.mha, or any format SimpleITK reads).
        case: the case id to name in problems (the file name's stem when ``None``).

    Returns:
        the volume.

    Raises:
        DatasetValidationError: listing every problem of the file (missing, unreadable, implausible geometry or
            intensities), each naming the file.

    Example:
        >>> image = read_checked_volume("stoic2021/data/mha/1.mha")  # doctest: +SKIP
    """
    path = Path(path)
    case = path.name.split(".")[0] if case is None else case
    report = ValidationReport(str(path))
    if not path.is_file():
        report.add(str(path), "image file not found", case)
    elif check_header(path, case, report):
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            report.add(str(path), f"voxels unreadable: {volume_read_problem(path, err)}", case)
        else:
            for message in intensity_problems(sitk.GetArrayViewFromImage(image)):
                report.add(str(path), message, case)
            if report.ok:
                return image
    raise DatasetValidationError(report.problems, str(path))
