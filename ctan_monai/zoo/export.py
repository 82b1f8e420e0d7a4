"""``python -m ctan_monai.zoo export``: a bundle folder the MONAI model zoo would accept and that runs without this
package: its code in ``scripts/`` (exactly the modules its configs need), configs rewritten to ``scripts.``,
``bundle_root`` relative, pinned requirements that install on Python 3.10 and 3.11, the trained weights, and a
README with the zoo template's sections."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctan_monai.utils.atomic import atomic_path, fsync_dir, fsync_file
from ctan_monai.zoo.closure import config_references, module_closure
from ctan_monai.zoo.readme import compose_zoo_readme
from ctan_monai.zoo.requirements import ZOO_PINS, bundle_requirements
from ctan_monai.zoo.rewrite import remaining_references, rename_package_in_config, rename_package_in_source

__all__ = [
    "ExportResult",
    "ZooExportError",
    "LARGE_FILE_BYTES",
    "export_bundle",
    "shape_check_network",
    "zoo_eval_metrics",
]

PACKAGE = "ctan_monai"
SCRIPTS = "scripts"
# the largest file the model zoo's repository takes (its pre-commit check-added-large-files --maxkb=1024); larger
# weights are listed in large_files.yml (URL + hash) and hosted elsewhere
LARGE_FILE_BYTES = 1024 * 1024
# configs of this project's own tools, not of the bundle: the comparison settings need `python -m ctan_monai.compare`
PROJECT_ONLY_CONFIGS = ("compare.yaml",)
# packages that config components import only when they run (so no import of our code shows them):
# component name in a config -> distribution
COMPONENT_REQUIREMENTS = {
    "TensorBoardStatsHandler": "tensorboard",  # MONAI's handler writes with torch.utils.tensorboard
    "ProgressBarHandler": "tqdm",  # Ignite's ProgressBar draws with tqdm
}
_README_NAME = "README.md"


class ZooExportError(RuntimeError):
    """The bundle cannot be exported as it is (the message says what to fix)."""


@dataclass
class ExportResult:
    """What :func:`export_bundle` wrote.

    Attributes:
        out_dir: the exported bundle folder.
        modules: the package's modules copied into ``scripts/``.
        lines: their lines of code.
        requirements: ``required_packages_version`` written to ``metadata.json``.
        large_files: files over the zoo's 25 MB limit listed in ``large_files.yml``.
        zip_path: the zip archive, when one was asked for.
    """

    out_dir: Path
    modules: list[str] = field(default_factory=list)
    lines: int = 0
    requirements: dict[str, str] = field(default_factory=dict)
    large_files: list[str] = field(default_factory=list)
    zip_path: Path | None = None


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def _write_json(path: Path, data: Any) -> None:
    """4-space JSON with a final newline (the zoo's pre-commit formatting)."""
    _write_text(path, json.dumps(data, indent=4, ensure_ascii=False))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_dict_of(checkpoint: Any, source: Path) -> dict[str, Any]:
    """The network weights in a checkpoint: a state dict itself, or one under ``model`` / ``network`` (this
    project's training checkpoints) / ``state_dict``."""
    if isinstance(checkpoint, dict):
        for key in ("model", "network", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key]
        if checkpoint and all(hasattr(v, "shape") for v in checkpoint.values()):
            return checkpoint
    raise ZooExportError(f"{source}: not a state dict, nor a checkpoint holding one under 'model'/'network'")


def zoo_eval_metrics(bundle_dir: Path, report_path: Path) -> dict[str, float]:
    """The ``eval_metrics`` of ``metadata.json`` from an evaluation report: each task's key metric and the extra
    metrics of the bundle's ``configs/compare.yaml``; percentages as fractions (Dice 61.0 % -> 0.61), other values
    in their unit (Gy).

    Args:
        bundle_dir: the source bundle (for its ``compare.yaml``).
        report_path: the evaluation report (``report.json``) of the model being exported.

    Returns:
        metric name (the last part of its report path, with the one before where two share it) -> value,
        rounded to 4 decimals.

    Raises:
        ZooExportError: when the report lacks a metric or holds an undefined one.

    Example:
        >>> zoo_eval_metrics(Path("bundles/ctan_ham10000"), Path("runs/ctan/evaluation/report.json"))  # doctest: +SKIP
        {'mean_dice': 0.9042, 'balanced_accuracy': 0.6087}
    """
    from ctan_monai.compare.spec import load_comparison_spec, read_metric

    spec = load_comparison_spec(bundle_dir)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    metrics: dict[str, float] = {}
    chosen = [*spec.metrics, *spec.extra_metrics]
    last_parts = [m.path.split(".")[-1] for m in chosen]
    for metric in chosen:
        parts = metric.path.split(".")
        # the last part of its report path names a metric, with the part before when two share it (auc_covid)
        name = parts[-1] if last_parts.count(parts[-1]) == 1 else f"{parts[-1]}_{parts[-2]}"
        try:
            value = read_metric(report, metric, str(report_path))
        except KeyError as e:
            raise ZooExportError(str(e)) from e
        if not math.isfinite(value):
            raise ZooExportError(f"{report_path}: {metric.path} is undefined; eval_metrics must be measured values")
        # percentages (the metric's label says %) as fractions, as the zoo's metadata holds them (mean_dice 0.61)
        metrics[name] = round(value / 100 if "%" in metric.label else value, 4)
    return metrics


def _check_eval_metrics(metrics: dict[str, Any], source: Path) -> None:
    values = list(metrics.values())
    if not values or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values) or not any(values):
        raise ZooExportError(
            f"{source}: eval_metrics {metrics} are placeholders or undefined; pass --report with the evaluation "
            "report of the exported model"
        )


