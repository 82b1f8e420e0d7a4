"""Trivial floors of image-level evaluations: the predictors that know nothing of the image, built from the *training*
split only, scored on the evaluated split beside the model. A model is judged against its floor; one that does not
beat it on a key metric is logged loudly (:func:`compare_with_floor`).

- :class:`ClassificationFloor` (multi-class, e.g. the HAM10000 diagnosis): (a) always answering the majority training
  class, scored with the same accuracy and balanced accuracy functions as the model; (b) a guess drawn at random from
  the training class prior, whose expected accuracy is ``sum_c p_train(c) p_eval(c)`` and expected balanced accuracy
  ``mean over the classes present in the evaluated split of p_train(c)`` (``1 / K`` when every class is present).
- :class:`MaskFloor` (segmentation, e.g. the HAM10000 lesion): the pixel-wise mean of the training masks at the
  network's input resolution, thresholded at 0.5 (a pixel is foreground when at least half the training masks have
  it), predicted for every image and scored with the same Dice as the model.
- :class:`PrevalenceFloor` (binary patient-level tasks, e.g. STOIC COVID-19 and severity): the training prevalence
  as a constant score. A constant score has AUC 0.5 (50 %) by construction; its accuracy is that of always answering
  the majority training label. Only the labelled training patients count: a missing label is missing, not negative.
- :class:`ImageFloor` bundles the classification and mask floors for ``ImageEvaluationHandler``.

Example:
    >>> floor = ClassificationFloor.from_labels([5, 5, 5, 4], ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    >>> floor.majority_name, floor.metrics([5, 4])["accuracy"]
    ('nv', 50.0)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.config import NdarrayOrTensor
from monai.utils import convert_to_numpy

from ctan_monai.metrics.classification import accuracy, balanced_accuracy

__all__ = [
    "CONSTANT_SCORE_AUC",
    "ClassificationFloor",
    "ImageFloor",
    "MaskFloor",
    "PrevalenceFloor",
    "compare_with_floor",
]

#: AUC (%) of any constant score: every positive-negative pair is a tie, counted as half.
CONSTANT_SCORE_AUC = 50.0
CONSTANT_SCORE_AUC_NOTE = "a constant score has AUC 0.5 (50 %) by construction: every positive-negative pair is a tie"


def _is_labelled(entry: Mapping[str, Any], key: str) -> bool:
    """Whether a datalist entry carries the label ``key``: present, not None, and its ``<key>_present`` flag not 0."""
    if entry.get(key) is None:
        return False
    return float(entry.get(f"{key}_present", 1.0)) != 0.0


@dataclass(frozen=True)
class ClassificationFloor:
    """Trivial predictors of a multi-class task from its training class counts.

    Args:
        class_names: the class names in index order.
        counts: training images per class, in the same order.

    Raises:
        ValueError: when ``counts`` is not one non-negative count per class, or no training image is labelled.

    Example:
        >>> floor = ClassificationFloor(("nv", "mel"), (3, 1))
        >>> floor.majority_name, floor.prior.tolist()
        ('nv', [0.75, 0.25])
    """

    class_names: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
        object.__setattr__(self, "counts", tuple(int(n) for n in self.counts))
        if len(self.class_names) < 2 or len(self.counts) != len(self.class_names):
            raise ValueError(f"need one count per class (at least two), got {self.counts} for {self.class_names}")
        if min(self.counts) < 0 or sum(self.counts) == 0:
            raise ValueError(f"training class counts must be non-negative with at least one image, got {self.counts}")

    @classmethod
    def from_labels(
        cls, labels: Sequence[int] | NdarrayOrTensor, class_names: Sequence[str], present: Sequence[float] | None = None
    ) -> ClassificationFloor:
        """The floor of training labels given as class indices.

        Args:
            labels: training class indices.
            class_names: the class names in index order.
            present: optional 0/1 per label; 0 leaves it out (unlabelled).

        Returns:
            the floor.

        Raises:
            ValueError: for a label outside ``0..len(class_names)-1`` or a malformed ``present``.

        Example:
            >>> ClassificationFloor.from_labels([1, 1, 0], ["a", "b"]).counts
            (1, 2)
        """
        values = np.asarray(convert_to_numpy(labels), dtype=np.float64).reshape(-1)
        if present is not None:
            flags = np.asarray(convert_to_numpy(present), dtype=np.float64).reshape(-1)
            if flags.shape != values.shape:
                raise ValueError(f"present has {flags.size} values for {values.size} labels")
            values = values[flags == 1]
        names = list(class_names)
        bad = values[(values < 0) | (values >= len(names)) | (values != np.round(values))]
        if bad.size:
            raise ValueError(f"training labels {np.unique(bad).tolist()} are not class indices 0..{len(names) - 1}")
        counts = np.bincount(values.astype(np.int64), minlength=len(names))
        return cls(tuple(names), tuple(int(n) for n in counts))

    @classmethod
    def from_datalist(
        cls, datalist: Iterable[Mapping[str, Any]], class_names: Sequence[str], key: str = "dx"
    ) -> ClassificationFloor:
        """The floor of a training datalist (entries without the label, or with ``<key>_present`` 0, left out).

        Args:
            datalist: training entries with an integer class index under ``key``.
            class_names: the class names in index order.
            key: the label's key.

        Returns:
            the floor.

        Raises:
            ValueError: see :meth:`from_labels`; also when no entry is labelled.

        Example:
            >>> ClassificationFloor.from_datalist([{"dx": 5}, {"dx": 4}, {"dx": 5}], list("abcdefg")).majority_name
            'f'
        """
        labels = [int(e[key]) for e in datalist if _is_labelled(e, key)]
        return cls.from_labels(labels, class_names)

    @property
    def num_training(self) -> int:
        """Labelled training images."""
        return int(sum(self.counts))

    @property
    def prior(self) -> np.ndarray:
        """The training class prior ``p_train(c)``, float64 ``[K]``."""
        counts = np.asarray(self.counts, dtype=np.float64)
        return counts / counts.sum()

    @property
    def majority_class(self) -> int:
        """Index of the majority training class (the first of several tied)."""
        return int(np.argmax(self.counts))

    @property
    def majority_name(self) -> str:
        """Name of the majority training class."""
        return self.class_names[self.majority_class]

    def metrics(
        self, target: Sequence[int] | NdarrayOrTensor, present: Sequence[float] | None = None
    ) -> dict[str, float]:
        """The floor's metrics (%) on an evaluated split.

        Args:
            target: true class indices of the evaluated images.
            present: optional 0/1 per image; 0 leaves the image out (no label), as for the model.

        Returns:
            ``{"accuracy", "balanced_accuracy"}`` of always answering the majority training class (the metric
            functions the model is scored with) and ``{"prior_accuracy", "prior_balanced_accuracy"}``, the expected
            values for a guess drawn from the training prior; NaN (with a warning) when no image is labelled.

        Raises:
            ValueError: for targets outside the classes.

        Example:
            >>> ClassificationFloor(("a", "b"), (3, 1)).metrics([0, 1, 1, 1])["prior_accuracy"]
            37.5
        """
        y = np.asarray(convert_to_numpy(target), dtype=np.float64).reshape(-1)
        constant = np.full(y.shape, self.majority_class, dtype=np.int64)
        num_classes = len(self.class_names)
        result = {
            "accuracy": accuracy(constant, y, present, num_classes),
            "balanced_accuracy": balanced_accuracy(constant, y, present, num_classes),
        }
        keep = np.ones(y.shape, dtype=bool) if present is None else np.asarray(present, dtype=np.float64) == 1
        labelled = y[keep].astype(np.int64)
        if labelled.size == 0:
            result.update(prior_accuracy=math.nan, prior_balanced_accuracy=math.nan)
            return result
        share = np.bincount(labelled, minlength=num_classes) / labelled.size
        result["prior_accuracy"] = float(100.0 * np.sum(self.prior * share))
        result["prior_balanced_accuracy"] = float(100.0 * np.mean(self.prior[share > 0]))
        return result

    def describe(self) -> dict[str, Any]:
        """The floor's definition and training counts, JSON-ready.

        Returns:
            ``{"definition", "num_training", "training_counts", "training_prior", "majority_class"}``.

        Example:
            >>> ClassificationFloor(("a", "b"), (3, 1)).describe()["majority_class"]
            'a'
        """
        return {
            "definition": (
                f"from the {self.num_training} labelled training images only: 'accuracy' and 'balanced_accuracy' "
                f"of always answering the majority training class ({self.majority_name!r}); 'prior_accuracy' and "
                "'prior_balanced_accuracy' expected for a guess drawn from the training class prior p_train: "
                "sum_c p_train(c) p_eval(c), and the mean of p_train(c) over the classes present in the evaluated "
                "split (1/K when all K are)"
            ),
            "num_training": self.num_training,
            "training_counts": dict(zip(self.class_names, self.counts)),
            "training_prior": dict(zip(self.class_names, (float(p) for p in self.prior))),
            "majority_class": self.majority_name,
        }


@dataclass(frozen=True, eq=False)
class MaskFloor:
    """The mean training mask: a fixed binary segmentation predicted for every image.

    Args:
        mean_mask: the pixel-wise mean of the 0/1 training masks ``[H, W]`` (any spatial shape), at the network's
            input resolution.
        num_masks: training masks averaged.
        threshold: a pixel is foreground when ``mean_mask >= threshold``.

    Raises:
        ValueError: when ``mean_mask`` is not in [0, 1], ``num_masks`` is below 1 or ``threshold`` is outside (0, 1].

    Example:
        >>> floor = MaskFloor.from_masks([np.array([[1, 0], [1, 1]]), np.array([[0, 0], [1, 1]])])
        >>> floor.label_map.tolist()
        [[1, 0], [1, 1]]
    """

    mean_mask: np.ndarray
    num_masks: int
    threshold: float = 0.5

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean_mask, dtype=np.float64)
        if mean.ndim < 1 or mean.size == 0 or not np.all((mean >= 0) & (mean <= 1)):
            raise ValueError("mean_mask must be a non-empty array of values in [0, 1]")
        if int(self.num_masks) < 1:
            raise ValueError(f"num_masks must be at least 1, got {self.num_masks}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        mean.setflags(write=False)
        object.__setattr__(self, "mean_mask", mean)
        object.__setattr__(self, "num_masks", int(self.num_masks))

    @classmethod
    def from_masks(cls, masks: Iterable[NdarrayOrTensor], threshold: float = 0.5) -> MaskFloor:
        """The floor of binary training masks, all on one grid.

        Args:
            masks: 0/1 masks ``[H, W]`` or ``[1, H, W]`` (a leading channel axis of 1 is dropped).
            threshold: see the class.

        Returns:
            the floor.

        Raises:
            ValueError: when there is no mask, the masks differ in shape or one holds values other than 0 and 1.

        Example:
            >>> MaskFloor.from_masks([np.ones((1, 2, 2)), np.zeros((2, 2))]).mean_mask.tolist()
            [[0.5, 0.5], [0.5, 0.5]]
        """
        total: np.ndarray | None = None
        count = 0
        for index, mask in enumerate(masks):
            array = np.asarray(convert_to_numpy(mask), dtype=np.float64)
            if array.ndim > 2 and array.shape[0] == 1:
                array = array[0]
            if not np.all((array == 0) | (array == 1)):
                raise ValueError(f"training mask {index} is not binary 0/1: values {np.unique(array)[:8].tolist()}")
            if total is None:
                total = np.zeros(array.shape, dtype=np.float64)
            elif array.shape != total.shape:
                raise ValueError(f"training mask {index} has shape {array.shape}, the first has {total.shape}")
            total += array
            count += 1
        if total is None:
            raise ValueError("no training mask to average")
        return cls(total / count, count, threshold)

    @classmethod
    def from_datalist(
        cls,
        datalist: Iterable[Mapping[str, Any]],
        transform: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        key: str = "seg",
        threshold: float = 0.5,
    ) -> MaskFloor:
        """The floor of a training datalist, each mask brought to the network's grid by ``transform``.

        Args:
            datalist: training entries; those without ``key`` (or with ``<key>_present`` 0) are left out.
            transform: maps an entry to a dict whose ``key`` is the 0/1 mask on the network's input grid (e.g.
                ``ctan_monai.apps.ham10000.transforms.mask_transforms(image_size)``).
            key: the mask's key.
            threshold: see the class.

        Returns:
            the floor.

        Raises:
            ValueError: see :meth:`from_masks`.

        Example:
            >>> floor = MaskFloor.from_datalist(data["training"], mask_transforms(224))  # doctest: +SKIP
        """
        return cls.from_masks((transform(e)[key] for e in datalist if _is_labelled(e, key)), threshold)

    @property
    def label_map(self) -> np.ndarray:
        """The floor's prediction: int64 0/1 of the shape of ``mean_mask``."""
        return (self.mean_mask >= self.threshold).astype(np.int64)

    def label_map_for(self, shape: Sequence[int]) -> np.ndarray:
        """The floor's prediction for an image whose reference mask has ``shape``.

        Args:
            shape: the reference's spatial shape (a leading channel axis of 1 is allowed).

        Returns:
            the label map, of the floor's own shape.

        Raises:
            ValueError: when the shapes differ (the floor was built at another resolution than the evaluation's).

        Example:
            >>> MaskFloor(np.zeros((2, 2)), 1).label_map_for((1, 2, 2)).shape
            (2, 2)
        """
        spatial = tuple(int(s) for s in shape)
        if len(spatial) == self.mean_mask.ndim + 1 and spatial[0] == 1:
            spatial = spatial[1:]
        if spatial != self.mean_mask.shape:
            raise ValueError(
                f"the mean training mask is {self.mean_mask.shape}, the evaluated mask {spatial}: build the floor at "
                "the network's input resolution (the evaluation's image_size)"
            )
        return self.label_map

    def describe(self) -> dict[str, Any]:
        """The floor's definition and training counts, JSON-ready.

        Returns:
            ``{"definition", "num_training", "shape", "threshold", "foreground_fraction",
            "mean_training_foreground"}``.

        Example:
            >>> MaskFloor(np.full((2, 2), 0.75), 4).describe()["foreground_fraction"]
            1.0
        """
        return {
            "definition": (
                f"the pixel-wise mean of the {self.num_masks} training masks at the network's input resolution, "
                f"thresholded at {self.threshold:g} (foreground where at least that share of the training masks "
                "has it), predicted for every image and scored with the same Dice as the model"
            ),
            "num_training": self.num_masks,
            "shape": list(self.mean_mask.shape),
            "threshold": float(self.threshold),
            "foreground_fraction": float(self.label_map.mean()),
            "mean_training_foreground": float(self.mean_mask.mean()),
        }


