"""Patient-level evaluation of binary image-level tasks: the probabilities of a patient's samples (2.5D slices, or one
3D volume) are averaged per patient; AUC (%) and accuracy at a threshold are computed on the patients that carry
the task's label only; a JSON + CSV report, the per-patient predictions and ROC curve figures are written
atomically. With a ``floor`` (the training prevalence as a constant score, ``ctan_monai.engines.image_floors``), the
floor's metrics are reported beside the model's and a model that does not beat it is logged loudly."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

from ctan_monai.engines.base import RunCollectorHandler, figures_never_fail, write_csv, write_report
from ctan_monai.engines.image_floors import CONSTANT_SCORE_AUC, PrevalenceFloor, compare_with_floor
from ctan_monai.metrics.classification import accuracy, binary_report, confusion_matrix, roc_curve_points
from ctan_monai.utils.atomic import atomic_path, atomic_write_json

__all__ = ["PatientClassificationHandler", "patient_table", "plot_roc_curve", "task_metrics"]


def patient_table(
    case_ids: Sequence[str],
    probs: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray] | None = None,
    present: Mapping[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Per patient: the number of samples, each task's mean probability and (when given) its label.

    Args:
        case_ids: the patient of each sample.
        probs: ``{task: [N] probabilities}``.
        labels: ``{task: [N] 0/1 labels}`` for the tasks that have labels.
        present: ``{task: [N] 0/1}`` presence flags (1 for every sample of a task not listed).

    Returns:
        ``[{"case_id", "num_samples", "<task>_prob", "<task>_label" (None when missing), ...}]`` in order of first
        appearance.

    Raises:
        ValueError: when a length differs from ``case_ids`` or a patient's samples disagree on a label or its
            presence (the samples of one patient must carry that patient's labels).

    Example:
        >>> rows = patient_table(["a", "a", "b"], {"covid": np.array([0.2, 0.4, 0.9])},
        ...                      {"covid": np.array([1.0, 1.0, 0.0])}, {"covid": np.array([1.0, 1.0, 0.0])})
        >>> [(r["case_id"], r["num_samples"], round(r["covid_prob"], 2), r["covid_label"]) for r in rows]
        [('a', 2, 0.3, 1), ('b', 1, 0.9, None)]
    """
    ids = [str(c) for c in case_ids]
    labels, present = dict(labels or {}), dict(present or {})
    for name, arrays in (("probabilities", probs), ("labels", labels), ("presence flags", present)):
        for task, values in arrays.items():
            if len(values) != len(ids):
                raise ValueError(f"task {task!r}: {len(values)} {name} for {len(ids)} samples")
    rows: dict[str, list[int]] = {}
    for index, case in enumerate(ids):
        rows.setdefault(case, []).append(index)
    table = []
    for case, indices in rows.items():
        row: dict[str, Any] = {"case_id": case, "num_samples": len(indices)}
        for task, values in probs.items():
            row[f"{task}_prob"] = float(np.mean(np.asarray(values, dtype=np.float64)[indices]))
            if task not in labels:
                continue
            flags = np.asarray(present.get(task, np.ones(len(ids))), dtype=np.float64)[indices]
            known = np.asarray(labels[task], dtype=np.float64)[indices]
            if np.unique(flags).size > 1 or (flags[0] == 1 and np.unique(known).size > 1):
                raise ValueError(f"patient {case!r}: its samples disagree on the {task!r} label or its presence")
            row[f"{task}_label"] = int(known[0]) if flags[0] == 1 else None
        table.append(row)
    return table


