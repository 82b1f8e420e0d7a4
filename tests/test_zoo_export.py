"""The model-zoo export (``python -m ctan_monai.zoo export``): renaming, the import closure, requirements that
install on Python 3.10, the files the zoo checks; the per-bundle export checks live in each bundle's test module
(they reuse its demo-trained model) and the fresh-venv run in ``test_zoo_portability.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ctan_monai
from ctan_monai.zoo.checks import zoo_file_problems
from ctan_monai.zoo.closure import config_references, module_closure
from ctan_monai.zoo.export import ZooExportError, export_bundle
from ctan_monai.zoo.readme import split_sections
from ctan_monai.zoo.requirements import ZOO_PINS, bundle_requirements
from ctan_monai.zoo.rewrite import remaining_references, rename_package_in_config, rename_package_in_source
from tests.zoo_checks import random_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(ctan_monai.__file__).resolve().parent
BUNDLES = ("ctan_openkbp", "ctan_prostate", "ctan_ham10000", "ctan_stoic")


def test_source_renaming_touches_code_only() -> None:
    source = (
        '"""Uses ctan_monai.data (prose stays)."""\n'
        "import ctan_monai.apps as apps\n"
        "from ctan_monai.data import slices  # ctan_monai in a comment\n"
        "x = ctan_monai.networks.build_network\n"
        'target = "ctan_monai.engines.ValidateHandler"\n'
        'fmt = "ctan_monai.openkbp.nifti/1"\n'
        'msg = f"see ctan_monai for {x}"\n'
    )
    out = rename_package_in_source(source, "ctan_monai", "scripts")
    assert out.splitlines() == [
        '"""Uses ctan_monai.data (prose stays)."""',
        "import scripts.apps as apps",
        "from scripts.data import slices  # ctan_monai in a comment",
        "x = scripts.networks.build_network",
        'target = "scripts.engines.ValidateHandler"',  # a dotted module path is code
        'fmt = "ctan_monai.openkbp.nifti/1"',  # a cache format tag is not
        'msg = f"see ctan_monai for {x}"',
    ]
    assert remaining_references(out, "ctan_monai") == []
    assert remaining_references(source, "ctan_monai") == [2, 3, 4]


def test_config_renaming_and_references() -> None:
    text = "imports:\n  - $import ctan_monai\n  - $import ctan_monai.apps\n# ctan_monai prose\nx: $ctan_monai.f(@y)\n"
    assert config_references([text], "ctan_monai") == {"ctan_monai", "ctan_monai.apps", "ctan_monai.f"}
    out = rename_package_in_config(text, "ctan_monai", "scripts")
    assert out == "imports:\n  - $import scripts\n  - $import scripts.apps\n# ctan_monai prose\nx: $scripts.f(@y)\n"


def test_closure_follows_imports_and_parents() -> None:
    closure = module_closure(["ctan_monai.zoo.rewrite.rename_package_in_source"], PACKAGE_DIR, "ctan_monai")
    assert {"ctan_monai", "ctan_monai.zoo", "ctan_monai.zoo.rewrite"} <= set(closure.modules)  # parents run first
    assert "ctan_monai.zoo.export" not in closure.modules  # not imported by rewrite
    export = module_closure(["ctan_monai.zoo.export"], PACKAGE_DIR, "ctan_monai")
    assert {"ctan_monai.zoo.closure", "ctan_monai.zoo.readme", "ctan_monai.compare.spec"} <= set(export.modules)
    assert "yaml" in export.third_party and "json" not in export.third_party
    with pytest.raises(ValueError, match="not a module"):
        module_closure(["ctan_monai.no_such_module"], PACKAGE_DIR, "ctan_monai")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_import_of_a_bundle_has_a_python310_pin(bundle: str) -> None:
    texts = [p.read_text() for p in (REPO_ROOT / "bundles" / bundle / "configs").glob("*.yaml")]
    closure = module_closure(config_references(texts, "ctan_monai"), PACKAGE_DIR, "ctan_monai")
    requirements = bundle_requirements(closure.third_party)
    assert {"PyYAML", "fire", "pytorch-ignite"} <= set(requirements) and "ctan_monai" not in requirements
    assert "monai" not in requirements and "torch" not in requirements  # metadata.json has their own keys


def test_pins_install_on_python_310(tmp_path: Path) -> None:
    """What the zoo CI's Python 3.10 would install: every pin has a binary wheel for it (asks the package index)."""
    pins = [f"{name}=={version}" for name, version in ZOO_PINS.items()]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed"]
    command += ["--python-version", "3.10", "--only-binary=:all:", "--target", str(tmp_path / "t"), *pins]
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    would = proc.stdout.split("Would install", 1)[-1].lower()
    assert all(f"{name.lower()}-{version}" in would for name, version in ZOO_PINS.items()), proc.stdout[-2000:]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_source_bundle_json_is_zoo_formatted(bundle: str) -> None:
    for path in sorted((REPO_ROOT / "bundles" / bundle).glob("*/*.json")):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n", path


