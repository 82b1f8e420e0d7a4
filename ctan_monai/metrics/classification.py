"""Classification metrics on labelled samples only: accuracy, balanced accuracy, recall, confusion, ROC AUC.

Every function takes an optional ``present`` mask (0/1 per sample, the batch's ``"<task>_present"``): a
sample with 0 has no label for the task (STOIC severity unknown) and is left out before anything is
computed, whatever its stored label. Undefined results (no labelled sample; a single class among the
labelled samples for ROC AUC) are NaN with an ``UndefinedMetricWarning``, never an exception, so that an
evaluation run on a small or one-sided split still finishes and says why a number is missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.config import NdarrayOrTensor
from monai.utils import convert_to_numpy
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

ArrayLike = NdarrayOrTensor | Sequence[float]


def _as_array(x: ArrayLike, name: str) -> np.ndarray:
    """A float64 numpy copy of ``x``."""
    array = np.asarray(convert_to_numpy(x), dtype=np.float64)
    if array.ndim == 0:
        raise ValueError(f"{name} must hold one entry per sample, got a scalar")
    return array


def _labelled(present: ArrayLike | None, num_samples: int) -> np.ndarray:
    """Boolean selector of the labelled samples, from an optional 0/1 presence mask."""
    if present is None:
        return np.ones(num_samples, dtype=bool)
    mask = _as_array(present, "present").reshape(-1)
    if mask.shape != (num_samples,) or not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"present must be {num_samples} values of 0/1, got shape {mask.shape} / values {mask[:8]}")
    return mask == 1


def _class_indices(pred: ArrayLike, num_samples: int, num_classes: int | None) -> np.ndarray:
    """Predicted class per sample from class indices ``[N]`` or scores/logits/probabilities ``[N, C]``."""
    array = _as_array(pred, "prediction")
    if array.ndim == 2:
        if array.shape[1] < 2:
            raise ValueError("[N, 1] scores are a binary task's: use roc_auc / binary_report, or pass class indices")
        if num_classes is not None and array.shape[1] != num_classes:
            raise ValueError(f"prediction scores have {array.shape[1]} columns, expected num_classes={num_classes}")
        array = array.argmax(axis=1)
    if array.shape != (num_samples,):
        raise ValueError(f"prediction must be [N] class indices or [N, C] scores, N={num_samples}; got {array.shape}")
    if not np.all(array == np.round(array)):
        raise ValueError("1-D predictions must be integer class indices (pass [N, C] scores to take the argmax)")
    return array.astype(np.int64)


def _multiclass_inputs(
    pred: ArrayLike, target: ArrayLike, num_classes: int | None, present: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled (predicted class, true class) pairs, validated against the class range."""
    y_true = _as_array(target, "target").reshape(-1)
    keep = _labelled(present, y_true.size)
    y_pred = _class_indices(pred, y_true.size, num_classes)[keep]
    y_true = y_true[keep]
    if not np.all(np.isfinite(y_true)) or not np.all(y_true == np.round(y_true)):
        raise ValueError("labelled targets must be integer class indices (mark unlabelled samples with present=0)")
    y_true = y_true.astype(np.int64)
    if num_classes is not None:
        for name, y in (("target", y_true), ("prediction", y_pred)):
            bad = np.unique(y[(y < 0) | (y >= num_classes)])
            if bad.size:
                raise ValueError(f"{name} classes {bad.tolist()} outside 0..{num_classes - 1}")
    return y_pred, y_true


def _warn_undefined(what: str, why: str) -> float:
    """Warn that a metric is undefined and return the NaN that stands for it."""
    warnings.warn(f"{what} is undefined: {why}; returning NaN", UndefinedMetricWarning, stacklevel=3)
    return float("nan")


def accuracy(
    pred: ArrayLike, target: ArrayLike, present: ArrayLike | None = None, num_classes: int | None = None
) -> float:
    """Accuracy (%) over the labelled samples.

    Args:
        pred: predicted class indices ``[N]`` or scores/logits ``[N, C]`` (argmax taken).
        target: true class indices ``[N]``.
        present: optional 0/1 per sample; 0 leaves the sample out.
        num_classes: optional number of classes, to check the indices.

    Returns:
        percent correct, NaN (with a warning) when no sample is labelled.

    Raises:
        ValueError: on mismatched lengths, non-integer labels or out-of-range classes.

    Example:
        >>> accuracy([0, 1, 1, 2], [0, 1, 2, 2])
        75.0
    """
    y_pred, y_true = _multiclass_inputs(pred, target, num_classes, present)
    if y_true.size == 0:
        return _warn_undefined("accuracy", "no labelled sample")
    return float(100.0 * skm.accuracy_score(y_true, y_pred))