def task_metrics(table: Sequence[Mapping[str, Any]], task: str, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of one binary task over the patients that carry its label.

    Args:
        table: ``patient_table`` rows.
        task: the task.
        threshold: the probability from which a patient is called positive.

    Returns:
        ``{"auc": %, "accuracy": % at threshold, "sensitivity": %, "specificity": %, "num_labelled",
        "num_positive", "num_unlabelled"}``; NaN where undefined (e.g. AUC with one class among the labelled).

    Example:
        >>> rows = [{"covid_prob": 0.8, "covid_label": 1}, {"covid_prob": 0.3, "covid_label": 0},
        ...         {"covid_prob": 0.9, "covid_label": None}]
        >>> task_metrics(rows, "covid")["auc"], task_metrics(rows, "covid")["num_labelled"]
        (100.0, 2)
    """
    probs = np.array([row[f"{task}_prob"] for row in table], dtype=np.float64)
    given = [row.get(f"{task}_label") for row in table]
    present = np.array([label is not None for label in given], dtype=np.float64)
    labels = np.array([0 if label is None else label for label in given], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined values are NaN in the report; the log says why
        report = binary_report(probs, labels, present) if len(table) else {"auc": math.nan, "num_labelled": 0}
        called = (probs >= threshold).astype(np.int64)
        acc = accuracy(called, labels, present, num_classes=2) if len(table) else math.nan
        cm = confusion_matrix(called, labels, 2, present) if len(table) else np.zeros((2, 2))
    negatives, positives = int(cm[0].sum()), int(cm[1].sum())
    return {
        "auc": float(report["auc"]),
        "accuracy": float(acc),
        "sensitivity": 100.0 * int(cm[1, 1]) / positives if positives else math.nan,
        "specificity": 100.0 * int(cm[0, 0]) / negatives if negatives else math.nan,
        "num_labelled": int(present.sum()),
        "num_positive": int(labels[present == 1].sum()),
        "num_unlabelled": int(len(table) - present.sum()),
    }


def plot_roc_curve(
    table: Sequence[Mapping[str, Any]], task: str, path: str | os.PathLike[str], auc: float | None = None
) -> None:
    """ROC curve of one task over the labelled patients, with the chance diagonal, as a PNG (written atomically).

    Args:
        table: ``patient_table`` rows.
        task: the task.
        path: the PNG file.
        auc: the AUC (%) for the legend.

    Example:
        >>> plot_roc_curve(rows, "covid", "figures/roc_covid.png", auc=75.0)  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: bundles run on servers
    import matplotlib.pyplot as plt

    labelled = [row for row in table if row.get(f"{task}_label") is not None]
    probs = [row[f"{task}_prob"] for row in labelled]
    labels = [row[f"{task}_label"] for row in labelled]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = roc_curve_points(probs, labels) if labelled else {"fpr": np.zeros(0), "tpr": np.zeros(0)}
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    positives = int(sum(labels))
    if curve["fpr"].size:
        name = f"AUC {auc:.1f} %" if auc is not None and math.isfinite(auc) else "ROC"
        ax.plot(curve["fpr"], curve["tpr"], marker="o", markersize=3, label=name)
    else:
        ax.text(0.5, 0.5, "undefined: one class only\namong the labelled patients", ha="center", va="center")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{task}: {len(labelled)} labelled patients ({positives} positive)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


class PatientClassificationHandler(RunCollectorHandler):
    """Patient-level metrics and predictions of binary image-level tasks, for a ``SupervisedEvaluator`` with
    ``decollate=False``.

    Each iteration, the sigmoid of every task's logits (``engine.state.output["pred"][task]``, one per sample) is
    recorded with the sample's patient (``engine.state.batch[case_key]``) and, when the targets carry them, the
    task's label and ``<task>_present`` flag. At the end of the run the samples' probabilities are averaged per
    patient (``patient_table``: the patient-level probability of 2.5D is the mean over its slices); for every task
    with labels, AUC (%), accuracy, sensitivity and specificity at ``threshold`` are computed over the patients that
    carry that task's label (a missing label is left out, never counted as negative, ``task_metrics``) and set in
    ``engine.state.metrics`` as ``{prefix}_auc_<task>``, ``{prefix}_accuracy_<task>`` and ``{prefix}_mean_auc``.

    With ``floor`` (a ``PrevalenceFloor`` counted on the labelled *training* patients only), each labelled task is
    also scored for the training prevalence as a constant score: AUC 50 by construction (a constant score has AUC
    0.5) and the accuracy of always answering the majority training label, on the same labelled patients.
    ``engine.state.metrics`` gets ``{prefix}_floor_auc_<task>``, ``{prefix}_floor_accuracy_<task>`` and
    ``{prefix}_floor_mean_auc``; the summary gets a ``floor`` block (definition, note, training counts and
    prevalence, floor metrics per task) and ``beats_floor`` (``auc_<task>``: True, False or None when undefined);
    a WARNING is logged for each task whose AUC does not beat the floor's, naming metric, model and floor values.

    When ``output_dir`` is set, these files are written there, each atomically: ``predictions.json`` (per patient,
    ``prediction_names`` of each task, e.g. ``{"1": {"probCOVID": 0.71, "probSevere": 0.12}}``) and
    ``predictions.csv`` (the same, in the layout of STOIC's reference.csv); with labels, ``report.json`` (summary and
    per patient), ``cases.csv`` and ``figures/roc_<task>.png``; with ``per_case_files``, ``<case_id>.json`` per patient
    (``{"PatientID": ..., "probCOVID": ..., "probSevere": ...}``).

    Args:
        task_names: the binary tasks (network outputs with one logit per sample).
        output_dir: folder of the files; None to only set metrics.
        prefix: metric name prefix.
        threshold: probability from which a patient is called positive.
        case_key: the batch key holding each sample's patient id.
        prediction_names: output name of each task in the prediction files (the task name when not given).
        per_case_files: also write one JSON per patient.
        figures: write the ROC curves.
        floor: the training prevalence per task (``PrevalenceFloor.from_datalist(training entries, task_names)``);
            None for no floor.

    Raises:
        ValueError: when ``floor`` lacks one of ``task_names``; (at run time) when a task's output is not one
            logit per sample, or the batch's patient ids do not match the number of samples.

    Example:
        >>> handler = PatientClassificationHandler(["covid", "severe"], output_dir=None)
    """

    def __init__(
        self,
        task_names: Sequence[str],
        output_dir: str | os.PathLike[str] | None = None,
        prefix: str = "val",
        threshold: float = 0.5,
        case_key: str = "case_id",
        prediction_names: Mapping[str, str] | None = None,
        per_case_files: bool = False,
        figures: bool = True,
        floor: PrevalenceFloor | None = None,
    ) -> None:
        if not task_names:
            raise ValueError("task_names must name at least one task")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.task_names = list(task_names)
        self.output_dir = Path(output_dir) if output_dir else None
        self.prefix = prefix
        self.threshold = float(threshold)
        self.case_key = case_key
        self.prediction_names = {t: str((prediction_names or {}).get(t, t)) for t in self.task_names}
        self.per_case_files = per_case_files
        self.figures = figures
        if floor is not None and not set(self.task_names) <= set(floor.task_names):
            raise ValueError(f"the floor knows tasks {floor.task_names}, the handler evaluates {self.task_names}")
        self.floor = floor
        self.logger = logging.getLogger("ctan_monai.evaluation")
        self.table: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.reset()

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the samples of a previous run."""
        self._case_ids: list[str] = []
        self._probs: dict[str, list[np.ndarray]] = {t: [] for t in self.task_names}
        self._labels: dict[str, list[np.ndarray]] = {t: [] for t in self.task_names}
        self._present: dict[str, list[np.ndarray]] = {t: [] for t in self.task_names}

    def iteration_completed(self, engine: Engine) -> None:
        """Record the probabilities, labels and patients of the batch just evaluated."""
        output = engine.state.output
        if not isinstance(output, Mapping) or not isinstance(output.get("pred"), Mapping):
            raise ValueError(
                "PatientClassificationHandler needs the evaluator's output as a dict whose 'pred' maps task names to "
                "logits: set decollate=False on the evaluator"
            )
        preds: Mapping[str, torch.Tensor] = output["pred"]
        targets = output.get("label") if isinstance(output.get("label"), Mapping) else {}
        ids = engine.state.batch[self.case_key]
        ids = [str(c) for c in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        for task in self.task_names:
            if task not in preds:
                raise ValueError(f"the network output has no task {task!r}; got {sorted(preds)}")
            logits = preds[task].detach().float().cpu()
            if logits.numel() != logits.shape[0]:
                raise ValueError(f"task {task!r}: expected one logit per sample (binary), got {tuple(logits.shape)}")
            if logits.shape[0] != len(ids):
                raise ValueError(f"task {task!r}: {logits.shape[0]} outputs but {len(ids)} {self.case_key!r} values")
            self._probs[task].append(torch.sigmoid(logits.reshape(-1)).numpy())
            if task in targets:
                label = torch.as_tensor(targets[task]).detach().float().cpu().reshape(-1).numpy()
                flag = targets.get(f"{task}_present")
                flag = np.ones_like(label) if flag is None else torch.as_tensor(flag).float().cpu().reshape(-1).numpy()
                self._labels[task].append(label)
                self._present[task].append(flag)
        self._case_ids.extend(ids)

    def run_completed(self, engine: Engine) -> None:
        """Aggregate per patient, compute the metrics, set them in ``engine.state.metrics`` and write the files."""
        probs = {t: np.concatenate(v) if v else np.zeros(0) for t, v in self._probs.items()}
        labelled_tasks = [t for t in self.task_names if self._labels[t]]
        partial = [t for t in labelled_tasks if sum(map(len, self._labels[t])) != len(self._case_ids)]
        if partial:
            raise ValueError(f"tasks {partial}: labels came with some batches only")
        labels = {t: np.concatenate(self._labels[t]) for t in labelled_tasks}
        present = {t: np.concatenate(self._present[t]) for t in labelled_tasks}
        self.table = patient_table(self._case_ids, probs, labels, present)
        summary: dict[str, Any] = {"num_patients": len(self.table), "num_samples": len(self._case_ids)}
        if labelled_tasks:
            summary["threshold"] = self.threshold
            summary["tasks"] = {t: task_metrics(self.table, t, self.threshold) for t in labelled_tasks}
            aucs = [m["auc"] for m in summary["tasks"].values() if math.isfinite(m["auc"])]
            summary["mean_auc"] = float(np.mean(aucs)) if aucs else math.nan
            for task, metrics in summary["tasks"].items():
                engine.state.metrics[f"{self.prefix}_auc_{task}"] = metrics["auc"]
                engine.state.metrics[f"{self.prefix}_accuracy_{task}"] = metrics["accuracy"]
            engine.state.metrics[f"{self.prefix}_mean_auc"] = summary["mean_auc"]
            self.logger.info(
                "%s: %s",
                self.prefix,
                {t: _rounded(m) for t, m in summary["tasks"].items()} | {"patients": len(self.table)},
            )
            if self.floor is not None:
                self._floor_summary(engine, summary)
        self.summary = summary
        if self.output_dir is not None:
            self._write(engine, summary, labelled_tasks)

    def _floor_summary(self, engine: Engine, summary: dict[str, Any]) -> None:
        """Score the training-prevalence floor on the labelled patients of each task; add ``floor`` and
        ``beats_floor`` to ``summary`` and the floor's metrics to ``engine.state.metrics``; warn for each AUC the model
        does not beat."""
        assert self.floor is not None
        block = {"source": "training split only", **self.floor.describe()}
        model, trivial = {}, {}
        for task in summary["tasks"]:
            given = [row.get(f"{task}_label") for row in self.table]
            labels = [0.0 if label is None else float(label) for label in given]
            present = [0.0 if label is None else 1.0 for label in given]
            values = self.floor.metrics(labels, present, task)
            block["tasks"][task].update(values, num_evaluated_labelled=int(sum(present)))
            engine.state.metrics[f"{self.prefix}_floor_auc_{task}"] = values["auc"]
            engine.state.metrics[f"{self.prefix}_floor_accuracy_{task}"] = values["accuracy"]
            model[f"auc_{task}"], trivial[f"auc_{task}"] = summary["tasks"][task]["auc"], values["auc"]
        block["tasks"] = {t: block["tasks"][t] for t in summary["tasks"]}
        block["mean_auc"] = CONSTANT_SCORE_AUC
        engine.state.metrics[f"{self.prefix}_floor_mean_auc"] = CONSTANT_SCORE_AUC
        summary["floor"] = block
        summary["beats_floor"] = compare_with_floor(model, trivial, self.logger, self.prefix)
        self.logger.info(
            "%s: trivial floor (training prevalence) %s, beats floor %s",
            self.prefix,
            {t: _rounded(m) for t, m in block["tasks"].items()},
            summary["beats_floor"],
        )

    def predictions(self) -> dict[str, dict[str, float]]:
        """The last run's per-patient probabilities under their output names.

        Returns:
            ``{case_id: {prediction_name: probability}}``.
        """
        return {
            row["case_id"]: {self.prediction_names[t]: row[f"{t}_prob"] for t in self.task_names} for row in self.table
        }

    def _write(self, engine: Engine, summary: Mapping[str, Any], labelled_tasks: Sequence[str]) -> None:
        assert self.output_dir is not None
        predictions = self.predictions()
        atomic_write_json(self.output_dir / "predictions.json", predictions)
        names = [self.prediction_names[t] for t in self.task_names]
        write_csv(
            self.output_dir / "predictions.csv",
            ["PatientID", *names],
            [[case, *values.values()] for case, values in predictions.items()],
        )
        if self.per_case_files:
            for case, values in predictions.items():
                atomic_write_json(self.output_dir / f"{case}.json", {"PatientID": case, **values})
        if not labelled_tasks:
            self.logger.info("wrote probabilities of %d patients to %s", len(predictions), self.output_dir)
            return
        write_report(self.output_dir / "report.json", engine, summary, "patients", self.table)
        columns = ["case_id", "num_samples", *[f"{t}_{k}" for t in self.task_names for k in ("prob", "label")]]
        rows = [[row.get(c) for c in columns] for row in self.table]
        write_csv(self.output_dir / "cases.csv", columns, rows)
        if self.figures:
            for task in labelled_tasks:
                with figures_never_fail(self.logger, f"the ROC figure of {task}"):
                    path = self.output_dir / "figures" / f"roc_{task}.png"
                    plot_roc_curve(self.table, task, path, summary["tasks"][task]["auc"])


def _rounded(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}