def shape_check_network(bundle_dir: Path) -> str:
    """The training config's single-output view of the network (a top-level ``*_network_def``), which MONAI's
    ``verify_net_in_out`` can check; ``network_def`` itself returns a dictionary of task outputs.

    Args:
        bundle_dir: the bundle folder.

    Returns:
        the config id, e.g. ``"seg_network_def"``.

    Raises:
        ZooExportError: when the training config has none.
    """
    text = (bundle_dir / "configs" / "train.yaml").read_text(encoding="utf-8")
    found = re.findall(r"(?m)^(\w+_network_def):", text)
    if not found:
        raise ZooExportError(f"{bundle_dir}/configs/train.yaml: no *_network_def (one output) for the shape check")
    return found[0]


def _display_name(metadata: dict[str, Any], folder: str) -> str:
    name = str(metadata.get("name", folder))
    return name if " " in name else f"CTAN {metadata.get('task', folder)}"


def _export_configs(source: Path, target: Path) -> list[str]:
    """Copy the configs with the package renamed and ``bundle_root`` made relative; returns their texts."""
    texts = []
    for path in sorted(source.iterdir()):
        if path.name in PROJECT_ONLY_CONFIGS or path.name == "metadata.json" or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml", ".json"):
            text = rename_package_in_config(text, PACKAGE, SCRIPTS)
            # the zoo's convention: run from the bundle folder, or pass --bundle_root from elsewhere
            text = re.sub(r"(?m)^bundle_root:.*$", 'bundle_root: "."', text)
            leftover = [n for n, line in enumerate(text.splitlines(), 1) if re.search(rf"\b{PACKAGE}\.", line)]
            if leftover:
                raise ZooExportError(f"{path}: lines {leftover} still refer to {PACKAGE}")
            if path.suffix in (".yaml", ".yml"):
                yaml.safe_load(text)  # still valid YAML
        _write_text(target / path.name, text)
        texts.append(text)
    return texts


def _zoo_style(code: str, path: Path) -> str:
    """The zoo repository's code style for a renamed module: imports sorted as its isort settings sort them (``scripts``
    is not first-party there, so the renamed imports join the third-party block), then black at 120 columns."""
    try:
        import black
        import isort
    except ImportError as e:
        hint = "pip install 'ctan_monai[zoo]'"
        raise ZooExportError(f"the export formats scripts/ with isort and black: {hint} ({e})") from e
    code = isort.code(code, profile="black", line_length=120, known_first_party=["models"])
    try:
        return black.format_str(code, mode=black.Mode(line_length=120))
    except black.parsing.InvalidInput as e:  # pragma: no cover - the source was valid before renaming
        raise ZooExportError(f"{path}: not valid Python after renaming ({e})") from e


def _export_scripts(config_texts: list[str], target: Path) -> tuple[list[str], int, set[str]]:
    """Copy the package modules the configs need into ``scripts/``, renamed; returns the modules, their line
    count and their third-party imports."""
    import ctan_monai

    package_dir = Path(ctan_monai.__file__).resolve().parent
    references = {r.replace(SCRIPTS, PACKAGE, 1) for r in config_references(config_texts, SCRIPTS)}
    closure = module_closure(references, package_dir, PACKAGE)
    lines = 0
    for module in closure.modules:
        source_file = closure.files[module]
        relative = source_file.relative_to(package_dir)
        renamed = rename_package_in_source(source_file.read_text(encoding="utf-8"), PACKAGE, SCRIPTS)
        text = _zoo_style(renamed, source_file)
        leftover = remaining_references(text, PACKAGE)
        if leftover:
            raise ZooExportError(f"{source_file}: lines {leftover} still import {PACKAGE} after renaming")
        _write_text(target / relative, text)
        lines += len(text.splitlines())
    return closure.modules, lines, closure.third_party


def _export_weights(bundle_dir: Path, model: Path | None, target: Path) -> Path:
    import torch

    source = Path(model) if model is not None else bundle_dir / "models" / "model.pt"
    if not source.is_file():
        raise ZooExportError(f"{source}: no trained weights (zoo bundles ship models/model.pt); pass --model")
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    weights = target / "model.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_state_dict_of(checkpoint, source), weights)
    return weights