def test_export_writes_a_self_contained_bundle(tmp_path: Path) -> None:
    source = REPO_ROOT / "bundles" / "ctan_ham10000"
    weights = tmp_path / "checkpoint.pt"  # a training checkpoint: the weights under "model"
    torch.save({"model": torch.load(random_weights(source, tmp_path / "w.pt"), weights_only=True)}, weights)
    out = tmp_path / "dist" / "ctan_ham10000"
    result = export_bundle(source, out, model=weights, write_zip=True)
    assert zoo_file_problems(out) == []
    assert not (out / "configs" / "compare.yaml").exists()  # this project's comparison tool, not the bundle's
    assert 'bundle_root: "."' in (out / "configs" / "inference.yaml").read_text()
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["numpy_version"] == ZOO_PINS["numpy"] and "ctan_monai" not in meta["required_packages_version"]
    assert meta["required_packages_version"] == result.requirements and "tensorboard" in result.requirements
    assert meta["eval_metrics"] == json.loads((source / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert " " in meta["name"]  # a display name
    large = (out / "large_files.yml").read_text()
    assert "models/model.pt" in large and "sha256" in large and result.large_files == ["models/model.pt"]
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert "model" not in state and all(hasattr(v, "shape") for v in state.values())  # a plain state dict
    assert (out / "scripts" / "__init__.py").is_file() and result.lines > 0
    assert all(remaining_references(p.read_text(), "ctan_monai") == [] for p in (out / "scripts").rglob("*.py"))
    readme = (out / "docs" / "README.md").read_text()
    _, sections = split_sections(readme)
    titles = [t for t, _ in sections]
    for needed in ("**Model Overview**", "**Data**", "**Performance**", "**MONAI Bundle Commands**"):
        assert needed in titles, titles
    for needed in ("**System Configuration**", "**Limitations**", "**Citation Info**", "**References**"):
        assert needed in titles, titles
    assert "### **Authors**" in readme and "### **Tags**" in readme and "TensorRT" in readme
    assert "bundles/ctan_ham10000/" not in readme  # commands relative to the bundle folder
    import zipfile

    with zipfile.ZipFile(result.zip_path) as archive:
        assert "ctan_ham10000/configs/metadata.json" in archive.namelist()

    with pytest.raises(FileExistsError):
        export_bundle(source, out, model=weights)
    # overwrite: the new bundle and archive replace the old; nothing half-written or set aside is left beside them
    (out / "stale.txt").write_text("from the first export")
    again = export_bundle(source, out, model=weights, write_zip=True, overwrite=True)
    assert not (out / "stale.txt").exists() and zoo_file_problems(out) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["ctan_ham10000", "ctan_ham10000.zip"]
    with zipfile.ZipFile(again.zip_path) as archive:
        assert archive.testzip() is None and "ctan_ham10000/stale.txt" not in archive.namelist()


def test_export_refuses_placeholder_metrics_and_missing_weights(tmp_path: Path) -> None:
    source = tmp_path / "src" / "ctan_prostate"
    shutil.copytree(REPO_ROOT / "bundles" / "ctan_prostate" / "configs", source / "configs")
    shutil.copy(REPO_ROOT / "bundles" / "ctan_prostate" / "LICENSE", source / "LICENSE")
    meta_path = source / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["eval_metrics"] = {"mean_dice": 0.0, "dose_mae": 0.0}  # what three bundles once shipped
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    weights = random_weights(source, tmp_path / "w.pt")
    with pytest.raises(ZooExportError, match="placeholders"):
        export_bundle(source, tmp_path / "a", model=weights)
    with pytest.raises(ZooExportError, match="no trained weights"):
        export_bundle(source, tmp_path / "b", model=tmp_path / "missing.pt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
