"""The real problem as the last thing a user sees when a run stops on it.

``python -m monai.bundle run ...`` evaluates every ``$`` expression and ``_target_`` of a config inside MONAI's
``ConfigExpression`` / ``ConfigComponent``, which re-raise any error as ``RuntimeError("Failed to evaluate ...")`` or
``RuntimeError("Failed to instantiate ...")`` chained to it (``raise ... from e``). Python then prints the original
error first and MONAI's wrapper 30-100 lines below it, so the list of dataset problems that our up-front checks
collected scrolls out of sight and the last line names a config expression instead of the file at fault.

:func:`install_excepthook` (called when ``ctan_monai`` is imported, and again whenever a ``DatasetValidationError`` is
created, in case another library replaced the hook since) wraps ``sys.excepthook``: Python's traceback is printed
exactly as before, then, when the uncaught error hides the real problem, that problem again as the last lines of
stderr (:func:`problem_summary`). The exit status stays Python's for an uncaught error (1). Nothing changes for
errors that are not wrapped, for caught errors, or inside pytest / Jupyter (which do not use ``sys.excepthook``).
"""

from __future__ import annotations

import contextlib
import sys
from types import TracebackType
from typing import Any

__all__ = ["install_excepthook", "problem_summary"]

#: How MONAI's config items start the message of the ``RuntimeError`` they wrap an error in.
_CONFIG_WRAPPERS = ("Failed to evaluate", "Failed to instantiate")
_MARK = "_ctan_monai_excepthook"
_REPORTED = "_ctan_monai_reported"


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from or while handling, outermost first (as Python prints them)."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _is_config_wrapper(error: BaseException) -> bool:
    return type(error) is RuntimeError and str(error).startswith(_CONFIG_WRAPPERS)


def problem_summary(error: BaseException) -> str | None:
    """The real problem behind an uncaught error, when the error's traceback does not end with it.

    That is: the (outermost) ``DatasetValidationError`` in the chain of ``error`` when ``error`` is not that error
    itself (its message lists every problem found, each naming its file), else, when ``error`` is MONAI's config
    wrapper (``Failed to evaluate`` / ``Failed to instantiate``), the innermost error of the chain.

    Args:
        error: the uncaught error.

    Returns:
        ``"<ErrorType>: <message>"``, or None when the traceback already ends with the real problem.

    Example:
        >>> from ctan_monai.data.validation import DataProblem, DatasetValidationError
        >>> try:
        ...     try:
        ...         raise DatasetValidationError([DataProblem("pt_1/ct.csv", "is empty")], "OpenKBP data")
        ...     except ValueError as err:
        ...         raise RuntimeError("Failed to evaluate ConfigExpression: ...") from err
        ... except RuntimeError as wrapped:
        ...     print(problem_summary(wrapped))
        DatasetValidationError: OpenKBP data: 1 problem(s) found:
          - pt_1/ct.csv: is empty
    """
    from ctan_monai.data.validation import DatasetValidationError

    chain = _chain(error)
    real = next((e for e in chain if isinstance(e, DatasetValidationError)), None)
    if real is None and len(chain) > 1 and _is_config_wrapper(chain[0]):
        real = chain[-1]
    if real is None or real is chain[0]:
        return None
    return f"{type(real).__name__}: {real}"


def _report(error: BaseException) -> None:
    """Write the problem behind ``error`` to stderr (once per error, whichever hook gets there first)."""
    if getattr(error, _REPORTED, False):
        return
    summary = problem_summary(error)
    if summary is None:
        return
    with contextlib.suppress(AttributeError):  # an error type with __slots__
        setattr(error, _REPORTED, True)
    sys.stderr.write(f"\nctan_monai: the run stopped on this problem (its traceback is above):\n{summary}\n")
    sys.stderr.flush()


def install_excepthook() -> None:
    """Wrap ``sys.excepthook`` so that an uncaught error that hides the real problem ends with that problem.

    The previous hook still prints the traceback first; then :func:`problem_summary`, if any, is written to stderr.
    Calling it again is a no-op while the wrapper is the current hook.

    Example:
        >>> install_excepthook()
        >>> getattr(sys.excepthook, "_ctan_monai_excepthook", False)
        True
    """
    previous = sys.excepthook
    if getattr(previous, _MARK, False):
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> Any:
        previous(kind, error, traceback)
        with contextlib.suppress(Exception):  # never let the summary hide the traceback or change the exit status
            _report(error)

    setattr(hook, _MARK, True)
    sys.excepthook = hook
