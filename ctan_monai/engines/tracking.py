"""MONAI bundle experiment tracking (``python -m monai.bundle run training ... --tracking mlflow``) on our trainers.

MONAI's tracking settings append an ``MLFlowHandler`` to ``train#handlers`` whose ``output_transform``
(``from_engine(["loss"], first=True)``) expects a decollated output (a list of per-sample dicts). Our trainers keep
the batch collated (``decollate: false``: no per-sample copies and no host synchronisation per step), so its
iteration log would receive ``(loss,)``, a tuple, and fail. :func:`adapt_tracking_handlers` points such handlers at the
collated ``output["loss"]`` and gives them the bundle's hyperparameters to log as run parameters. The validator's
handler logs metrics only: its engine's ``max_epochs`` / ``epoch_length`` (1 and the number of validation batches)
would otherwise become the run's parameters whenever validation starts first (the untrained model's evaluation).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from monai.handlers import MLFlowHandler

__all__ = ["adapt_tracking_handlers", "collated_loss"]


def collated_loss(output: Mapping[str, Any], key: str = "loss") -> Any:
    """The loss of a collated trainer output.

    Args:
        output: ``engine.state.output`` of a trainer run with ``decollate: false``.
        key: the loss key.

    Returns:
        ``output[key]``.

    Raises:
        TypeError: when the output is not a mapping (the trainer decollates: MONAI's default transform applies).

    Example:
        >>> collated_loss({"loss": 0.5})
        0.5
    """
    if not isinstance(output, Mapping):
        raise TypeError(f"expected the collated trainer output (a mapping), got {type(output).__name__}")
    return output[key]


def adapt_tracking_handlers(
    handlers: Sequence[Any],
    params: Mapping[str, Any] | None = None,
    loss_key: str = "loss",
    log_engine_params: bool = True,
) -> list[Any]:
    """An engine's handlers, with every ``MLFlowHandler`` among them reading the collated loss.

    Without tracking the list is returned as it is; nothing else is changed.

    Args:
        handlers: the instantiated ``train#handlers`` or ``validate#handlers`` (MONAI's tracking settings append
            theirs to these lists).
        params: run parameters to log (e.g. architecture, backbone, learning rate), for handlers given none.
        loss_key: the loss key of the collated output.
        log_engine_params: False for an evaluator's handlers: they do not log its ``max_epochs`` / ``epoch_length``.

    Returns:
        the same handlers, as a list.

    Example:
        >>> adapt_tracking_handlers([])
        []
    """
    for handler in handlers:
        if isinstance(handler, MLFlowHandler):
            handler.output_transform = functools.partial(collated_loss, key=loss_key)
            if not log_engine_params:
                handler.default_tracking_params = []  # shadows the class attribute, for this handler only
            if params and not handler.experiment_param:
                handler.experiment_param = {
                    k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()
                }
    return list(handlers)
