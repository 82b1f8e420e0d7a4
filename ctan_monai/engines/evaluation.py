"""Whole-volume evaluation of the pixel-level tasks (segmentation + dose): per-case and overall metrics in
``engine.state.metrics``, a JSON + CSV report and figures, written atomically."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

from ctan_monai.engines.base import RunCollectorHandler, figures_never_fail, write_csv, write_report
from ctan_monai.metrics.dose import aggregate_dose_results, evaluate_dose, openkbp_dose_score
from ctan_monai.metrics.segmentation import aggregate_dice, dice_report

__all__ = ["DVHStructuresFn", "VolumeEvaluationHandler", "openkbp_dvh_structures"]

# (case entry / batch metadata) -> (structure masks on the evaluation grid, voxel spacing in mm), or None
DVHStructuresFn = Callable[[Mapping[str, Any]], "tuple[dict[str, np.ndarray], Sequence[float]] | None"]


def openkbp_dvh_structures(case: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Sequence[float]] | None:
    """All OpenKBP structures (OARs and PTVs) of a case, read from its source patient folder, for the DVH score.

    Args:
        case: a batch/manifest entry with ``source`` (the patient folder) and ``spacing``.

    Returns:
        ``(masks, spacing)``, or None when the entry has no source folder.
    """
    from ctan_monai.data.openkbp import read_patient  # local: evaluation of other datasets does not need it

    source = case.get("source")
    if not source or not os.path.isdir(str(source)):
        return None
    patient = read_patient(str(source))
    return dict(patient.structures), patient.voxel_size_mm


def _first(value: Any) -> Any:
    """The first element of a collated batch entry (batch size 1)."""
    if isinstance(value, (list, tuple)):
        return value[0]
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[0]
    return value


class VolumeEvaluationHandler(RunCollectorHandler):
    """Metrics of whole cases for a ``SupervisedEvaluator`` with batch size 1 (one patient per iteration).

    Per case: Dice (%) per structure (background excluded; a structure that the case lacks is left out),
    the dose MAE in the dose mask (the OpenKBP dose score, Gy) and, when ``dvh_structures`` gives the case's
    structures, the DVH metrics and DVH score. At the end of the run ``engine.state.metrics`` gets
    ``{prefix}_mean_dice``, ``{prefix}_dice_<structure>``, ``{prefix}_dose_mae`` and ``{prefix}_dvh_score``, and, when
    ``output_dir`` is set, ``report.json`` (overall + per case), ``cases.csv`` and figures are written there.

    Args:
        structure_names: names of the segmentation classes 1..C-1.
        seg_task: the segmentation task's name, or None when there is none.
        dose_task: the dose task's name, or None when there is none.
        output_dir: folder for the report and figures; None to only set metrics.
        dvh_structures: function giving a case's structures for the DVH score (e.g. ``openkbp_dvh_structures``).
        figures: how many cases get figures (CT with dose and contours, DVH curves).
        prefix: metric name prefix.

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
    ) -> None:
        self.structure_names = list(structure_names)
        self.seg_task = seg_task
        self.dose_task = dose_task
        self.output_dir = Path(output_dir) if output_dir else None
        self.dvh_structures = dvh_structures
        self.figures = figures
        self.prefix = prefix
        self.cases: list[dict[str, Any]] = []
        self.logger = logging.getLogger("ctan_monai.evaluation")

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the cases of a previous run."""
        self.cases = []

    def iteration_completed(self, engine: Engine) -> None:
        """Compute the metrics of the case just evaluated."""
        output = engine.state.output
        batch = engine.state.batch
        pred: Mapping[str, torch.Tensor] = output["pred"]
        targets: Mapping[str, torch.Tensor] = output["label"]
        case_id = str(_first(batch.get("case_id", f"case_{len(self.cases)}")))
        row: dict[str, Any] = {"case_id": case_id}
        arrays: dict[str, np.ndarray] = {"image": output["image"][0, 0].float().cpu().numpy()}
        if self.seg_task is not None and self.seg_task in pred:
            pred_labels = pred[self.seg_task][0].argmax(dim=0).cpu().numpy()
            ref_labels = targets[self.seg_task][0, 0].cpu().numpy()
            present = targets.get(f"{self.seg_task}_class_present")
            report = dice_report(
                pred_labels,
                ref_labels,
                self.structure_names,
                class_present=None if present is None else present[0].cpu().numpy(),
            )
            row["dice"] = report["dice"]
            row["mean_dice"] = report["mean_dice"]
            arrays.update(pred_labels=pred_labels, ref_labels=ref_labels)
        if self.dose_task is not None and self.dose_task in pred and bool(targets[f"{self.dose_task}_present"][0]):
            pred_dose = pred[self.dose_task][0, 0].float().clamp_min(0).cpu().numpy()
            ref_dose = targets[self.dose_task][0, 0].float().cpu().numpy()
            mask = targets[f"{self.dose_task}_mask"][0, 0].cpu().numpy() > 0
            row["dose_mae"] = openkbp_dose_score(pred_dose, ref_dose, mask)
            arrays.update(pred_dose=pred_dose, ref_dose=ref_dose)
            meta = {k: _first(v) for k, v in batch.items() if k in ("source", "spacing", "case_id")}
            structures = self.dvh_structures(meta) if self.dvh_structures is not None else None
            if structures is not None:
                masks, spacing = structures
                dose_result = evaluate_dose(pred_dose, ref_dose, mask, masks, spacing)
                row["dose"] = dose_result
                row["dvh_score"] = dose_result["dvh_score"]
                arrays["structures"] = masks  # type: ignore[assignment]
        self.cases.append(row)
        if self.output_dir is not None and len(self.cases) <= self.figures:
            self._write_figures(case_id, arrays)

    def run_completed(self, engine: Engine) -> None:
        """Aggregate over cases into ``engine.state.metrics`` and write the report."""
        summary: dict[str, Any] = {"num_cases": len(self.cases)}
        if any("dice" in c for c in self.cases):
            dice = aggregate_dice([{"dice": c["dice"], "mean_dice": c["mean_dice"]} for c in self.cases if "dice" in c])
            summary["mean_dice"] = dice["mean_dice"]
            summary["dice"] = dice["dice"]
            engine.state.metrics[f"{self.prefix}_mean_dice"] = dice["mean_dice"]
            for name, value in dice["dice"].items():
                engine.state.metrics[f"{self.prefix}_dice_{name}"] = value
        maes = [c["dose_mae"] for c in self.cases if "dose_mae" in c]
        if maes:
            summary["dose_mae"] = float(np.mean(maes))
            engine.state.metrics[f"{self.prefix}_dose_mae"] = summary["dose_mae"]
        dose_cases = [c["dose"] for c in self.cases if "dose" in c]
        if dose_cases:
            aggregated = aggregate_dose_results(dose_cases)
            summary["dose_score"] = aggregated["dose_score"]
            summary["dvh_score"] = aggregated["dvh_score"]
            engine.state.metrics[f"{self.prefix}_dvh_score"] = aggregated["dvh_score"]
        self.summary = summary
        self.logger.info("%s: %s", self.prefix, {k: v for k, v in summary.items() if not isinstance(v, dict)})
        if self.output_dir is not None:
            self._write_report(engine, summary)

    def _write_report(self, engine: Engine, summary: Mapping[str, Any]) -> None:
        write_report(self.output_dir / "report.json", engine, summary, "cases", self.cases)
        columns = ["case_id", "mean_dice", *[f"dice_{n}" for n in self.structure_names], "dose_mae", "dvh_score"]
        rows = []
        for case in self.cases:
            dice = case.get("dice", {})
            rows.append(
                [case["case_id"], case.get("mean_dice"), *[dice.get(n) for n in self.structure_names]]
                + [case.get("dose_mae"), case.get("dvh_score")]
            )
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