@dataclass(frozen=True)
class ImageFloor:
    """The floors of an ``ImageEvaluationHandler``: one per task, either may be None.

    Args:
        classification: the classification task's floor.
        segmentation: the segmentation task's floor.

    Raises:
        ValueError: when both are None.

    Example:
        >>> floor = ImageFloor(classification=ClassificationFloor(("nv", "mel"), (3, 1)))
    """

    classification: ClassificationFloor | None = None
    segmentation: MaskFloor | None = None

    def __post_init__(self) -> None:
        if self.classification is None and self.segmentation is None:
            raise ValueError("an ImageFloor needs a classification floor, a segmentation floor or both")


@dataclass(frozen=True)
class PrevalenceFloor:
    """The training prevalence of binary tasks as a constant score.

    Args:
        positives: labelled positive training patients per task.
        labelled: labelled training patients per task.
        unlabelled: training patients without the task's label (not counted anywhere else).

    Raises:
        ValueError: when the tasks of the three mappings differ or a count is inconsistent.

    Example:
        >>> floor = PrevalenceFloor({"covid": 3}, {"covid": 4}, {"covid": 1})
        >>> floor.prevalence("covid"), floor.majority_label("covid")
        (0.75, 1)
    """

    positives: Mapping[str, int]
    labelled: Mapping[str, int]
    unlabelled: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tasks = list(self.labelled)
        unlabelled = {t: int(self.unlabelled.get(t, 0)) for t in tasks}
        if set(self.positives) != set(tasks) or not set(self.unlabelled) <= set(tasks) or not tasks:
            raise ValueError(f"positives {sorted(self.positives)} and labelled {tasks} must name the same tasks")
        for task in tasks:
            if not 0 <= int(self.positives[task]) <= int(self.labelled[task]) or unlabelled[task] < 0:
                raise ValueError(
                    f"task {task!r}: {self.positives[task]} positives of {self.labelled[task]} labelled patients"
                )
        object.__setattr__(self, "positives", {t: int(self.positives[t]) for t in tasks})
        object.__setattr__(self, "labelled", {t: int(self.labelled[t]) for t in tasks})
        object.__setattr__(self, "unlabelled", unlabelled)

    @classmethod
    def from_datalist(cls, datalist: Iterable[Mapping[str, Any]], task_names: Sequence[str]) -> PrevalenceFloor:
        """Count the labelled training patients per task (``<task>_present`` 0 or a missing label: not counted).

        Args:
            datalist: one entry per training patient, labels 0/1 under the task names.
            task_names: the binary tasks.

        Returns:
            the floor.

        Raises:
            ValueError: when a labelled value is not 0 or 1, or no task is named.

        Example:
            >>> entries = [{"severe": 1.0, "severe_present": 1.0}, {"severe": 0.0, "severe_present": 0.0}]
            >>> PrevalenceFloor.from_datalist(entries, ["severe"]).labelled
            {'severe': 1}
        """
        tasks = list(task_names)
        positives = dict.fromkeys(tasks, 0)
        labelled = dict.fromkeys(tasks, 0)
        unlabelled = dict.fromkeys(tasks, 0)
        for entry in datalist:
            for task in tasks:
                if not _is_labelled(entry, task):
                    unlabelled[task] += 1
                    continue
                value = float(entry[task])
                if value not in (0.0, 1.0):
                    raise ValueError(f"task {task!r}: training label {value} of {entry.get('case_id')} is not 0/1")
                labelled[task] += 1
                positives[task] += int(value)
        return cls(positives, labelled, unlabelled)

    @property
    def task_names(self) -> list[str]:
        """The tasks."""
        return list(self.labelled)

    def prevalence(self, task: str) -> float:
        """The share of positives among the labelled training patients (NaN when none is labelled).

        Args:
            task: the task.

        Returns:
            the prevalence in [0, 1] or NaN.

        Raises:
            KeyError: for a task the floor does not know.
        """
        return self.positives[task] / self.labelled[task] if self.labelled[task] else math.nan

    def majority_label(self, task: str) -> int | None:
        """The majority training label: 1 when the prevalence is at least 0.5 (the constant score called at 0.5),
        else 0; None when no training patient is labelled.

        Args:
            task: the task.

        Returns:
            0, 1 or None.

        Raises:
            KeyError: for a task the floor does not know.
        """
        prevalence = self.prevalence(task)
        return None if math.isnan(prevalence) else int(prevalence >= 0.5)

    def metrics(
        self, labels: Sequence[float] | NdarrayOrTensor, present: Sequence[float] | None, task: str
    ) -> dict[str, float]:
        """The floor's metrics (%) of one task on the evaluated patients.

        Args:
            labels: the evaluated patients' 0/1 labels (any placeholder where missing).
            present: 0/1 per patient, 0 where the label is missing (left out); None: all labelled.
            task: the task.

        Returns:
            ``{"auc": 50 (a constant score), "accuracy": % of always answering the majority training label}``;
            accuracy NaN when no evaluated or no training patient is labelled.

        Raises:
            KeyError: for a task the floor does not know.

        Example:
            >>> PrevalenceFloor({"covid": 1}, {"covid": 4}).metrics([0, 0, 1, 1], [1, 1, 1, 0], "covid")
            {'auc': 50.0, 'accuracy': 66.66666666666666}
        """
        y = np.asarray(convert_to_numpy(labels), dtype=np.float64).reshape(-1)
        majority = self.majority_label(task)
        keep = np.ones(y.shape) if present is None else np.asarray(convert_to_numpy(present), dtype=np.float64)
        if majority is None or not np.any(keep == 1):
            return {"auc": CONSTANT_SCORE_AUC, "accuracy": math.nan}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc = accuracy(np.full(y.shape, majority), y, keep.reshape(-1), num_classes=2)
        return {"auc": CONSTANT_SCORE_AUC, "accuracy": float(acc)}

    def describe(self) -> dict[str, Any]:
        """The floor's definition, note and training counts per task, JSON-ready.

        Returns:
            ``{"definition", "note", "tasks": {task: {"num_training_labelled", "num_training_positive",
            "num_training_unlabelled", "prevalence", "majority_label"}}}``.

        Example:
            >>> PrevalenceFloor({"covid": 3}, {"covid": 4}).describe()["tasks"]["covid"]["prevalence"]
            0.75
        """
        return {
            "definition": (
                "per task, the prevalence among the labelled training patients as a constant score (patients "
                "without the task's label left out, not counted as negative); 'accuracy' is that of always "
                "answering the majority training label"
            ),
            "note": CONSTANT_SCORE_AUC_NOTE,
            "tasks": {
                task: {
                    "num_training_labelled": self.labelled[task],
                    "num_training_positive": self.positives[task],
                    "num_training_unlabelled": self.unlabelled[task],
                    "prevalence": self.prevalence(task),
                    "majority_label": self.majority_label(task),
                }
                for task in self.task_names
            },
        }