def balanced_accuracy(
    pred: ArrayLike, target: ArrayLike, present: ArrayLike | None = None, num_classes: int | None = None
) -> float:
    """Balanced accuracy (%): the mean recall over the classes that occur among the labelled targets.

    Args:
        pred: predicted class indices ``[N]`` or scores/logits ``[N, C]``.
        target: true class indices ``[N]``.
        present: optional 0/1 per sample; 0 leaves the sample out.
        num_classes: optional number of classes, to check the indices.

    Returns:
        percent, NaN (with a warning) when no sample is labelled.

    Raises:
        ValueError: see :func:`accuracy`.

    Example:
        >>> balanced_accuracy([0, 0, 0, 0, 1], [0, 0, 0, 1, 1])  # recalls 1 and 1/2
        75.0
    """
    y_pred, y_true = _multiclass_inputs(pred, target, num_classes, present)
    if y_true.size == 0:
        return _warn_undefined("balanced accuracy", "no labelled sample")
    with warnings.catch_warnings():
        # a predicted class absent from the targets is expected on small splits; its recall is simply not counted
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(100.0 * skm.balanced_accuracy_score(y_true, y_pred))


def per_class_recall(
    pred: ArrayLike, target: ArrayLike, num_classes: int, present: ArrayLike | None = None
) -> np.ndarray:
    """Recall (%) of each class over the labelled samples (sensitivity per class).

    Args:
        pred: predicted class indices ``[N]`` or scores/logits ``[N, C]``.
        target: true class indices ``[N]``.
        num_classes: number of classes.
        present: optional 0/1 per sample; 0 leaves the sample out.

    Returns:
        float64 array ``[num_classes]``, NaN for a class with no labelled sample.

    Raises:
        ValueError: see :func:`accuracy`.

    Example:
        >>> per_class_recall([0, 0, 1, 1], [0, 1, 1, 1], num_classes=3).tolist()
        [100.0, 66.66666666666667, nan]
    """
    cm = confusion_matrix(pred, target, num_classes, present)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, 100.0 * np.diag(cm) / support, np.nan)


def confusion_matrix(
    pred: ArrayLike, target: ArrayLike, num_classes: int, present: ArrayLike | None = None
) -> np.ndarray:
    """Confusion matrix of the labelled samples: rows are true classes, columns predicted classes.

    Args:
        pred: predicted class indices ``[N]`` or scores/logits ``[N, C]``.
        target: true class indices ``[N]``.
        num_classes: number of classes (the matrix is ``num_classes x num_classes`` even if some never occur).
        present: optional 0/1 per sample; 0 leaves the sample out.

    Returns:
        int64 array ``[num_classes, num_classes]`` of counts.

    Raises:
        ValueError: see :func:`accuracy`.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 0, 1], num_classes=2).tolist()
        [[1, 1], [0, 1]]
    """
    y_pred, y_true = _multiclass_inputs(pred, target, num_classes, present)
    if y_true.size == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes)).astype(np.int64)


def multiclass_report(
    pred: ArrayLike, target: ArrayLike, class_names: Sequence[str], present: ArrayLike | None = None
) -> dict[str, Any]:
    """All multi-class figures of one task, as a JSON-ready dict.

    Args:
        pred: predicted class indices ``[N]`` or scores/logits ``[N, C]``.
        target: true class indices ``[N]``.
        class_names: names of the classes in index order (e.g. HAM10000's ``akiec, bcc, ...``).
        present: optional 0/1 per sample; 0 leaves the sample out.

    Returns:
        ``{"accuracy": %, "balanced_accuracy": %, "recall": {class: %}, "confusion_matrix": [[int]],
        "num_labelled": int}``.

    Raises:
        ValueError: see :func:`accuracy`.

    Example:
        >>> multiclass_report([0, 1, 1], [0, 1, 0], ["nv", "mel"])["balanced_accuracy"]
        75.0
    """
    names = list(class_names)
    num_classes = len(names)
    cm = confusion_matrix(pred, target, num_classes, present)
    recall = per_class_recall(pred, target, num_classes, present)
    return {
        "accuracy": accuracy(pred, target, present, num_classes),
        "balanced_accuracy": balanced_accuracy(pred, target, present, num_classes),
        "recall": {n: float(r) for n, r in zip(names, recall)},
        "confusion_matrix": cm.tolist(),
        "num_labelled": int(cm.sum()),
    }


