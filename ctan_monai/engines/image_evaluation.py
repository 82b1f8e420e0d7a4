"""Evaluation of 2D images with a pixel-level segmentation task and an image-level classification task (e.g.
HAM10000 lesion segmentation + diagnosis): per-image Dice, accuracy, balanced accuracy, per-class recall and the
confusion matrix in ``engine.state.metrics``, a JSON + CSV report and figures (confusion matrix, image / reference /
prediction overlays), all written atomically. Task and class names are arguments, so other 2D bundles can reuse it.
With a ``floor`` (``ctan_monai.engines.image_floors``: the trivial predictors built from the training split), the
floor's metrics are reported beside the model's and a model that does not beat it is logged loudly."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

from ctan_monai.engines.base import RunCollectorHandler, figures_never_fail, write_csv, write_report
from ctan_monai.engines.image_floors import ClassificationFloor, ImageFloor, MaskFloor, compare_with_floor
from ctan_monai.metrics.classification import binary_report, multiclass_report
from ctan_monai.metrics.segmentation import aggregate_dice, dice_report
from ctan_monai.utils.atomic import atomic_path

__all__ = ["ImageEvaluationHandler", "plot_confusion_matrix", "plot_overlays"]


class ImageEvaluationHandler(RunCollectorHandler):
    """Metrics of 2D images for a ``SupervisedEvaluator`` run with ``decollate=False`` (any batch size).

    Per image: the Dice (%) of each foreground structure of ``seg_task`` (background excluded; NaN when a structure
    is absent from both reference and prediction) and, for ``cls_task``, the class probabilities (softmax; sigmoid for
    a one-logit binary task, thresholded at 0.5) and the predicted class. At the end of the run
    ``engine.state.metrics`` gets ``{prefix}_mean_dice``, ``{prefix}_dice_<structure>``, ``{prefix}_accuracy``,
    ``{prefix}_balanced_accuracy``, ``{prefix}_recall_<class>`` (and ``{prefix}_auc`` for a binary task); when
    ``output_dir`` is set, ``report.json`` (summary with the confusion matrix and chance levels, and every image),
    ``images.csv`` (one row per image) and ``figures/confusion_matrix.png`` and ``figures/overlays.png`` are written
    there. Images whose ``<task>_present`` flag is 0 are left out of that task's figures.

    With ``floor`` (built from the *training* split only, see ``ctan_monai.engines.image_floors``), the same images
    are scored for the trivial predictors: the mean training mask with the same Dice (``floor_mean_dice`` per image
    in the report and CSV), the majority training class with the same accuracy and balanced accuracy, and the
    expected values of a guess drawn from the training prior. ``engine.state.metrics`` gets
    ``{prefix}_floor_mean_dice``, ``{prefix}_floor_dice_<structure>``, ``{prefix}_floor_accuracy``,
    ``{prefix}_floor_balanced_accuracy`` (majority class), ``{prefix}_floor_prior_accuracy`` and
    ``{prefix}_floor_prior_balanced_accuracy``; the summary gets a ``floor`` block (definitions, training counts,
    metrics, and ``key_metrics``: the value each key metric is compared with, the best trivial predictor's) and
    ``beats_floor`` (``mean_dice``, ``balanced_accuracy``: True, False or None when undefined). A WARNING is logged
    for each key metric the model does not beat, naming the metric, the model's value and the floor's.

    Args:
        seg_task: the segmentation task's name, or None when there is none.
        structure_names: names of the segmentation classes 1..C-1 (e.g. ``["lesion"]``).
        cls_task: the classification task's name, or None when there is none.
        class_names: names of the classification classes in index order (two names for a one-logit binary task).
        output_dir: folder for the report and figures; None to only set metrics.
        figures: images shown in ``overlays.png``: the first image of each true class (in class order), then the
            first images of the run; 0 for no overlay figure.
        prefix: metric name prefix.
        id_key: batch key of the image ids (strings) used in the report.
        image_mean: per-channel mean the images were normalised with, to show them in their colours; None scales each
            image to [0, 1] for display.
        image_std: per-channel standard deviation of that normalisation.
        floor: the trivial floor from the training split: an ``ImageFloor``, or a ``ClassificationFloor`` or
            ``MaskFloor`` alone; None for no floor.

    Raises:
        ValueError: when neither task is given, ``class_names`` is missing for a classification task, or the floor
            names other classes than ``class_names`` or is given for a task the handler does not evaluate.

    Example:
        >>> handler = ImageEvaluationHandler("seg", ["lesion"], "dx", ["nv", "mel"], output_dir=None)
    """

    def __init__(
        self,
        seg_task: str | None = "seg",
        structure_names: Sequence[str] = ("lesion",),
        cls_task: str | None = None,
        class_names: Sequence[str] | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        figures: int = 4,
        prefix: str = "val",
        id_key: str = "image_id",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        floor: ImageFloor | ClassificationFloor | MaskFloor | None = None,
    ) -> None:
        if seg_task is None and cls_task is None:
            raise ValueError("ImageEvaluationHandler needs a seg_task, a cls_task or both")
        if cls_task is not None and (class_names is None or len(class_names) < 2):
            raise ValueError(f"class_names must name at least two classes for task {cls_task!r}, got {class_names}")
        self.seg_task = seg_task
        self.structure_names = list(structure_names)
        self.cls_task = cls_task
        self.class_names = list(class_names or [])
        self.output_dir = Path(output_dir) if output_dir else None
        self.figures = int(figures)
        self.prefix = prefix
        self.id_key = id_key
        self.image_mean = None if image_mean is None else np.asarray(image_mean, dtype=np.float32)
        self.image_std = None if image_std is None else np.asarray(image_std, dtype=np.float32)
        self.floor = self._check_floor(floor)
        self.logger = logging.getLogger("ctan_monai.evaluation")
        self.summary: dict[str, Any] = {}
        self.reset()

    def _check_floor(self, floor: ImageFloor | ClassificationFloor | MaskFloor | None) -> ImageFloor | None:
        """The floor as an ``ImageFloor``, checked against the handler's tasks and classes."""
        if floor is None or isinstance(floor, ImageFloor):
            pass
        elif isinstance(floor, ClassificationFloor):
            floor = ImageFloor(classification=floor)
        elif isinstance(floor, MaskFloor):
            floor = ImageFloor(segmentation=floor)
        else:
            raise TypeError(f"floor must be an ImageFloor, ClassificationFloor or MaskFloor, got {type(floor)}")
        if floor is None:
            return None
        if floor.classification is not None:
            if self.cls_task is None:
                raise ValueError("a classification floor was given but the handler has no cls_task")
            if list(floor.classification.class_names) != self.class_names:
                raise ValueError(
                    f"the floor's classes {list(floor.classification.class_names)} differ from {self.class_names}"
                )
        if floor.segmentation is not None and self.seg_task is None:
            raise ValueError("a segmentation floor was given but the handler has no seg_task")
        return floor

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the images of a previous run."""
        self.rows: list[dict[str, Any]] = []
        self._scores: list[np.ndarray] = []
        self._targets: list[float] = []
        self._present: list[float] = []
        self._shown: list[dict[str, Any]] = []
        self._first_of_class: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------------ per batch

    def iteration_completed(self, engine: Engine) -> None:
        """Score the images of the batch just evaluated.

        Raises:
            TypeError: when the evaluator decollates its output (set ``decollate: false``).
            KeyError: when a task's prediction is missing from the network output.
        """
        output = engine.state.output
        if not isinstance(output, Mapping):
            raise TypeError("ImageEvaluationHandler needs the evaluator's batched output: set decollate=False")
        pred: Mapping[str, torch.Tensor] = output["pred"]
        targets: Mapping[str, torch.Tensor] = output.get("label") or {}
        images = output["image"]
        size = images.shape[0]
        ids = engine.state.batch.get(self.id_key) if isinstance(engine.state.batch, Mapping) else None
        ids = [str(i) for i in ids] if ids is not None else [f"image_{len(self.rows) + i}" for i in range(size)]
        seg = self._segmentation(pred, targets, size)
        cls = self._classification(pred, targets, size)
        for i in range(size):
            row: dict[str, Any] = {"image_id": ids[i]}
            if seg is not None and seg["present"][i]:
                report = dice_report(seg["pred"][i], seg["ref"][i], self.structure_names)
                row["dice"], row["mean_dice"] = report["dice"], report["mean_dice"]
                if self.floor is not None and self.floor.segmentation is not None:
                    trivial = self.floor.segmentation.label_map_for(seg["ref"][i].shape)
                    report = dice_report(trivial, seg["ref"][i], self.structure_names)
                    row["floor_dice"], row["floor_mean_dice"] = report["dice"], report["mean_dice"]
            if cls is not None:
                probs = cls["probs"][i]
                row["probabilities"] = dict(zip(self.class_names, (float(p) for p in probs)))
                row["predicted_class"] = self.class_names[int(cls["pred"][i])]
                row["true_class"] = self.class_names[int(cls["target"][i])] if cls["present"][i] else None
                self._scores.append(cls["scores"][i])
                self._targets.append(float(cls["target"][i]) if cls["present"][i] else 0.0)
                self._present.append(1.0 if cls["present"][i] else 0.0)
            self.rows.append(row)
            if self.output_dir is not None and self.figures > 0:
                self._keep_for_figure(images[i], row, seg, cls, i)

    def _segmentation(
        self, pred: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], size: int
    ) -> dict[str, np.ndarray] | None:
        if self.seg_task is None:
            return None
        if self.seg_task not in pred:
            raise KeyError(f"network output has no {self.seg_task!r} (segmentation task); got {sorted(pred)}")
        labels = pred[self.seg_task].argmax(dim=1).cpu().numpy()
        if self.seg_task not in targets:
            return {"pred": labels, "ref": labels, "present": np.zeros(size, dtype=bool)}
        present = _present(targets, self.seg_task, size)
        return {"pred": labels, "ref": targets[self.seg_task][:, 0].cpu().numpy(), "present": present}

    def _classification(
        self, pred: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], size: int
    ) -> dict[str, np.ndarray] | None:
        if self.cls_task is None:
            return None
        if self.cls_task not in pred:
            raise KeyError(f"network output has no {self.cls_task!r} (classification task); got {sorted(pred)}")
        logits = pred[self.cls_task].detach().float().reshape(size, -1).cpu()
        if logits.shape[1] == 1:  # binary: one logit, probability of class 1
            positive = torch.sigmoid(logits[:, 0])
            probs = torch.stack([1 - positive, positive], dim=1)
            scores = positive[:, None]
        elif logits.shape[1] == len(self.class_names):
            probs = torch.softmax(logits, dim=1)
            scores = probs
        else:
            raise ValueError(
                f"task {self.cls_task!r} has {logits.shape[1]} outputs for {len(self.class_names)} class names"
            )
        if self.cls_task in targets:
            target = targets[self.cls_task].reshape(size, -1)[:, 0].cpu().numpy()
            present = _present(targets, self.cls_task, size)
        else:
            target, present = np.zeros(size), np.zeros(size, dtype=bool)
        return {
            "probs": probs.numpy(),
            "scores": scores.numpy(),
            "pred": probs.argmax(dim=1).numpy(),
            "target": target,
            "present": present,
        }

    def _keep_for_figure(
        self,
        image: torch.Tensor,
        row: Mapping[str, Any],
        seg: Mapping[str, np.ndarray] | None,
        cls: Mapping[str, np.ndarray] | None,
        i: int,
    ) -> None:
        """Keep the first ``figures`` images and the first image of each true class, for the overlay figure."""
        true_class = int(cls["target"][i]) if cls is not None and cls["present"][i] else None
        wanted_first = len(self._shown) < self.figures
        wanted_class = true_class is not None and true_class not in self._first_of_class
        if not (wanted_first or wanted_class):
            return
        sample = {
            "image": self._display_image(image),
            "pred": None if seg is None else seg["pred"][i],
            "ref": None if seg is None or not seg["present"][i] else seg["ref"][i],
            "title": _overlay_title(row),
        }
        if wanted_first:
            self._shown.append(sample)
        if wanted_class:
            self._first_of_class[true_class] = sample

    def _display_image(self, image: torch.Tensor) -> np.ndarray:
        """[C, H, W] network input -> [H, W, 3] (or [H, W]) in [0, 1] for display."""
        array = image.detach().float().cpu().numpy()
        if self.image_mean is not None and self.image_std is not None and array.shape[0] == self.image_mean.size:
            array = array * self.image_std[:, None, None] + self.image_mean[:, None, None]
        else:
            array = (array - array.min()) / max(float(array.max() - array.min()), 1e-6)
        array = np.clip(array, 0.0, 1.0)
        return array.transpose(1, 2, 0) if array.shape[0] == 3 else array[0]

    # ------------------------------------------------------------------------------------------------ end of run

    def run_completed(self, engine: Engine) -> None:
        """Aggregate over images into ``engine.state.metrics`` and write the report and figures."""
        summary: dict[str, Any] = {"num_images": len(self.rows)}
        metrics = engine.state.metrics
        scored = [r for r in self.rows if "dice" in r]
        if scored:
            dice = aggregate_dice([{"dice": r["dice"], "mean_dice": r["mean_dice"]} for r in scored])
            per_image = np.asarray([r["mean_dice"] for r in scored], dtype=np.float64)
            per_image = per_image[~np.isnan(per_image)]
            summary["segmentation"] = {
                "task": self.seg_task,
                "mean_dice": dice["mean_dice"],
                "dice": dice["dice"],
                "median_dice": float(np.median(per_image)) if per_image.size else float("nan"),
                "num_images": len(scored),
            }
            metrics[f"{self.prefix}_mean_dice"] = dice["mean_dice"]
            for name, value in dice["dice"].items():
                metrics[f"{self.prefix}_dice_{name}"] = value
        if self.cls_task is not None and sum(self._present) > 0:
            classification = self._classification_summary()
            summary["classification"] = classification
            metrics[f"{self.prefix}_accuracy"] = classification["accuracy"]
            metrics[f"{self.prefix}_balanced_accuracy"] = classification["balanced_accuracy"]
            for name, value in classification["recall"].items():
                metrics[f"{self.prefix}_recall_{name}"] = value
            if "auc" in classification:
                metrics[f"{self.prefix}_auc"] = classification["auc"]
        if self.floor is not None:
            self._floor_summary(summary, metrics, scored)
        self.summary = summary
        flat = {
            "num_images": summary["num_images"],
            "mean_dice": summary.get("segmentation", {}).get("mean_dice"),
            "accuracy": summary.get("classification", {}).get("accuracy"),
            "balanced_accuracy": summary.get("classification", {}).get("balanced_accuracy"),
        }
        self.logger.info("%s: %s", self.prefix, {k: v for k, v in flat.items() if v is not None})
        if self.output_dir is not None:
            self._write_report(engine, summary)
            self._write_figures(summary)

    def _floor_summary(self, summary: dict[str, Any], metrics: dict[str, Any], scored: list[dict[str, Any]]) -> None:
        """Score the floor on the run's images; add ``floor`` and ``beats_floor`` to ``summary`` and the floor's
        metrics to ``metrics``; warn for each key metric the model does not beat."""
        assert self.floor is not None
        block: dict[str, Any] = {"source": "training split only", "key_metrics": {}}
        model: dict[str, float] = {}
        if self.floor.segmentation is not None and "segmentation" in summary:
            dice = aggregate_dice([{"dice": r["floor_dice"], "mean_dice": r["floor_mean_dice"]} for r in scored])
            block["segmentation"] = {
                **self.floor.segmentation.describe(),
                "mean_dice": dice["mean_dice"],
                "dice": dice["dice"],
            }
            metrics[f"{self.prefix}_floor_mean_dice"] = dice["mean_dice"]
            for name, value in dice["dice"].items():
                metrics[f"{self.prefix}_floor_dice_{name}"] = value
            block["key_metrics"]["mean_dice"] = dice["mean_dice"]
            model["mean_dice"] = summary["segmentation"]["mean_dice"]
        if self.floor.classification is not None and "classification" in summary:
            values = self.floor.classification.metrics(np.asarray(self._targets), np.asarray(self._present))
            block["classification"] = {**self.floor.classification.describe(), **values}
            for name, value in values.items():
                metrics[f"{self.prefix}_floor_{name}"] = value
            best = [v for v in (values["balanced_accuracy"], values["prior_balanced_accuracy"]) if not math.isnan(v)]
            block["key_metrics"]["balanced_accuracy"] = max(best) if best else math.nan
            model["balanced_accuracy"] = summary["classification"]["balanced_accuracy"]
        summary["floor"] = block
        summary["beats_floor"] = compare_with_floor(model, block["key_metrics"], self.logger, self.prefix)
        self.logger.info(
            "%s: trivial floor (training split) %s, beats floor %s",
            self.prefix,
            {k: round(v, 2) for k, v in block["key_metrics"].items()},
            summary["beats_floor"],
        )

    def _classification_summary(self) -> dict[str, Any]:
        scores = np.stack(self._scores)
        target, present = np.asarray(self._targets), np.asarray(self._present)
        if scores.shape[1] == 1:  # binary: class 1 at probability >= 0.5
            result = multiclass_report((scores[:, 0] >= 0.5).astype(np.int64), target, self.class_names, present)
            result.update(binary_report(scores, target, present))
        else:
            result = multiclass_report(scores, target, self.class_names, present)
        support = np.asarray(result["confusion_matrix"]).sum(axis=1)
        result["task"] = self.cls_task
        result["class_names"] = list(self.class_names)
        result["class_counts"] = dict(zip(self.class_names, (int(n) for n in support)))
        # what guessing achieves: balanced accuracy 100 / (classes present); accuracy of always the largest class
        result["chance_balanced_accuracy"] = 100.0 / max(int((support > 0).sum()), 1)
        result["majority_class_accuracy"] = 100.0 * float(support.max()) / max(float(support.sum()), 1.0)
        return result

    def _write_report(self, engine: Engine, summary: Mapping[str, Any]) -> None:
        write_report(self.output_dir / "report.json", engine, summary, "images", self.rows)
        columns = ["image_id"]
        if self.seg_task is not None:
            columns += ["mean_dice", *[f"dice_{n}" for n in self.structure_names]]
        floor_dice = self.seg_task is not None and self.floor is not None and self.floor.segmentation is not None
        if floor_dice:
            columns.append("floor_mean_dice")
        if self.cls_task is not None:
            columns += ["true_class", "predicted_class", *[f"prob_{n}" for n in self.class_names]]
        rows = []
        for row in self.rows:
            dice, probs = row.get("dice", {}), row.get("probabilities", {})
            values: list[Any] = [row["image_id"]]
            if self.seg_task is not None:
                values += [row.get("mean_dice"), *[dice.get(n) for n in self.structure_names]]
            if floor_dice:
                values.append(row.get("floor_mean_dice"))
            if self.cls_task is not None:
                values += [row.get("true_class"), row.get("predicted_class"), *[probs.get(n) for n in self.class_names]]
            rows.append(values)
        write_csv(self.output_dir / "images.csv", columns, rows)

    def _write_figures(self, summary: Mapping[str, Any]) -> None:
        figures = self.output_dir / "figures"
        with figures_never_fail(self.logger, f"figures in {figures}"):
            if "classification" in summary:
                result = summary["classification"]
                title = f"accuracy {result['accuracy']:.1f}%, balanced accuracy {result['balanced_accuracy']:.1f}%"
                plot_confusion_matrix(
                    np.asarray(result["confusion_matrix"]),
                    self.class_names,
                    figures / "confusion_matrix.png",
                    title=f"{self.cls_task}: {title} (n={result['num_labelled']})",
                )
            samples = [self._first_of_class[k] for k in sorted(self._first_of_class)]
            samples += [s for s in self._shown if all(s is not t for t in samples)]
            samples = samples[: self.figures]
            if samples:
                plot_overlays(samples, self.structure_names, figures / "overlays.png")


def _present(targets: Mapping[str, torch.Tensor], task: str, size: int) -> np.ndarray:
    """Whether each image carries the task's label (``<task>_present``; all when the flag is absent)."""
    flag = targets.get(f"{task}_present")
    if flag is None:
        return np.ones(size, dtype=bool)
    return flag.reshape(size, -1)[:, 0].cpu().numpy() > 0


def _overlay_title(row: Mapping[str, Any]) -> str:
    parts = [str(row["image_id"])]
    if row.get("true_class") is not None:
        parts.append(f"true {row['true_class']}")
    if "predicted_class" in row:
        probability = row["probabilities"][row["predicted_class"]]
        parts.append(f"pred {row['predicted_class']} ({probability:.2f})")
    if row.get("mean_dice") is not None and not math.isnan(row["mean_dice"]):
        parts.append(f"Dice {row['mean_dice']:.1f}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- figures


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike[str], title: str = ""
) -> None:
    """Confusion matrix (rows: true class, columns: predicted class) coloured by row share (the recall on the
    diagonal), with the counts written in the cells, beside a bar chart of the per-class recall.

    Args:
        matrix: counts ``[C, C]``.
        class_names: the class names in index order.
        path: PNG file to write (atomically).
        title: figure title.

    Example:
        >>> plot_confusion_matrix(np.array([[3, 1], [0, 2]]), ["nv", "mel"], "cm.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: bundles run on servers
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=np.int64)
    support = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, support, out=np.zeros(counts.shape, dtype=np.float64), where=support > 0)
    n = len(class_names)
    fig, (ax, bar) = plt.subplots(1, 2, figsize=(4.2 + 0.55 * n + 3.5, 0.55 * n + 2.2), width_ratios=[1.6, 1])
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for r in range(n):
        for c in range(n):
            ax.text(
                c,
                r,
                str(counts[r, c]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[r, c] > 0.6 else "black",
            )
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{name} ({int(s)})" for name, s in zip(class_names, support[:, 0])], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (images)")
    recall = np.where(support[:, 0] > 0, 100.0 * np.diag(share), np.nan)
    bar.barh(range(n), np.nan_to_num(recall), color="tab:blue")
    present = int((support[:, 0] > 0).sum())
    if present:
        bar.axvline(100.0 / present, color="tab:red", linestyle="--", label=f"chance ({100.0 / present:.1f}%)")
        bar.legend(fontsize=7, loc="lower right")
    bar.set_yticks(range(n), class_names, fontsize=8)
    bar.invert_yaxis()
    bar.set_xlim(0, 100)
    bar.set_xlabel("recall (%)")
    bar.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_overlays(
    samples: Sequence[Mapping[str, Any]], structure_names: Sequence[str], path: str | os.PathLike[str]
) -> None:
    """One row per image: the image, the reference mask over it, the predicted mask over it (filled, with the
    reference outline for comparison).

    Args:
        samples: dicts with ``image`` ([H, W, 3] or [H, W] in [0, 1]), ``ref`` and ``pred`` (label maps [H, W] or
            None) and ``title``.
        structure_names: names of labels 1..C-1 (colours and legend).
        path: PNG file to write (atomically).

    Example:
        >>> plot_overlays([{"image": np.zeros((8, 8, 3)), "ref": None, "pred": None, "title": "x"}], ["lesion"],
        ...               "overlays.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.cm.tab10(np.arange(max(len(structure_names), 1)) % 10)
    fig, axes = plt.subplots(len(samples), 3, figsize=(9, 2.9 * len(samples)), squeeze=False)
    for row, sample in enumerate(samples):
        image = sample["image"]
        cmap = None if image.ndim == 3 else "gray"
        for col, (key, name) in enumerate(((None, "image"), ("ref", "reference"), ("pred", "prediction"))):
            ax = axes[row, col]
            ax.imshow(image, cmap=cmap)
            labels = sample.get(key) if key else None
            if labels is not None:
                for label, colour in enumerate(colours, start=1):
                    inside = labels == label
                    if inside.any():
                        fill = np.zeros((*inside.shape, 4))
                        fill[inside] = (*colour[:3], 0.35)
                        ax.imshow(fill)
                        ax.contour(inside, levels=[0.5], colors=[colour], linewidths=1.2)
            if key == "pred" and sample.get("ref") is not None:
                for label in range(1, len(structure_names) + 1):
                    if (sample["ref"] == label).any():
                        ax.contour(sample["ref"] == label, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(
                name if col else sample.get("title", ""),
                fontsize=7 if not col else 8,
                loc="left" if not col else "center",
            )
            ax.axis("off")
    handles = [plt.Line2D([0], [0], color=c, label=n) for n, c in zip(structure_names, colours)]
    handles.append(plt.Line2D([0], [0], color="white", label="reference outline (on prediction)"))
    fig.tight_layout()
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=len(handles),
        fontsize=8,
        facecolor="lightgrey",
        framealpha=1.0,
    )
    _save(fig, path)