def compare_with_floor(
    model: Mapping[str, float],
    floor: Mapping[str, float],
    logger: logging.Logger | None = None,
    context: str = "",
) -> dict[str, bool | None]:
    """Whether the model beats its floor on each key metric (higher is better; strictly greater beats).

    A WARNING is logged for every key metric the model does not beat, naming the metric, the model's value and the
    floor's, and for every one that cannot be compared (a NaN on either side: the metric is undefined on this split).

    Args:
        model: key metric name to the model's value.
        floor: the same names to the floor's value.
        logger: where the warnings go; default ``ctan_monai.evaluation``.
        context: prefix of the messages (e.g. the metric prefix ``"val"``).

    Returns:
        metric name to True (beats), False (does not) or None (undefined).

    Raises:
        KeyError: when ``floor`` lacks one of ``model``'s metrics.

    Example:
        >>> compare_with_floor({"auc_covid": 72.0}, {"auc_covid": 50.0})
        {'auc_covid': True}
    """
    logger = logger or logging.getLogger("ctan_monai.evaluation")
    where = f"{context}: " if context else ""
    beats: dict[str, bool | None] = {}
    for name, value in model.items():
        mine, trivial = float(value), float(floor[name])
        if math.isnan(mine) or math.isnan(trivial):
            beats[name] = None
            logger.warning(
                "%sCANNOT COMPARE %s WITH ITS TRIVIAL FLOOR: model %s, floor %s (undefined on this split)",
                where,
                name,
                f"{mine:.2f}",
                f"{trivial:.2f}",
            )
            continue
        beats[name] = mine > trivial
        if not beats[name]:
            logger.warning(
                "%s!!! MODEL DOES NOT BEAT ITS TRIVIAL FLOOR on %s: model %.2f <= floor %.2f "
                "(trivial predictor built from the training split) !!!",
                where,
                name,
                mine,
                trivial,
            )
    return beats
