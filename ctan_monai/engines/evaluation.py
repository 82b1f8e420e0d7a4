"""Whole-volume evaluation of the pixel-level tasks (segmentation + dose): per-case and overall metrics in
``engine.state.metrics``, a JSON + CSV report and figures, written atomically."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

from ctan_monai.engines.base import RunCollectorHandler, figures_never_fail, write_csv, write_report
from ctan_monai.engines.floors import VolumeFloor
from ctan_monai.metrics.dose import aggregate_dose_results, evaluate_dose, masked_mae, openkbp_dose_score
from ctan_monai.metrics.segmentation import aggregate_dice, dice_report

__all__ = ["FLOOR_KEY_METRICS", "CaseReference", "DVHStructuresFn", "VolumeEvaluationHandler"]

# (case entry / batch metadata) -> (structure masks on the evaluation grid, voxel spacing in mm), or None
DVHStructuresFn = Callable[[Mapping[str, Any]], "tuple[dict[str, np.ndarray], Sequence[float]] | None"]


def _first(value: Any) -> Any:
    """The first element of a collated batch entry (batch size 1)."""
    if isinstance(value, (list, tuple)):
        return value[0]
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[0]
    return value


# the metrics compared with the floor, and whether lower is better
FLOOR_KEY_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("dose_mae", "dose score (MAE in the possible-dose mask, Gy)", True),
    ("dvh_score", "DVH score (Gy)", True),
    ("mean_dice", "mean Dice (%)", False),
)


@dataclass
class CaseReference:
    """What a case's predictions are scored against, as numpy arrays on the evaluation grid (see
    :meth:`VolumeEvaluationHandler.score`).

    Args:
        labels: the reference label map, or None (segmentation not scored).
        class_present: 0/1 per class (background first): which structures the case annotates.
        dose: the reference dose (Gy), or None (dose not scored).
        mask: the possible-dose mask (bool), with ``dose``.
        structures: ``(masks by name, spacing in mm)`` for the DVH metrics, or None.

    Example:
        >>> ref = CaseReference(dose=np.zeros((2, 2, 2)), mask=np.ones((2, 2, 2), dtype=bool))
    """

    labels: np.ndarray | None = None
    class_present: np.ndarray | None = None
    dose: np.ndarray | None = None
    mask: np.ndarray | None = None
    structures: tuple[dict[str, np.ndarray], Sequence[float]] | None = None


def _batch_spacing(batch: Mapping[str, Any]) -> list[float] | None:
    """The case's voxel size (mm) from a collated batch of size 1: a ``[1, 3]`` tensor (one tensor per case) or a
    list of three ``[1]`` tensors (a list per case); None when the batch has none."""
    spacing = batch.get("spacing")
    if spacing is None:
        return None
    if isinstance(spacing, torch.Tensor):
        return [float(v) for v in (spacing[0] if spacing.dim() == 2 else spacing).reshape(-1)]
    return [float(_first(v)) if isinstance(v, torch.Tensor) and v.dim() > 0 else float(v) for v in spacing]


class VolumeEvaluationHandler(RunCollectorHandler):
    """Metrics of whole cases for a ``SupervisedEvaluator`` with batch size 1 (one patient per iteration).

    Per case: Dice (%) per structure (background excluded; a structure that the case lacks is left out), and on the
    dose as it would be submitted (the prediction clamped at 0 and zeroed outside the possible-dose mask, as
    OpenKBP's evaluator and our dose CSV take it): the dose score (MAE in the possible-dose mask, Gy), the
    whole-volume MAE (over every voxel of the grid, Gy) and, when ``dvh_structures`` gives the case's structures, the
    DVH metrics and DVH score. At the end of the run ``engine.state.metrics`` gets ``{prefix}_mean_dice``,
    ``{prefix}_dice_<structure>``, ``{prefix}_dose_mae``, ``{prefix}_whole_volume_mae`` and ``{prefix}_dvh_score``,
    and, when ``output_dir`` is set, ``report.json`` (overall + per case), ``cases.csv`` and figures are written there.

    With a ``floor`` (:class:`~ctan_monai.engines.floors.VolumeFloor`, built from the training split), every case's
    floor (mean training dose times the case's possible-dose mask, atlas label map) is scored with the same code on
    the same tasks as the model: per case under ``"floor"``, in the summary as a ``floor`` block (with the floor's
    definition and training patients) and ``beats_floor`` (per key metric: dose score, DVH score, mean Dice; None
    where either side is NaN), in ``engine.state.metrics`` as ``{prefix}_floor_<metric>``, and one WARNING per
    key metric on which the model does not do strictly better than the floor. A case's floor metrics are computed
    once and reused by later runs (periodic validation).

    Args:
        structure_names: names of the segmentation classes 1..C-1.
        seg_task: the segmentation task's name, or None when there is none.
        dose_task: the dose task's name, or None when there is none.
        output_dir: folder for the report and figures; None to only set metrics.
        dvh_structures: function giving a case's structures for the DVH score (e.g.
            ``ctan_monai.apps.openkbp.evaluation.openkbp_dvh_structures``).
        figures: how many cases get figures (CT with dose and contours, DVH curves).
        prefix: metric name prefix.
        floor: the training-split floor to score beside the model, or None.

    Example:
        >>> handler = VolumeEvaluationHandler(["Brainstem", "SpinalCord"], output_dir=None)
    """

    def __init__(
        self,
        structure_names: Sequence[str],
        seg_task: str | None = "seg",
        dose_task: str | None = "dose",
        output_dir: str | os.PathLike[str] | None = None,
        dvh_structures: DVHStructuresFn | None = None,
        figures: int = 2,
        prefix: str = "val",
        floor: VolumeFloor | None = None,
    ) -> None:
        self.structure_names = list(structure_names)
        self.seg_task = seg_task
        self.dose_task = dose_task
        self.output_dir = Path(output_dir) if output_dir else None
        self.dvh_structures = dvh_structures
        self.figures = figures
        self.prefix = prefix
        self.floor = floor
        self.cases: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self._floor_rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.logger = logging.getLogger("ctan_monai.evaluation")

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the cases of a previous run (a case's floor metrics are kept: they do not change)."""
        self.cases = []

    def score(
        self, pred_labels: np.ndarray | None, pred_dose: np.ndarray | None, reference: CaseReference
    ) -> dict[str, Any]:
        """The metrics of one case's predictions (the model's or the floor's: the same code scores both).

        Args:
            pred_labels: predicted label map on the evaluation grid, or None (not scored).
            pred_dose: predicted dose (Gy), or None; it is zeroed outside the possible-dose mask before any metric.
            reference: the case's reference labels, class flags, dose, possible-dose mask and DVH structures.

        Returns:
            ``dice``, ``mean_dice`` (with labels); ``dose_mae``, ``whole_volume_mae`` and, with structures, ``dose``
            (the :func:`evaluate_dose` result) and ``dvh_score`` (with a dose).

        Raises:
            ValueError: on mismatched shapes or non-finite values (see the metric functions).

        Example:
            >>> mask = np.zeros((2, 2, 2), dtype=bool); mask[0] = True
            >>> ref = CaseReference(dose=np.where(mask, 60.0, 0.0), mask=mask)
            >>> row = VolumeEvaluationHandler([]).score(None, np.full((2, 2, 2), 62.0), ref)
            >>> row["dose_mae"], row["whole_volume_mae"]  # the 62 Gy outside the mask count as 0
            (2.0, 1.0)
        """
        row: dict[str, Any] = {}
        if pred_labels is not None and reference.labels is not None:
            present = reference.class_present
            report = dice_report(pred_labels, reference.labels, self.structure_names, class_present=present)
            row["dice"] = report["dice"]
            row["mean_dice"] = report["mean_dice"]
        if pred_dose is not None and reference.dose is not None:
            scored = np.where(reference.mask, np.maximum(pred_dose, 0.0), 0.0).astype(np.float32)
            row["dose_mae"] = openkbp_dose_score(scored, reference.dose, reference.mask)
            row["whole_volume_mae"] = masked_mae(scored, reference.dose)
            if reference.structures is not None:
                masks, spacing = reference.structures
                dose_result = evaluate_dose(scored, reference.dose, reference.mask, masks, spacing)
                row["dose"] = dose_result
                row["dvh_score"] = dose_result["dvh_score"]
        return row

    def iteration_completed(self, engine: Engine) -> None:
        """Compute the metrics of the case just evaluated (and of its floor)."""
        output = engine.state.output
        batch = engine.state.batch
        pred: Mapping[str, torch.Tensor] = output["pred"]
        targets: Mapping[str, torch.Tensor] = output["label"]
        case_id = str(_first(batch.get("case_id", f"case_{len(self.cases)}")))
        arrays: dict[str, Any] = {"image": output["image"][0, 0].float().cpu().numpy()}
        reference = CaseReference()
        pred_labels = pred_dose = None
        if self.seg_task is not None and self.seg_task in pred:
            pred_labels = pred[self.seg_task][0].argmax(dim=0).cpu().numpy()
            reference.labels = targets[self.seg_task][0, 0].cpu().numpy()
            present = targets.get(f"{self.seg_task}_class_present")
            reference.class_present = None if present is None else present[0].cpu().numpy()
            arrays.update(pred_labels=pred_labels, ref_labels=reference.labels)
        if self.dose_task is not None and self.dose_task in pred and bool(targets[f"{self.dose_task}_present"][0]):
            pred_dose = pred[self.dose_task][0, 0].float().cpu().numpy()
            reference.dose = targets[self.dose_task][0, 0].float().cpu().numpy()
            reference.mask = targets[f"{self.dose_task}_mask"][0, 0].cpu().numpy() > 0
            meta = {k: _first(v) for k, v in batch.items() if k in ("source", "spacing", "case_id")}
            reference.structures = self.dvh_structures(meta) if self.dvh_structures is not None else None
            # the figures show the dose as scored: clamped at 0, zero outside the possible-dose mask
            arrays.update(pred_dose=np.where(reference.mask, np.maximum(pred_dose, 0.0), 0.0), ref_dose=reference.dose)
            if reference.structures is not None:
                arrays["structures"] = reference.structures[0]
        row: dict[str, Any] = {"case_id": case_id, **self.score(pred_labels, pred_dose, reference)}
        if self.floor is not None:
            row["floor"] = self._floor_metrics(case_id, arrays["image"], batch, reference, pred_labels, pred_dose)
        self.cases.append(row)
        if self.output_dir is not None and len(self.cases) <= self.figures:
            self._write_figures(case_id, arrays)

    def _floor_metrics(
        self,
        case_id: str,
        image: np.ndarray,
        batch: Mapping[str, Any],
        reference: CaseReference,
        pred_labels: np.ndarray | None,
        pred_dose: np.ndarray | None,
    ) -> dict[str, Any]:
        """The floor's metrics on a case, on the tasks the model is scored on (computed once per case)."""
        fingerprint = tuple(
            None if a is None else (a.shape, float(np.sum(a, dtype=np.float64)))
            for a in (reference.labels, reference.dose, reference.mask)
        )
        key = (case_id, fingerprint, pred_labels is not None, pred_dose is not None)
        if key not in self._floor_rows:
            floor_dose, floor_labels = self.floor.predict(
                image.shape, _batch_spacing(batch), dose_mask=reference.mask, image=image
            )
            self._floor_rows[key] = self.score(
                None if pred_labels is None else floor_labels, None if pred_dose is None else floor_dose, reference
            )
        return self._floor_rows[key]

    def _aggregate(self, cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Dataset metrics of per-case :meth:`score` results: Dice per structure and mean, dose score, whole-volume
        MAE, DVH score (pooled as the challenge does)."""
        summary: dict[str, Any] = {"num_cases": len(cases)}
        scored = [c for c in cases if "dice" in c]
        if scored:
            dice = aggregate_dice([{"dice": c["dice"], "mean_dice": c["mean_dice"]} for c in scored])
            summary["mean_dice"] = dice["mean_dice"]
            summary["dice"] = dice["dice"]
        for name in ("dose_mae", "whole_volume_mae"):
            values = [c[name] for c in cases if name in c]
            if values:
                summary[name] = float(np.mean(values))
        dose_cases = [c["dose"] for c in cases if "dose" in c]
        if dose_cases:
            aggregated = aggregate_dose_results(dose_cases)
            summary["dose_score"] = aggregated["dose_score"]
            summary["dvh_score"] = aggregated["dvh_score"]
        return summary

    def _set_metrics(self, engine: Engine, summary: Mapping[str, Any], infix: str = "") -> None:
        """``engine.state.metrics[{prefix}_{infix}<metric>]`` for every summary metric."""
        metrics = engine.state.metrics
        for name in ("mean_dice", "dose_mae", "whole_volume_mae", "dvh_score"):
            if name in summary:
                metrics[f"{self.prefix}_{infix}{name}"] = summary[name]
        for name, value in summary.get("dice", {}).items():
            metrics[f"{self.prefix}_{infix}dice_{name}"] = value

    def run_completed(self, engine: Engine) -> None:
        """Aggregate over cases into ``engine.state.metrics``, compare with the floor and write the report."""
        summary = self._aggregate(self.cases)
        self._set_metrics(engine, summary)
        if self.floor is not None and any("floor" in c for c in self.cases):
            floor_summary = {**self.floor.describe(), **self._aggregate([c["floor"] for c in self.cases])}
            summary["floor"] = floor_summary
            self._set_metrics(engine, floor_summary, "floor_")
            summary["beats_floor"] = self._compare_with_floor(summary, floor_summary)
            leaked = sorted({c["case_id"] for c in self.cases} & set(self.floor.training_case_ids))
            if leaked:
                self.logger.warning(
                    "%s: %d evaluated case(s) are among the floor's training patients (%s): the floor is not a "
                    "held-out baseline on them",
                    self.prefix,
                    len(leaked),
                    ", ".join(leaked[:5]) + (" ..." if len(leaked) > 5 else ""),
                )
        self.summary = summary
        self.logger.info("%s: %s", self.prefix, {k: v for k, v in summary.items() if not isinstance(v, dict)})
        if "floor" in summary:
            floor_values = {k: v for k, v in summary["floor"].items() if isinstance(v, float)}
            self.logger.info("%s floor: %s", self.prefix, floor_values)
        if self.output_dir is not None:
            self._write_report(engine, summary)

    def _compare_with_floor(self, model: Mapping[str, Any], floor: Mapping[str, Any]) -> dict[str, bool | None]:
        """Per key metric, whether the model does strictly better than the floor (None, with a WARNING, where either is
        undefined); a loud WARNING for each metric the model does not win."""
        beats: dict[str, bool | None] = {}
        for name, label, lower_is_better in FLOOR_KEY_METRICS:
            if name not in model or name not in floor:
                continue
            ours, theirs = float(model[name]), float(floor[name])
            if math.isnan(ours) or math.isnan(theirs):
                beats[name] = None
                self.logger.warning(
                    "%s: CANNOT COMPARE %s [%s] WITH THE TRAINING-SPLIT FLOOR: model %.4f, floor %.4f (undefined)",
                    self.prefix,
                    label,
                    name,
                    ours,
                    theirs,
                )
                continue
            beats[name] = bool(ours < theirs if lower_is_better else ours > theirs)
            if not beats[name]:
                self.logger.warning(
                    "%s: MODEL DOES NOT BEAT THE TRAINING-SPLIT FLOOR on %s [%s]: model %.4f vs floor %.4f "
                    "(%s is better)",
                    self.prefix,
                    label,
                    name,
                    ours,
                    theirs,
                    "lower" if lower_is_better else "higher",
                )
        return beats

    def _write_report(self, engine: Engine, summary: Mapping[str, Any]) -> None:
        write_report(self.output_dir / "report.json", engine, summary, "cases", self.cases)
        scores = ["dose_mae", "whole_volume_mae", "dvh_score"]
        columns = ["case_id", "mean_dice", *[f"dice_{n}" for n in self.structure_names], *scores]
        with_floor = self.floor is not None
        if with_floor:
            columns += [f"floor_{n}" for n in ("mean_dice", *scores)]
        rows = []
        for case in self.cases:
            dice = case.get("dice", {})
            row = [case["case_id"], case.get("mean_dice"), *[dice.get(n) for n in self.structure_names]]
            row += [case.get(n) for n in scores]
            if with_floor:
                floor = case.get("floor", {})
                row += [floor.get(n) for n in ("mean_dice", *scores)]
            rows.append(row)
        write_csv(self.output_dir / "cases.csv", columns, rows)

    def _write_figures(self, case_id: str, arrays: Mapping[str, Any]) -> None:
        from ctan_monai.engines.figures import plot_case_slices, plot_dvh_curves  # matplotlib only when needed

        figures = self.output_dir / "figures"
        with figures_never_fail(self.logger, f"figures for {case_id}"):
            plot_case_slices(arrays, self.structure_names, figures / f"{case_id}_slices.png", title=case_id)
            if "structures" in arrays and "pred_dose" in arrays:
                plot_dvh_curves(
                    arrays["pred_dose"], arrays["ref_dose"], arrays["structures"], figures / f"{case_id}_dvh.png"
                )
