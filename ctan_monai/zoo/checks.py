"""Offline checks of a bundle folder against what the MONAI model zoo's CI and pre-commit hooks require of the files
themselves (``ci/verify_bundle.py`` directory and version checks; ``end-of-file-fixer``, ``trailing-whitespace``,
``check-yaml``, ``check-added-large-files --maxkb=1024``; 4-space JSON), and that nothing still needs this package.
Metadata, properties, shapes and TorchScript are MONAI's own checks (``verify_metadata``, ``check_properties``,
``verify_net_in_out``, ``ckpt_export``), run by the tests on the exported folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ctan_monai.zoo.rewrite import remaining_references

__all__ = ["COMMITTED_FILE_LIMIT", "zoo_file_problems"]

# pre-commit's check-added-large-files in the zoo repository; bigger files go in large_files.yml (URL + hash)
COMMITTED_FILE_LIMIT = 1024 * 1024
_TEXT_SUFFIXES = {".py", ".json", ".yaml", ".yml", ".md", ".txt", ".conf", ".cfg", ""}


def _large_file_paths(bundle: Path) -> set[str]:
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        path = bundle / name
        if path.is_file():
            content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            return {str(entry.get("path", "")).lstrip("./") for entry in content.get("large_files", [])}
    return set()


def zoo_file_problems(bundle: str | Path, forbidden_package: str = "ctan_monai") -> list[str]:
    """Every problem the zoo's file checks would report for a bundle folder (empty: it passes).

    Args:
        bundle: the bundle folder.
        forbidden_package: a package the bundle must not import (its code belongs in ``scripts/``).

    Returns:
        one line per problem, naming the file.

    Example:
        >>> zoo_file_problems("dist/ctan_ham10000")  # doctest: +SKIP
        []
    """
    bundle = Path(bundle)
    problems: list[str] = []
    for required in ("configs/metadata.json", "LICENSE", "models/model.pt"):
        if not (bundle / required).is_file():
            problems.append(f"{required}: missing (necessary or preferred file of ci/verify_bundle.py)")
    if not any((bundle / "configs" / f"inference.{s}").is_file() for s in ("json", "yaml", "yml")):
        problems.append("configs/inference.json|yaml: missing")
    meta_path = bundle / "configs" / "metadata.json"
    if meta_path.is_file():
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        if metadata.get("version") not in metadata.get("changelog", {}):
            problems.append(f"configs/metadata.json: version {metadata.get('version')!r} is not in the changelog")
    large = _large_file_paths(bundle)
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        relative = path.relative_to(bundle).as_posix()
        if "__pycache__" in relative:
            continue
        if path.stat().st_size > COMMITTED_FILE_LIMIT and relative not in large:
            problems.append(f"{relative}: {path.stat().st_size / 1e6:.1f} MB, over 1 MB and not in large_files.yml")
        if path.suffix not in _TEXT_SUFFIXES or relative in large:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text and not text.endswith("\n") or text.endswith("\n\n"):
            problems.append(f"{relative}: does not end with exactly one newline")
        trailing = [n for n, line in enumerate(text.splitlines(), 1) if line != line.rstrip()]
        if trailing:
            problems.append(f"{relative}: trailing whitespace on lines {trailing[:5]}")
        if path.suffix == ".json" and text != json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n":
            problems.append(f"{relative}: not 4-space formatted JSON")
        if path.suffix in (".yaml", ".yml"):
            try:
                yaml.safe_load(text)
            except yaml.YAMLError as e:
                problems.append(f"{relative}: invalid YAML ({e})")
        if path.suffix == ".py":  # code, not prose: docstrings and messages may name the project
            lines = remaining_references(text, forbidden_package)
        elif path.suffix in (".json", ".yaml", ".yml"):
            pattern = rf"(\bimport\s+{forbidden_package}\b|\b{forbidden_package}\.[A-Za-z_])"
            lines = [n for n, line in enumerate(text.splitlines(), 1) if re.search(pattern, line)]
        else:
            lines = []
        if lines:
            problems.append(f"{relative}: still refers to {forbidden_package} (lines {lines[:5]})")
    return problems
