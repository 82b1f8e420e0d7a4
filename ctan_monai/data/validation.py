"""Up-front dataset validation: every problem of a dataset is collected and reported at once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ctan_monai.excepthook import install_excepthook

__all__ = [
    "MAX_PLAUSIBLE_DOSE_GY",
    "DataProblem",
    "DatasetValidationError",
    "ValidationReport",
    "implausible_dose_problem",
]

#: The highest dose (Gy) an external-beam plan's dose grid may reach: prescriptions stay below about 80 Gy and the
#: maxima, stereotactic plans included, rarely exceed about 100 Gy; a maximum above this is taken as a unit error (a
#: dose in cGy is 100 times, one in mGy 1000 times too high) rather than trained on. (Brachytherapy grids, whose
#: dose near a source is far higher, need a higher limit.)
MAX_PLAUSIBLE_DOSE_GY = 150.0


@dataclass(frozen=True)
class DataProblem:
    """One problem found in a dataset.

    Args:
        file: the file (or folder) at fault, as a path string.
        message: what is wrong, in words a user can act on.
        case: the case / patient / image id the file belongs to, if known.
    """

    file: str
    message: str
    case: str | None = None

    def __str__(self) -> str:
        where = f"[{self.case}] " if self.case else ""
        return f"{where}{self.file}: {self.message}"


class DatasetValidationError(ValueError):
    """Raised when a dataset has problems; ``problems`` lists all of them, not just the first.

    When it ends a run uncaught, its list of problems is also the last thing written to stderr, even when MONAI's
    bundle runner wraps it in ``RuntimeError("Failed to evaluate ConfigExpression ...")``
    (:func:`ctan_monai.excepthook.install_excepthook`, installed again here in case another library replaced the hook).

    Args:
        problems: the problems found.
        dataset: a short name of what was validated (e.g. the dataset root).
    """

    def __init__(self, problems: Iterable[DataProblem], dataset: str = "dataset") -> None:
        install_excepthook()
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{dataset}: {len(self.problems)} problem(s) found:\n{lines}")


@dataclass
class ValidationReport:
    """The outcome of validating a dataset: the cases that are usable and the problems found.

    Args:
        dataset: a short name of what was validated.
        problems: every problem found.
        valid_cases: the ids of the cases without problems.
    """

    dataset: str
    problems: list[DataProblem] = field(default_factory=list)
    valid_cases: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def add(self, file: str, message: str, case: str | None = None) -> None:
        """Record one problem."""
        self.problems.append(DataProblem(str(file), message, case))

    def bad_cases(self) -> list[str]:
        """The ids of the cases with at least one problem, in first-seen order."""
        return list(dict.fromkeys(p.case for p in self.problems if p.case is not None))

    def raise_if_problems(self) -> None:
        """Raise ``DatasetValidationError`` listing every problem, if there is any.

        Raises:
            DatasetValidationError: when ``problems`` is not empty.
        """
        if self.problems:
            raise DatasetValidationError(self.problems, self.dataset)


def implausible_dose_problem(max_dose_gy: float, limit_gy: float = MAX_PLAUSIBLE_DOSE_GY) -> str | None:
    """The problem with a dose grid whose maximum is ``max_dose_gy`` Gy, or None when it is plausible.

    Args:
        max_dose_gy: the grid's maximum, read as Gy.
        limit_gy: the highest plausible dose.

    Returns:
        words that follow the file name, with the value and the likely unit error; None at or below ``limit_gy``.

    Example:
        >>> implausible_dose_problem(70.0) is None
        True
        >>> implausible_dose_problem(7000.0)[:46]
        'maximum dose 7000 Gy is above 150 Gy, far abov'
    """
    if max_dose_gy <= limit_gy:
        return None
    return (
        f"maximum dose {max_dose_gy:.6g} Gy is above {limit_gy:g} Gy, far above any prescription: is the dose in cGy "
        f"(divide by 100: {max_dose_gy / 100:.4g} Gy) or mGy (divide by 1000: {max_dose_gy / 1000:.4g} Gy)? Doses "
        "must be in Gy"
    )
