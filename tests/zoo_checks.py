"""The model zoo's checks on an exported bundle, run offline (MONAI's bundle checks in a given interpreter, the zoo
repository's code style), and the fresh environments the portability tests run exported bundles in."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctan_monai.zoo.export import shape_check_network
from tests.conftest import run_command

if TYPE_CHECKING:
    import torch

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
    bundle, data_root, shape_net_id = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, bundle)
    import torch
    from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out

    result = {}
    for kind, config in (("train", "train.yaml"), ("inference", "inference.yaml")):
        workflow = ConfigWorkflow(
            config_file=f"{bundle}/configs/{config}", meta_file=f"{bundle}/configs/metadata.json",
            logging_file=f"{bundle}/configs/logging.conf", workflow_type=kind, bundle_root=data_root,
        )
        workflow.initialize()  # as the zoo's create_workflow does; properties are then parsed one by one
        result[f"missing_{kind}_properties"] = workflow.check_properties() or []
    verify_net_in_out(
        net_id=shape_net_id, meta_file=f"{bundle}/configs/metadata.json",
        config_file=f"{bundle}/configs/train.yaml", bundle_root=data_root,
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
    print("ZOO_CHECKS " + json.dumps(result))
    """
)


def run_monai_checks(
    bundle: Path, python: str | Path = sys.executable, data_root: Path | None = None, timeout: float = 600
) -> dict:
    """MONAI's checks of the zoo on an exported bundle, in a subprocess (``python``) that cannot import
    ``ctan_monai``: ``check_properties`` for train and inference
    (the properties are parsed, so ``data_root``, a bundle folder that already holds the demo data, is their
    ``bundle_root``), ``verify_net_in_out`` on ``seg_network_def``, ``ckpt_export`` and the TorchScript module's
    outputs against the eager network's. Returns what the subprocess measured; fails with its output when a check
    raised."""
    proc = subprocess.run(
        [str(python), "-c", _MONAI_CHECKS, str(bundle), str(data_root or bundle), shape_check_network(bundle)],
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


# ------------------------------------------------------------------------------------------ fresh environments
PIP_TIMEOUT = 1200
# one short epoch per bundle on its demo (validated at its end: the report gives the re-export's eval_metrics)
# (the CT bundles validate one demo patient: a whole patient through the paper's ResNet-50 takes half a minute here)
SHORT_TRAINING = {
    "ctan_openkbp": ["--train_slices_per_epoch", "8", "--batch_size", "4", "--summary_untrained", "False"]
    + ["--validate#dataset#data", "$@data['validation-pats'][:1]"],
    "ctan_prostate": ["--train_slices_per_epoch", "8", "--batch_size", "4", "--summary_untrained", "False"]
    + ["--validate#dataset#data", "$@data['validation'][:1]"],
    "ctan_ham10000": ["--image_size", "64", "--train_samples_per_epoch", "16", "--summary_untrained", "False"],
    "ctan_stoic": ["--train_patients_per_epoch", "4", "--summary_untrained", "False"],
}
INFERENCE_OPTIONS = {"ctan_ham10000": ["--image_size", "64"]}
# one demo case each (every inference config takes a single case as input_dir), written by the training
ONE_CASE = {
    "ctan_openkbp": ("demo_data/openkbp/provided-data/validation-pats", "pt_*"),
    "ctan_ham10000": ("demo_data/ham10000/HAM10000_images_part_1", "*.jpg"),
    "ctan_stoic": ("demo_data/stoic/data/mha", "*.mha"),
}


def one_demo_case(name: str, bundle: Path) -> list[str]:
    """``--input_dir`` of the first demo case of ``bundle`` (after a training wrote its demo); none for the prostate
    demo, whose DICOM files lie in folders of random names (one series spans several)."""
    if name not in ONE_CASE:
        return []
    folder, pattern = ONE_CASE[name]
    cases = sorted((bundle / folder).glob(pattern))
    assert cases, f"{bundle / folder}: no {pattern} (did the training write the demo?)"
    return ["--input_dir", str(cases[0])]


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=PIP_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


def _site_packages(env: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))