def _binary_inputs(score: ArrayLike, target: ArrayLike, present: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """Labelled (score, 0/1 target) pairs of a binary task."""
    y_true = _as_array(target, "target").reshape(-1)
    y_score = _as_array(score, "score")
    if y_score.ndim == 2 and y_score.shape[1] == 1:
        y_score = y_score[:, 0]
    if y_score.shape != y_true.shape:
        raise ValueError(f"binary scores must be [N] or [N, 1] with N={y_true.size}, got {y_score.shape}")
    keep = _labelled(present, y_true.size)
    y_score, y_true = y_score[keep], y_true[keep]
    if not np.all((y_true == 0) | (y_true == 1)):
        raise ValueError("labelled binary targets must be 0 or 1 (mark unlabelled samples with present=0)")
    if not np.all(np.isfinite(y_score)):
        raise ValueError("binary scores hold NaN or infinite values")
    return y_score, y_true.astype(np.int64)


def _single_class_reason(y_true: np.ndarray) -> str | None:
    """Why ROC analysis is undefined for these labelled targets, or None when it is defined."""
    if y_true.size == 0:
        return "no labelled sample"
    if np.unique(y_true).size < 2:
        return f"only class {int(y_true[0])} among the {y_true.size} labelled samples"
    return None


def roc_auc(score: ArrayLike, target: ArrayLike, present: ArrayLike | None = None) -> float:
    """Area under the ROC curve (%) of a binary task over the labelled samples.

    Args:
        score: per-sample score ``[N]`` or ``[N, 1]``: logit or probability (the AUC depends only on the order).
        target: 0/1 labels ``[N]`` (values of unlabelled samples are ignored).
        present: optional 0/1 per sample; 0 leaves the sample out.

    Returns:
        the AUC in percent; NaN with an ``UndefinedMetricWarning`` when the labelled samples hold one class only.

    Raises:
        ValueError: on mismatched lengths, labelled targets other than 0/1, or non-finite scores.

    Example:
        >>> roc_auc([0.1, 0.4, 0.35, 0.8, 0.9], [0, 0, 1, 1, 0], present=[1, 1, 1, 1, 0])
        75.0
    """
    y_score, y_true = _binary_inputs(score, target, present)
    reason = _single_class_reason(y_true)
    if reason is not None:
        return _warn_undefined("ROC AUC", reason)
    return float(100.0 * skm.roc_auc_score(y_true, y_score))


def roc_curve_points(score: ArrayLike, target: ArrayLike, present: ArrayLike | None = None) -> dict[str, np.ndarray]:
    """ROC curve of a binary task over the labelled samples, for plotting.

    Args:
        score: per-sample score ``[N]`` or ``[N, 1]``.
        target: 0/1 labels ``[N]``.
        present: optional 0/1 per sample; 0 leaves the sample out.

    Returns:
        ``{"fpr": array, "tpr": array, "thresholds": array}`` (fractions, from (0, 0) to (1, 1)); empty arrays
        with an ``UndefinedMetricWarning`` when the labelled samples hold one class only.

    Raises:
        ValueError: see :func:`roc_auc`.

    Example:
        >>> roc_curve_points([0.2, 0.8], [0, 1])["tpr"].tolist()
        [0.0, 1.0, 1.0]
    """
    y_score, y_true = _binary_inputs(score, target, present)
    reason = _single_class_reason(y_true)
    if reason is not None:
        _warn_undefined("ROC curve", reason)
        empty = np.zeros(0, dtype=np.float64)
        return {"fpr": empty, "tpr": empty.copy(), "thresholds": empty.copy()}
    fpr, tpr, thresholds = skm.roc_curve(y_true, y_score)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


def binary_report(score: ArrayLike, target: ArrayLike, present: ArrayLike | None = None) -> dict[str, Any]:
    """ROC AUC of one binary task with its sample counts, as a JSON-ready dict.

    Args:
        score: per-sample score ``[N]`` or ``[N, 1]``.
        target: 0/1 labels ``[N]``.
        present: optional 0/1 per sample; 0 leaves the sample out.

    Returns:
        ``{"auc": % or NaN, "num_labelled": int, "num_positive": int}``.

    Raises:
        ValueError: see :func:`roc_auc`.

    Example:
        >>> binary_report([0.2, 0.8, 0.5], [0, 1, 1], present=[1, 1, 0])
        {'auc': 100.0, 'num_labelled': 2, 'num_positive': 1}
    """
    _, y_true = _binary_inputs(score, target, present)
    return {
        "auc": roc_auc(score, target, present),
        "num_labelled": int(y_true.size),
        "num_positive": int(y_true.sum()),
    }