def export_bundle(
    bundle_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    weights_url: str | None = None,
    write_zip: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Export a bundle of this project as a self-contained model-zoo bundle.

    Everything is written to a temporary folder beside ``out_dir`` and moved into place at the end, so an
    interrupted export leaves no half-written bundle.

    Args:
        bundle_dir: the source bundle (e.g. ``bundles/ctan_openkbp``).
        out_dir: the folder to create (its name is the bundle's folder name in the zoo).
        model: trained weights (a state dict or a training checkpoint); default the bundle's ``models/model.pt``.
        report: the evaluation report of that model, for ``eval_metrics``; without it the source metadata's are
            kept, and refused when they are placeholders.
        weights_url: where ``models/model.pt`` will be hosted, for ``large_files.yml`` (weights over 1 MB; a
            placeholder otherwise).
        write_zip: also write ``<out_dir>.zip`` (the archive ``monai.bundle download`` unpacks).
        overwrite: replace an existing ``out_dir``.

    Returns:
        what was written.

    Raises:
        ZooExportError: when the source lacks something the zoo needs or the code still imports the package.
        FileExistsError: when ``out_dir`` exists and ``overwrite`` is false.

    Example:
        >>> export_bundle("bundles/ctan_ham10000", "dist/ctan_ham10000", model="runs/ctan/model.pt")  # doctest: +SKIP
    """
    bundle_dir, out_dir = Path(bundle_dir).resolve(), Path(out_dir).resolve()
    meta_path = bundle_dir / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise ZooExportError(f"{bundle_dir}: no configs/metadata.json (not a bundle folder)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        result = ExportResult(out_dir=out_dir)
        texts = _export_configs(bundle_dir / "configs", work / "configs")
        result.modules, result.lines, third_party = _export_scripts(texts, work / SCRIPTS)
        weights = _export_weights(bundle_dir, Path(model) if model else None, work / "models")

        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        extra = [k for k in metadata.get("required_packages_version", {}) if k != PACKAGE]
        extra += [dist for component, dist in COMPONENT_REQUIREMENTS.items() if any(component in t for t in texts)]
        result.requirements = bundle_requirements(third_party, extra)
        metadata.update(
            name=_display_name(metadata, bundle_dir.name),
            monai_version=ZOO_PINS["monai"],
            pytorch_version=ZOO_PINS["torch"],
            numpy_version=ZOO_PINS["numpy"],
            required_packages_version=result.requirements,
        )
        if report is not None:
            metadata["eval_metrics"] = zoo_eval_metrics(bundle_dir, Path(report))
        _check_eval_metrics(metadata.get("eval_metrics", {}), Path(report) if report else meta_path)
        _write_json(work / "configs" / "metadata.json", metadata)

        if weights.stat().st_size > LARGE_FILE_BYTES:
            entry = {
                "path": "models/model.pt",
                "url": weights_url or "<fill in: the address where models/model.pt is hosted>",
                "hash_val": _sha256(weights),
                "hash_type": "sha256",
            }
            _write_text(work / "large_files.yml", yaml.safe_dump({"large_files": [entry]}, sort_keys=False))
            result.large_files.append(entry["path"])

        for name in ("LICENSE",):
            if not (bundle_dir / name).is_file():
                raise ZooExportError(f"{bundle_dir}: no {name} file (the zoo requires one)")
            shutil.copy2(bundle_dir / name, work / name)
        docs = bundle_dir / "docs"
        if docs.is_dir():
            shutil.copytree(docs, work / "docs")
        source_readme = (docs / _README_NAME).read_text(encoding="utf-8") if (docs / _README_NAME).is_file() else ""
        readme = compose_zoo_readme(
            source_readme,
            metadata,
            bundle_name=out_dir.name,
            large_files=bool(result.large_files),
            shape_net_id=shape_check_network(bundle_dir),
        )
        _write_text(work / "docs" / _README_NAME, readme)

        work.chmod(0o755)  # mkdtemp makes it private; a bundle folder is for sharing
        _fsync_tree(work)  # the files reach the disk before the rename makes them the bundle
        _replace_folder(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if write_zip:
        result.zip_path = _write_zip(out_dir)
    return result


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder (deepest first): a rename of ``folder`` is then durable."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            folders.append(path)
        else:
            fsync_file(path)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path)


def _replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is moved aside first and removed only once ``new`` is in
    place, so that a kill at any instant leaves the old or the new bundle (in the worst case under the aside name)."""
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside / target.name)
    os.replace(new, target)
    fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _write_zip(out_dir: Path) -> Path:
    """``<out_dir>.zip`` holding ``<name>/...``, written beside, fsync'ed and renamed into place (``atomic_path``)."""
    target = out_dir.with_suffix(".zip")
    with atomic_path(target) as partial:  # ends in .zip, which make_archive adds to its base name
        shutil.make_archive(str(partial)[: -len(".zip")], "zip", root_dir=out_dir.parent, base_dir=out_dir.name)
    return target