def fresh_env(cache: Path, requirements: list[str], base: Sequence[Path] = ()) -> Path:
    """A virtual environment under ``cache`` with exactly ``requirements`` (and, through a ``.pth`` file, what the
    ``base`` environments hold: torch, installed first as the exported README says, and the pins every bundle
    shares), made once per requirement list and shared by pytest-xdist workers (a lock file; a marker written last,
    so a half-made one is redone)."""
    key = hashlib.sha256("\n".join(sorted(requirements) + [str(b) for b in base]).encode()).hexdigest()[:16]
    env = cache / f"env-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".env-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env / ".ready").is_file():
            shutil.rmtree(env, ignore_errors=True)
            venv.create(env, with_pip=True)
            if base:
                # .pth lines are not followed into the added folders' own .pth files, so every base is listed here
                (_site_packages(env) / "zoo_base.pth").write_text("".join(f"{_site_packages(b)}\n" for b in base))
            if requirements:
                _pip(env / "bin" / "python", *requirements)
            (env / ".ready").write_text("\n".join(requirements) + "\n")
    return env


# Pins that every bundle's metadata lists (at the same versions): installed once into an environment that each
# bundle's own environment sees through its .pth file, so that each bundle installs only the rest. Together the
# two hold exactly the bundle's pins; a bundle without all of them gets one environment with everything.
SHARED_PACKAGES = ("monai", "numpy", "pytorch-ignite", "matplotlib", "tensorboard")


def bundle_env(cache: Path, requirements: list[str]) -> Path:
    """The fresh environment an exported bundle is run in: torch, then exactly ``requirements`` (its metadata's
    pins), the :data:`SHARED_PACKAGES` among them from an environment shared by the bundles."""
    torch_env = fresh_env(cache, [f"torch=={_torch_version()}"])
    shared = [r for r in requirements if r.split("==")[0] in SHARED_PACKAGES]
    if len(shared) != len(SHARED_PACKAGES):
        return fresh_env(cache, requirements, base=[torch_env])
    shared_env = fresh_env(cache, shared, base=[torch_env])
    own = [r for r in requirements if r not in shared]
    return fresh_env(cache, own, base=[shared_env, torch_env])


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def metadata_requirements(bundle: Path) -> list[str]:
    """The packages an exported bundle's ``metadata.json`` lists, pinned (torch aside)."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    pins = {"monai": meta["monai_version"], "numpy": meta["numpy_version"], **meta["required_packages_version"]}
    return [f"{k}=={v}" for k, v in pins.items()]


def _without_our_paths() -> dict[str, str]:
    """This process's environment variables without its Python paths (a fresh venv must not see this checkout)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run_in(python: Path, args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> str:
    """``python -m monai.bundle <args>`` in ``cwd`` with none of this environment's Python paths."""
    env = _without_our_paths() | (env_extra or {})
    return run_command([str(python), "-m", "monai.bundle", *args], cwd, timeout=900, env=env)


def seeded_network(bundle: Path) -> torch.nn.Module:
    """``bundle``'s inference network (``network_def`` of its inference.yaml) built after ``torch.manual_seed(0)``."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def")


def random_weights(bundle: Path, target: Path) -> Path:
    """Seed-0 weights of ``bundle``'s inference network (an export needs some; the test then trains its own)."""
    import torch

    torch.save(seeded_network(bundle).state_dict(), target)
    return target


