"""Up-front dataset validation: every problem of a dataset is collected and reported at once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


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

    Args:
        problems: the problems found.
        dataset: a short name of what was validated (e.g. the dataset root).
    """

    def __init__(self, problems: Iterable[DataProblem], dataset: str = "dataset") -> None:
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
