"""OpenKBP sparse CSV files: the constants of the format, reading a patient (with its checks), the affine, label
maps, and writing patients and dose CSVs (the layout and decisions are in :mod:`ctan_monai.apps.openkbp`)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctan_monai.data.validation import (
    MAX_PLAUSIBLE_DOSE_GY,
    DataProblem,
    DatasetValidationError,
    implausible_dose_problem,
)
from ctan_monai.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

GRID_SHAPE: tuple[int, int, int] = (128, 128, 128)
AXIAL_AXIS = 2
CT_RANGE: tuple[float, float] = (0.0, 4095.0)
OAR_NAMES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
TARGET_NAMES = ("PTV56", "PTV63", "PTV70")
STRUCTURE_NAMES = OAR_NAMES + TARGET_NAMES
DEFAULT_STRUCTURES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid")
SPLITS = ("train-pats", "validation-pats", "test-pats")
CSV_HEADER = ",data"
_MAX_LISTED = 3  # rows quoted per kind of problem; the count of the rest is given


class OpenKBPDataWarning(UserWarning):
    """A patient's files are usable but inconsistent (e.g. dose above 0 outside the possible-dose mask)."""


@dataclass
class OpenKBPPatient:
    """One OpenKBP patient on the ``[row, column, slice]`` grid (see the module docstring for the orientation).

    Args:
        id: the patient folder name, e.g. ``"pt_1"``.
        ct: float32 CT grey values clipped to ``CT_RANGE`` (0 = air).
        dose: float32 dose in Gy, or None when the patient has no ``dose.csv`` (challenge test patients).
        possible_dose_mask: bool mask of the voxels that may receive dose.
        structures: structure name -> bool mask, only for the structures whose file exists.
        voxel_size_mm: voxel size in mm along axes 0, 1, 2.
        folder: the patient folder read.

    Example:
        >>> grid = (2, 2, 2)
        >>> p = OpenKBPPatient("pt_1", np.zeros(grid, np.float32), None, np.ones(grid, bool), {}, (3.9, 3.9, 2.5))
        >>> p.shape
        (2, 2, 2)
    """

    id: str
    ct: np.ndarray
    dose: np.ndarray | None
    possible_dose_mask: np.ndarray
    structures: dict[str, np.ndarray]
    voxel_size_mm: tuple[float, float, float]
    folder: Path | None = field(default=None, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid shape."""
        return tuple(self.ct.shape)

    @property
    def affine(self) -> np.ndarray:
        """The 4 x 4 voxel-to-RAS affine of the grid (see ``openkbp_affine``)."""
        return openkbp_affine(self.voxel_size_mm, self.shape)


# ----------------------------------------------------------------------------------------------------------- reading
def _describe_lines(rows: np.ndarray, column: pd.Series | None = None) -> str:
    """``line 5 ('abc'), line 9 ('x') and 3 more`` for 0-based data rows (the header is line 1)."""
    parts = []
    for row in rows[:_MAX_LISTED]:
        text = f"line {int(row) + 2}"
        if column is not None:
            text += f" ({str(column.iloc[int(row)])!r})"
        parts.append(text)
    more = len(rows) - _MAX_LISTED
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def _parse_column(column: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numbers of a CSV column: ``(values as float64, bool rows that are empty, bool rows that are not numbers)``.

    The fast path is pandas' own parsing; a column pandas could not read as numbers (only in bad files) is converted
    row by row to find the rows at fault.
    """
    if pd.api.types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, np.isnan(values), np.zeros(len(values), dtype=bool)
    raw = column.to_numpy(dtype=object)
    values = np.full(len(raw), np.nan)
    empty = np.zeros(len(raw), dtype=bool)
    bad = np.zeros(len(raw), dtype=bool)
    for row, text in enumerate(raw):
        if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
            empty[row] = True
            continue
        try:
            values[row] = float(text)
        except ValueError:
            bad[row] = True
    return values, empty, bad


def _read_table(path: Path) -> tuple[pd.DataFrame | None, list[str]]:
    """Check the header and the last line, then parse the rows; returns ``(table or None, problems)``."""
    try:
        with open(path, "rb") as stream:
            header = stream.readline().decode("utf-8-sig", errors="replace").strip()
            stream.seek(0, os.SEEK_END)
            size = stream.tell()
            stream.seek(max(size - 1, 0))
            ends_with_newline = stream.read(1) == b"\n"
    except OSError as err:
        return None, [f"cannot be read: {err}"]
    if size == 0:
        return None, [f"is empty (expected the header {CSV_HEADER!r} and one row per voxel)"]
    if header != CSV_HEADER:
        return None, [f"has header {header[:40]!r}, expected {CSV_HEADER!r} (is this an OpenKBP CSV file?)"]
    problems = [] if ends_with_newline else ["the last line is incomplete (no final newline): the file looks truncated"]
    try:
        table = pd.read_csv(
            path,
            header=None,
            skiprows=1,
            # A third column catches rows with extra fields (pandas would otherwise take the first as a row label).
            names=["index", "data", "extra"],
            index_col=False,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,  # keeps line numbers right; a blank line is reported as a row without an index
            engine="c",
        )
    except pd.errors.EmptyDataError:
        table = pd.DataFrame({k: np.empty(0, np.float64) for k in ("index", "data", "extra")})
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as err:
        return None, problems + [f"cannot be parsed as 'index,value' rows: {str(err).strip()}"]
    if len(table) == 0:
        problems.append("lists no voxels (only the header): the file looks truncated")
    extra = np.flatnonzero(table["extra"].notna().to_numpy())
    if len(extra):
        problems.append(f"rows with more than two fields: {_describe_lines(extra)}")
    return table, problems


def _check_indices(column: pd.Series, n_voxels: int, grid_text: str) -> tuple[np.ndarray, list[str]]:
    """Flat voxel indices (-1 where unusable) and the problems: missing, not integers, outside the grid, repeated."""
    problems = []
    values, empty, bad = _parse_column(column)
    if empty.any():
        problems.append(f"rows without a voxel index: {_describe_lines(np.flatnonzero(empty))}")
    bad |= np.isfinite(values) & (values != np.round(values))
    if bad.any():
        problems.append(f"voxel indices that are not integers: {_describe_lines(np.flatnonzero(bad), column)}")
    usable = np.isfinite(values) & ~bad
    out_of_range = usable & ((values < 0) | (values >= n_voxels))
    if out_of_range.any():
        problems.append(
            f"voxel indices outside the {grid_text} grid (0..{n_voxels - 1}): "
            f"{_describe_lines(np.flatnonzero(out_of_range), column)}"
        )
    indices = np.where(usable & ~out_of_range, values, -1).astype(np.int64)
    sorted_indices = np.sort(indices[indices >= 0])
    repeated = sorted_indices[1:][sorted_indices[1:] == sorted_indices[:-1]]
    if len(repeated):
        repeated = np.unique(repeated)
        listed = ", ".join(str(int(i)) for i in repeated[:_MAX_LISTED])
        problems.append(f"{len(repeated)} voxel index(es) listed more than once, e.g. {listed}")
    return indices, problems


def _check_values(
    column: pd.Series, kind: str, max_dose_gy: float | None = None
) -> tuple[np.ndarray | None, list[str]]:
    """The value column (None for masks) and its problems: masks must be empty, values finite (dose not negative nor
    above ``max_dose_gy`` when given, CT not negative)."""
    values, empty, bad = _parse_column(column)
    if kind == "mask":
        if empty.all():
            return None, []
        rows = _describe_lines(np.flatnonzero(~empty), column)
        return None, [f"a mask file must leave the data column empty, but rows have values: {rows}"]
    problems = []
    if empty.any():
        problems.append(f"rows without a value (a truncated file?): {_describe_lines(np.flatnonzero(empty))}")
    if bad.any():
        problems.append(f"values that are not numbers: {_describe_lines(np.flatnonzero(bad), column)}")
    nonfinite = ~np.isfinite(values) & ~empty & ~bad
    if nonfinite.any():
        problems.append(f"values that are NaN or infinite: {_describe_lines(np.flatnonzero(nonfinite), column)}")
    negative = values < 0
    if kind == "dose" and negative.any():
        problems.append(f"negative dose values (Gy): {_describe_lines(np.flatnonzero(negative), column)}")
    if kind == "ct" and negative.any():
        problems.append(
            f"{int(negative.sum())} negative CT value(s) (min {float(np.nanmin(values)):g}; "
            f"{_describe_lines(np.flatnonzero(negative), column)}): OpenKBP CT values are CT numbers 0..4095 (air near "
            "0, soft tissue about 1000-1100); negative values mean the file holds Hounsfield units (air -1000). Shift "
            "them by the scanner's offset (e.g. +1024) so that air is near 0; they would otherwise be clipped to 0"
        )
    finite = np.isfinite(values)
    if kind == "dose" and max_dose_gy is not None and finite.any():
        implausible = finite & (values > max_dose_gy)
        problem = implausible_dose_problem(float(values[finite].max()), max_dose_gy)
        if problem:
            problems.append(f"{problem} ({_describe_lines(np.flatnonzero(implausible), column)})")
    return values, problems


def _parse_sparse_csv(
    path: Path, n_voxels: int, kind: str, grid_text: str, max_dose_gy: float | None = None
) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Parse one sparse CSV and check it; returns ``(indices, values or None, problems)``."""
    table, problems = _read_table(path)
    if table is None:
        return None, None, problems
    indices, index_problems = _check_indices(table["index"], n_voxels, grid_text)
    values, value_problems = _check_values(table["data"], kind, max_dose_gy)
    return indices, values, problems + index_problems + value_problems


def _grid_text(grid_shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in grid_shape)


def read_sparse_csv(
    path: str | os.PathLike[str], grid_shape: Sequence[int] = GRID_SHAPE, kind: str = "values"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one OpenKBP sparse CSV (header ``,data``, rows ``flat_index,value``) and check every row.

    Args:
        path: the CSV file.
        grid_shape: the grid the flat indices refer to.
        kind: ``"values"``, ``"ct"`` (values, none negative: OpenKBP CT numbers are 0..4095, negative ones are
            Hounsfield units), ``"dose"`` (values, none negative; the plausibility of a patient's dose is checked by
            :func:`read_patient`) or ``"mask"`` (the data column must be empty).

    Returns:
        ``(flat_indices int64, values float64 or None for masks)``, in file order.

    Raises:
        DatasetValidationError: listing every problem of the file (bad header, unparsable rows, indices outside the
            grid or repeated, missing / NaN / infinite / negative values, a truncated last line).
        ValueError: when ``kind`` is not one of the four.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "dose.csv"
        >>> _ = f.write_text(",data\\n5,1.5\\n7,2.0\\n")
        >>> read_sparse_csv(f, (2, 2, 2), kind="dose")[1].tolist()
        [1.5, 2.0]
    """
    if kind not in ("values", "ct", "dose", "mask"):
        raise ValueError(f"kind must be 'values', 'ct', 'dose' or 'mask', got {kind!r}")
    path = Path(path)
    indices, values, problems = _parse_sparse_csv(path, int(np.prod(grid_shape)), kind, _grid_text(grid_shape))
    if problems:
        raise DatasetValidationError([DataProblem(str(path), p) for p in problems], str(path))
    return indices, values


def read_voxel_dimensions(path: str | os.PathLike[str]) -> tuple[float, float, float]:
    """Read ``voxel_dimensions.csv``: three positive numbers (mm along axes 0, 1, 2), one per line, no header.

    Args:
        path: the file.

    Returns:
        the voxel size in mm.

    Raises:
        DatasetValidationError: when the file is missing, unparsable or does not hold three positive finite numbers.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "voxel_dimensions.csv"
        >>> _ = f.write_text("3.9\\n3.9\\n2.5\\n")
        >>> read_voxel_dimensions(f)
        (3.9, 3.9, 2.5)
    """
    path = Path(path)
    problem = _voxel_dimensions_problem(path)
    if isinstance(problem, str):
        raise DatasetValidationError([DataProblem(str(path), problem)], str(path))
    return problem


def _voxel_dimensions_problem(path: Path) -> tuple[float, float, float] | str:
    """The voxel size, or the problem with the file as a message."""
    if not path.is_file():
        return "missing voxel_dimensions.csv (the voxel size in mm is needed for the NIfTI geometry and DVH metrics)"
    try:
        values = np.atleast_1d(np.loadtxt(path, dtype=np.float64, delimiter=",", ndmin=1)).ravel()
    except ValueError as err:
        return f"cannot be parsed as three numbers: {err}"
    if values.size != 3:
        return f"holds {values.size} number(s), expected 3 (voxel size in mm along the three axes)"
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        return f"voxel sizes must be positive finite numbers, got {values.tolist()}"
    return (float(values[0]), float(values[1]), float(values[2]))


def _check_structures(structures: Iterable[str] | None) -> tuple[str, ...]:
    names = STRUCTURE_NAMES if structures is None else tuple(structures)
    unknown = [n for n in names if n not in STRUCTURE_NAMES]
    if unknown:
        raise ValueError(f"unknown OpenKBP structure(s) {unknown}; the format defines {list(STRUCTURE_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"structures must not repeat, got {list(names)}")
    return names


def _read_patient_checked(
    folder: Path, structures: tuple[str, ...], grid_shape: tuple[int, ...], require_dose: bool
) -> tuple[OpenKBPPatient | None, list[DataProblem]]:
    """Read a patient, collecting every problem of every file instead of stopping at the first."""
    case = folder.name
    problems: list[DataProblem] = []
    if not folder.is_dir():
        return None, [DataProblem(str(folder), "patient folder does not exist", case)]
    n_voxels = int(np.prod(grid_shape))
    grid_text = _grid_text(grid_shape)

    def volume(name: str, kind: str, required: bool, dtype: type) -> np.ndarray | None:
        path = folder / name
        if not path.is_file():
            if required:
                problems.append(DataProblem(str(path), f"missing {name} (a required file of an OpenKBP patient)", case))
            return None
        indices, values, file_problems = _parse_sparse_csv(path, n_voxels, kind, grid_text, MAX_PLAUSIBLE_DOSE_GY)
        problems.extend(DataProblem(str(path), p, case) for p in file_problems)
        if file_problems:
            return None
        flat = np.zeros(n_voxels, dtype=dtype)
        flat[indices] = True if values is None else values
        return flat.reshape(grid_shape)

    ct = volume("ct.csv", "ct", True, np.float32)
    dose = volume("dose.csv", "dose", require_dose, np.float32)
    possible = volume("possible_dose_mask.csv", "mask", True, bool)
    masks = {}
    for name in structures:
        mask = volume(f"{name}.csv", "mask", False, bool)
        if mask is not None:
            masks[name] = mask
    voxel_size = _voxel_dimensions_problem(folder / "voxel_dimensions.csv")
    if isinstance(voxel_size, str):
        problems.append(DataProblem(str(folder / "voxel_dimensions.csv"), voxel_size, case))
    if dose is not None and require_dose and not (dose > 0).any():
        problems.append(
            DataProblem(
                str(folder / "dose.csv"),
                "the dose is 0 Gy in every voxel: a training or validation patient needs its plan's dose (in Gy), and "
                "an all-zero dose would teach the network to predict no dose. Is this the right file (a placeholder or "
                "an export that failed)? Replace it, or move the patient to test-pats/ (whose dose is not needed)",
                case,
            )
        )
    if problems or ct is None or possible is None or isinstance(voxel_size, str):
        return None, problems
    if dose is not None:
        outside = (dose > 0) & ~possible
        if outside.any():
            warnings.warn(
                f"{folder / 'dose.csv'}: {int(outside.sum())} voxel(s) with dose above 0 outside "
                f"possible_dose_mask.csv (max {float(dose[outside].max()):.3f} Gy); they are kept, but the dose "
                "loss and metrics only use voxels inside the mask",
                OpenKBPDataWarning,
                stacklevel=3,
            )
    np.clip(ct, *CT_RANGE, out=ct)
    return OpenKBPPatient(case, ct, dose, possible, masks, voxel_size, folder), []


def read_patient(
    folder: str | os.PathLike[str],
    structures: Iterable[str] | None = None,
    grid_shape: Sequence[int] = GRID_SHAPE,
    require_dose: bool = False,
) -> OpenKBPPatient:
    """Read one OpenKBP patient folder (``pt_<n>/``) into volumes on the ``[row, column, slice]`` grid.

    Every file is checked; all problems of the patient are reported together.

    Args:
        folder: the patient folder.
        structures: the structures to read (default: all of ``STRUCTURE_NAMES``); those without a file are absent
            from ``OpenKBPPatient.structures``.
        grid_shape: the grid the flat indices refer to; the challenge's is ``GRID_SHAPE`` (the synthetic demo may
            use a smaller one).
        require_dose: treat a missing ``dose.csv`` as a problem (training / validation patients) rather than
            returning ``dose=None`` (challenge test patients).

    Returns:
        the patient, CT clipped to ``CT_RANGE``.

    Raises:
        DatasetValidationError: listing every problem, each naming its file: missing ``ct.csv`` /
            ``possible_dose_mask.csv`` / ``voxel_dimensions.csv`` (or ``dose.csv`` with ``require_dose``), a wrong
            header, unparsable rows, indices outside the grid or repeated, NaN / infinite / missing values, negative
            dose, a dose above ``MAX_PLAUSIBLE_DOSE_GY`` (cGy or mGy instead of Gy), a dose that is 0 everywhere
            (with ``require_dose``: nothing to learn from), negative CT values (Hounsfield units instead of CT
            numbers), a truncated last line.
        ValueError: when ``structures`` names a structure the format does not define.

    Warns:
        OpenKBPDataWarning: when the dose is above 0 outside the possible-dose mask.

    Example:
        >>> patient = read_patient("provided-data/train-pats/pt_1")  # doctest: +SKIP
        >>> patient.ct.shape, sorted(patient.structures)[:2]  # doctest: +SKIP
        ((128, 128, 128), ['Brainstem', 'LeftParotid'])
    """
    folder = Path(folder)
    patient, problems = _read_patient_checked(
        folder, _check_structures(structures), tuple(int(s) for s in grid_shape), require_dose
    )
    if problems or patient is None:
        raise DatasetValidationError(problems, f"OpenKBP patient {folder}")
    return patient


def openkbp_affine(voxel_size_mm: Sequence[float], grid_shape: Sequence[int] = GRID_SHAPE) -> np.ndarray:
    """The voxel-to-RAS (mm) affine of an OpenKBP ``[row, column, slice]`` array, centred on the grid.

    Row runs anterior -> posterior (-y in RAS), column patient right -> left (-x), slice superior -> inferior (-z),
    so ``nibabel.aff2axcodes`` gives ``("P", "L", "I")``. The challenge gives no patient position; the grid centre is
    put at the world origin.

    Args:
        voxel_size_mm: voxel size along axes 0, 1, 2 (``voxel_dimensions.csv``).
        grid_shape: the grid shape.

    Returns:
        a 4 x 4 float64 affine.

    Example:
        >>> import nibabel as nib
        >>> nib.aff2axcodes(openkbp_affine((3.9, 3.9, 2.5)))
        ('P', 'L', 'I')
    """
    row, col, sli = (float(v) for v in voxel_size_mm)
    affine = np.zeros((4, 4))
    affine[0, 1] = -col  # world x (R+) decreases along the column axis
    affine[1, 0] = -row  # world y (A+) decreases along the row axis
    affine[2, 2] = -sli  # world z (S+) decreases along the slice axis
    affine[3, 3] = 1.0
    centre = (np.asarray(grid_shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def label_map_from_structures(
    structures: Mapping[str, np.ndarray], names: Sequence[str], shape: Sequence[int]
) -> tuple[np.ndarray, list[int]]:
    """Combine structure masks into one uint8 label map: 0 background, ``i`` = ``names[i - 1]``.

    Where structures overlap, the one listed first in ``names`` wins.

    Args:
        structures: name -> bool mask of the structures a patient has.
        names: the selected structures, in label order (at most 255).
        shape: the grid shape (for a patient with none of the structures).

    Returns:
        ``(label_map, class_present)`` where ``class_present[0]`` (background) is 1 and ``class_present[i]`` is 1 when
        the patient has a file for ``names[i - 1]`` (annotated, even if every voxel lost an overlap).

    Raises:
        ValueError: with more than 255 structures.

    Example:
        >>> a = np.zeros((1, 1, 3), bool); a[..., :2] = True
        >>> b = np.zeros((1, 1, 3), bool); b[..., 1:] = True
        >>> label_map_from_structures({"A": a, "B": b}, ["A", "B", "C"], a.shape)
        (array([[[1, 1, 2]]], dtype=uint8), [1, 1, 1, 0])
    """
    if len(names) > 255:
        raise ValueError(f"a uint8 label map holds at most 255 structures, got {len(names)}")
    label = np.zeros(tuple(shape), dtype=np.uint8)
    # Paint in reverse order so that the structures listed first are painted last and win overlaps.
    for index in range(len(names), 0, -1):
        mask = structures.get(names[index - 1])
        if mask is not None:
            label[mask] = index
    return label, [1] + [int(name in structures) for name in names]


# ---------------------------------------------------------------------------------------------------------- writing
def write_sparse_csv(path: str | os.PathLike[str], volume: np.ndarray, mask: bool = False) -> Path:
    """Write a volume as an OpenKBP sparse CSV (header ``,data``; C-order flat indices), atomically.

    Values are written as the shortest decimal that reads back to the same float32 (numpy's float32 ``str``), so a
    float32 volume round-trips exactly through ``read_sparse_csv``.

    Args:
        path: the output file.
        volume: the volume; values: its non-zero voxels are listed (an all-zero volume: one explicit ``0,0.0`` row,
            so the file is not mistaken for a truncated one); ``mask=True``: its non-zero voxels are listed with an
            empty value.
        mask: write a mask file.

    Returns:
        the path written.

    Example:
        >>> import tempfile, pathlib
        >>> f = write_sparse_csv(pathlib.Path(tempfile.mkdtemp()) / "ct.csv", np.array([[[0.0, 7.5]]]))
        >>> f.read_text()
        ',data\\n1,7.5\\n'
    """
    flat = np.asarray(volume).ravel()
    indices = np.flatnonzero(flat)
    index_text = indices.astype(str)
    if mask:
        rows = "".join([f"{i},\n" for i in index_text.tolist()])
    elif indices.size == 0:
        # an all-zero volume lists one explicit zero: a header-only file is what a truncated copy looks like
        rows = "0,0.0\n"
    else:
        value_text = flat[indices].astype(np.float32).astype(str)
        rows = "".join([f"{i},{v}\n" for i, v in zip(index_text.tolist(), value_text.tolist())])
    atomic_write_text(path, CSV_HEADER + "\n" + rows)
    return Path(path)


def write_dose_csv(dose: Any, path: str | os.PathLike[str]) -> Path:
    """Write a dose volume in the challenge's submission format (``dose.csv``: non-zero voxels, header ``,data``).

    The dose is written as float32, with the shortest decimal that reads back to the same float32: reading the file
    with ``read_sparse_csv`` / ``read_patient`` gives the float32 dose bit for bit.

    Args:
        dose: dose in Gy on the ``[row, column, slice]`` grid: a 3D numpy array or torch tensor, or ``[1, *grid]``.
        path: the output file (e.g. ``<results>/pt_241.csv`` for a challenge submission).

    Returns:
        the path written.

    Raises:
        ValueError: when the dose is not 3D or holds NaN, infinite or negative values (clip predictions at 0 first).

    Example:
        >>> import tempfile, pathlib
        >>> d = np.zeros((2, 2, 2), np.float32); d[1, 0, 1] = 61.25
        >>> write_dose_csv(d, pathlib.Path(tempfile.mkdtemp()) / "pt_1.csv").read_text()
        ',data\\n5,61.25\\n'
    """
    array = dose.detach().cpu().numpy() if hasattr(dose, "detach") else np.asarray(dose)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{path}: dose must be a 3D volume (or [1, *grid]), got shape {tuple(array.shape)}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{path}: dose holds NaN or infinite values")
    if np.any(array < 0):
        raise ValueError(f"{path}: dose holds negative values (min {float(array.min())}); clip predictions at 0 first")
    return write_sparse_csv(path, array)


def write_patient(patient: OpenKBPPatient, folder: str | os.PathLike[str]) -> Path:
    """Write a patient in the challenge's layout: ``ct.csv``, ``dose.csv`` (if any), ``possible_dose_mask.csv``, one
    ``<Structure>.csv`` per structure it has and ``voxel_dimensions.csv``; every file atomically.

    Args:
        patient: the patient (CT values are written as they are, not rescaled).
        folder: the patient folder to write (created; usually ``.../<split>/<patient.id>``).

    Returns:
        the folder.

    Example:
        >>> import tempfile
        >>> grid = (2, 2, 2)
        >>> ct = np.full(grid, 1000.0, np.float32)
        >>> p = OpenKBPPatient("pt_1", ct, None, ct > 0, {}, (3.9, 3.9, 2.5))
        >>> out = write_patient(p, tempfile.mkdtemp() + "/pt_1")
        >>> read_patient(out, grid_shape=grid).ct.max()
        np.float32(1000.0)
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_sparse_csv(out / "ct.csv", patient.ct)
    if patient.dose is not None:
        write_dose_csv(patient.dose, out / "dose.csv")
    write_sparse_csv(out / "possible_dose_mask.csv", patient.possible_dose_mask, mask=True)
    for name, mask in patient.structures.items():
        write_sparse_csv(out / f"{name}.csv", mask, mask=True)
    # Same text layout as the publishers' files (numpy.savetxt's default format).
    atomic_write_text(out / "voxel_dimensions.csv", "".join(f"{v:.18e}\n" for v in patient.voxel_size_mm))
    return out