def assert_export_matches_eager(
    network: torch.nn.Module, bundle: Path, workdir: Path, example: torch.Tensor, atol: float = 1e-4, **overrides: Any
) -> dict[str, torch.Tensor]:
    """Export ``network``'s weights with MONAI's ``ckpt_export`` from ``bundle``'s train.yaml and assert that the
    TorchScript module gives the eager network's outputs.

    Args:
        network: the network ``network_def`` builds with ``overrides`` (its weights are saved and exported).
        bundle: the bundle folder (``configs/train.yaml``, ``configs/metadata.json``).
        workdir: where the checkpoint and ``model.ts`` are written.
        example: an input batch for both networks.
        atol: the largest absolute difference allowed on any output.
        overrides: config overrides passed to ``ckpt_export`` (e.g. ``backbone="resnet18"``).

    Returns:
        The exported module's outputs on ``example``, by task name.

    Raises:
        AssertionError: an output of the exported module differs from the eager one by ``atol`` or more.

    Example:
        >>> outputs = assert_export_matches_eager(net, bundle, tmp_path, torch.rand(2, 1, 64, 64), backbone="resnet18")
    """
    import torch
    from monai.bundle import ckpt_export

    checkpoint = workdir / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    ckpt_export(
        "network_def",
        filepath=str(workdir / "model.ts"),
        ckpt_file=str(checkpoint),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "train.yaml"),
        bundle_root=str(bundle),
        **overrides,
    )
    scripted = torch.jit.load(str(workdir / "model.ts"))
    network.eval()
    with torch.no_grad():
        eager, exported = network(example), scripted(example)
    assert set(exported) == set(eager)
    for name in eager:
        difference = float((eager[name] - exported[name]).abs().max())
        assert difference < atol, f"{name}: the exported output differs by {difference:.2e}"
    return exported


def check_portable_bundle(name: str, work: Path, cache: Path) -> dict:
    """The whole zoo path for one bundle: export it (seed-0 weights), train one short epoch on its demo in a fresh
    environment holding only its metadata's packages (from the bundle folder), infer on the demo from another
    directory, re-export with that demo-trained model and its validation report, and run every offline zoo check
    on the re-export in the same environment. Returns what MONAI's checks measured."""
    from monai.bundle import verify_metadata

    from ctan_monai.zoo.checks import zoo_file_problems
    from ctan_monai.zoo.export import export_bundle

    source = REPO_ROOT / "bundles" / name
    bundle = export_bundle(source, work / "first" / name, model=random_weights(source, work / "seed0.pt")).out_dir
    python = bundle_env(cache, metadata_requirements(bundle)) / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import ctan_monai"], capture_output=True, cwd=work, env=_without_our_paths()
    )
    assert probe.returncode != 0, "the fresh environment can import ctan_monai"

    train = ["run", "training", "--config_file", "configs/train.yaml", "--epochs", "1", "--progress_bar", "False"]
    run_in(python, train + SHORT_TRAINING[name], cwd=bundle)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    infer = ["run", "--config_file", str(bundle / "configs" / "inference.yaml"), "--bundle_root", str(bundle)]
    infer += one_demo_case(name, bundle)
    run_in(python, infer + INFERENCE_OPTIONS.get(name, []), cwd=elsewhere, env_extra={"PYTHONPATH": str(bundle)})
    assert [p for p in (bundle / "runs" / "ctan" / "inference").rglob("*") if p.is_file()], "inference wrote nothing"
    assert not any(elsewhere.iterdir()), "inference wrote into the working directory"

    report = bundle / "runs" / "ctan" / "validation" / "report.json"
    final = export_bundle(source, work / "final" / name, model=bundle / "models" / "model.pt", report=report).out_dir
    assert zoo_file_problems(final) == []
    verify_metadata(meta_file=str(final / "configs" / "metadata.json"), filepath=str(SCHEMA))  # needs jsonschema
    meta = json.loads((final / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] and all(isinstance(v, float) for v in meta["eval_metrics"].values()), meta
    checks = run_monai_checks(final, python=python, data_root=bundle)
    assert checks["missing_train_properties"] == [] and checks["missing_inference_properties"] == [], checks
    assert checks["max_abs_difference"] < 1e-4, checks
    run_code_style_checks(final)
    return checks
