"""Task declarations: what a multi-task network predicts, declared rather than hard-coded."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

LEVELS = ("pixel", "image")
KINDS = ("segmentation", "regression", "classification")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task network.

    Args:
        name: key of the task in the network's output dict and in the batch (e.g. ``"seg"``, ``"dose"``).
        level: ``"pixel"`` (dense output at the input resolution) or ``"image"`` (one vector per image).
        kind: ``"segmentation"`` (logits over classes, background included), ``"regression"``
            (e.g. dose in Gy) or ``"classification"`` (logits; one channel means binary).
        out_channels: number of output channels (classes for segmentation/classification).
        output_scale: the decoder's head predicts ``output / output_scale`` and the network multiplies it back, so the
            output, the loss and every report stay in the task's units (e.g. Gy) while the head works near 1. For a
            dose task use about the prescription (e.g. 70 Gy): with Adam this is the same as scaling the targets, and
            without it the head needs thousands of steps to reach tens of Gy. 1 leaves the output as it is.
        output_bias: initial value of the output (in the task's units), set through the head's bias; e.g. a typical
            dose, so that the first steps refine a plausible map instead of climbing from 0. Regression only.

    Raises:
        ValueError: when a field is not one of the allowed values or the combination makes no sense.

    Example:
        >>> TaskSpec("seg", "pixel", "segmentation", 5)
        TaskSpec(name='seg', level='pixel', kind='segmentation', out_channels=5, output_scale=1.0, output_bias=0.0)
    """

    name: str
    level: str
    kind: str
    out_channels: int
    output_scale: float = 1.0
    output_bias: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"task name must be a non-empty identifier, got {self.name!r}")
        if self.level not in LEVELS:
            raise ValueError(f"task {self.name!r}: level must be one of {LEVELS}, got {self.level!r}")
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if int(self.out_channels) < 1:
            raise ValueError(f"task {self.name!r}: out_channels must be >= 1, got {self.out_channels}")
        if self.kind == "segmentation" and self.level != "pixel":
            raise ValueError(f"task {self.name!r}: segmentation is a pixel-level task")
        if self.kind == "segmentation" and self.out_channels < 2:
            raise ValueError(f"task {self.name!r}: segmentation needs >= 2 channels (background included)")
        if not float(self.output_scale) > 0:
            raise ValueError(f"task {self.name!r}: output_scale must be > 0, got {self.output_scale}")
        if self.kind != "regression" and (float(self.output_scale) != 1.0 or float(self.output_bias) != 0.0):
            raise ValueError(f"task {self.name!r}: output_scale and output_bias are for regression tasks (logits stay)")

    @property
    def is_binary(self) -> bool:
        """True for a single-logit (binary) classification task."""
        return self.kind == "classification" and self.out_channels == 1


def parse_tasks(tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> tuple[TaskSpec, ...]:
    """Turn task declarations (``TaskSpec`` or dicts from a YAML config) into a tuple of ``TaskSpec``.

    Args:
        tasks: declarations, e.g. ``[{"name": "seg", "level": "pixel", "kind": "segmentation",
            "out_channels": 5}, {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1}]``.

    Returns:
        the tasks, in the given order.

    Raises:
        ValueError: when there is no task, a name repeats, or a declaration is malformed.

    Example:
        >>> parse_tasks([{"name": "dx", "level": "image", "kind": "classification", "out_channels": 7}])[0].name
        'dx'
    """
    parsed: list[TaskSpec] = []
    for item in tasks:
        if isinstance(item, TaskSpec):
            parsed.append(item)
        elif isinstance(item, Mapping):
            unknown = set(item) - {"name", "level", "kind", "out_channels", "output_scale", "output_bias"}
            if unknown:
                raise ValueError(f"task declaration {dict(item)!r} has unknown keys {sorted(unknown)}")
            try:
                parsed.append(
                    TaskSpec(
                        str(item["name"]),
                        str(item["level"]),
                        str(item["kind"]),
                        int(item["out_channels"]),
                        float(item.get("output_scale", 1.0)),
                        float(item.get("output_bias", 0.0)),
                    )
                )
            except KeyError as err:
                raise ValueError(f"task declaration {dict(item)!r} lacks {err.args[0]!r}") from None
        else:
            raise ValueError(f"a task must be a TaskSpec or a mapping, got {type(item).__name__}")
    if not parsed:
        raise ValueError("at least one task must be declared")
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return tuple(parsed)
