"""The model zoo's checks on an exported bundle, run offline: shared by the bundle test modules (each exports its
own demo-trained model) and the portability test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from ctan_monai.zoo.checks import zoo_file_problems
from ctan_monai.zoo.export import ExportResult, export_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = REPO_ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"

# the zoo repository's flake8 settings (setup.cfg) for the checks flake8 itself has (its plugins B, N are not
# installed here)
FLAKE8_ARGS = ["--max-line-length", "120", "--extend-ignore", "E203,E501,E741,W503,W504,C408,N812,B023"]
ISORT_ARGS = ["--profile", "black", "--line-length", "120", "--check-only", "--diff"]

# Runs in a fresh interpreter with the exported folder as bundle root; any import of ctan_monai fails, so the
# checks prove the bundle needs only its own scripts/. Prints one JSON line with what it measured.
_MONAI_CHECKS = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _NoProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ctan_monai" or name.startswith("ctan_monai."):
                raise ImportError(f"the exported bundle imported {name}")
            return None

    sys.meta_path.insert(0, _NoProject())
    bundle, schema = sys.argv[1], sys.argv[2]
    sys.path.insert(0, bundle)
    import torch
    from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

    result = {}
    verify_metadata(meta_file=f"{bundle}/configs/metadata.json", filepath=schema)
    for kind, config in (("train", "train.yaml"), ("inference", "inference.yaml")):
        workflow = ConfigWorkflow(
            config_file=f"{bundle}/configs/{config}", meta_file=f"{bundle}/configs/metadata.json",
            logging_file=f"{bundle}/configs/logging.conf", workflow_type=kind, bundle_root=bundle,
        )
        workflow.initialize()  # as the zoo's create_workflow does; properties are then parsed one by one
        result[f"missing_{kind}_properties"] = workflow.check_properties() or []
    verify_net_in_out(
        net_id="seg_network_def", meta_file=f"{bundle}/configs/metadata.json",
        config_file=f"{bundle}/configs/train.yaml", bundle_root=bundle,
    )
    ckpt_export(
        net_id="network_def", filepath=f"{bundle}/models/verify_model.ts", ckpt_file=f"{bundle}/models/model.pt",
        meta_file=f"{bundle}/configs/metadata.json", config_file=f"{bundle}/configs/inference.yaml",
        bundle_root=bundle,
    )
    from monai.bundle import ConfigParser
    parser = ConfigParser()
    parser.read_config(f"{bundle}/configs/inference.yaml")
    parser.read_meta(f"{bundle}/configs/metadata.json")
    parser["bundle_root"] = bundle
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(f"{bundle}/models/model.pt", map_location="cpu", weights_only=True))
    network.eval()
    scripted = torch.jit.load(f"{bundle}/models/verify_model.ts")
    shape = parser.get_parsed_content("_meta_#network_data_format#inputs#image#spatial_shape")
    channels = parser.get_parsed_content("_meta_#network_data_format#inputs#image#num_channels")
    torch.manual_seed(0)
    x = torch.rand(1, channels, *shape)
    with torch.no_grad():
        eager, traced = network(x), scripted(x)
    result["max_abs_difference"] = max(float((eager[k] - traced[k]).abs().max()) for k in eager)
    result["imported_project"] = sorted(m for m in sys.modules if m.split(".")[0] == "ctan_monai")
    print("ZOO_CHECKS " + json.dumps(result))
    """
)


def run_monai_checks(bundle: Path, python: str = sys.executable, timeout: float = 600) -> dict:
    """MONAI's checks of the zoo on an exported bundle, in a subprocess that cannot import ``ctan_monai``:
    ``verify_metadata`` (the shared schema, offline), ``check_properties`` for train and inference,
    ``verify_net_in_out`` on ``seg_network_def``, ``ckpt_export`` and the TorchScript module's outputs against the
    eager network's. Returns what the subprocess measured; fails with its output when a check raised."""
    proc = subprocess.run(
        [python, "-c", _MONAI_CHECKS, str(bundle), str(SCHEMA)],
        cwd=bundle.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ZOO_CHECKS ")), None)
    assert proc.returncode == 0 and line is not None, proc.stdout[-4000:]
    return json.loads(line[len("ZOO_CHECKS ") :])


def run_code_style_checks(bundle: Path) -> None:
    """black, isort and flake8 on ``scripts/`` with the zoo repository's settings (line length 120)."""
    scripts = str(bundle / "scripts")
    for command in (
        [sys.executable, "-m", "black", "--check", "--line-length", "120", "--quiet", scripts],
        [sys.executable, "-m", "isort", *ISORT_ARGS, scripts],
        [sys.executable, "-m", "flake8", *FLAKE8_ARGS, scripts],
    ):
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(command[2:4])}: {proc.stdout[-3000:]}"


def export_and_check(bundle: Path, model: Path, report: Path | None, out: Path) -> ExportResult:
    """Export ``bundle`` with ``model`` (and its evaluation ``report``) to ``out`` and run every offline zoo check
    on it: the file checks, MONAI's checks and the code style. Returns the export's result."""
    if out.exists():
        shutil.rmtree(out)
    result = export_bundle(bundle, out, model=model, report=report)
    assert zoo_file_problems(out) == []
    checks = run_monai_checks(out)
    assert checks["missing_train_properties"] == [] and checks["missing_inference_properties"] == [], checks
    assert checks["max_abs_difference"] < 1e-4 and checks["imported_project"] == [], checks
    run_code_style_checks(out)
    return result
