"""How much of ``ctan_monai`` each bundle needs: for a config (default ``inference.yaml``), the modules its references
pull in, read from the source (what ``python -m ctan_monai.zoo export`` ships in ``scripts/``) and counted again at
run time (the ``ctan_monai`` modules in ``sys.modules`` after importing the referenced modules, in a fresh process).

Usage::

    python benchmarks/import_closure.py                 # all four bundles, inference.yaml
    python benchmarks/import_closure.py --config train.yaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctan_monai.zoo.closure import config_references, module_closure  # noqa: E402

BUNDLES = ("ctan_openkbp", "ctan_prostate", "ctan_ham10000", "ctan_stoic")

_RUNTIME_PROBE = """
import importlib, json, sys
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(len([m for m in sys.modules if m == "ctan_monai" or m.startswith("ctan_monai.")]))
"""


def measure(bundle: str, config: str) -> dict[str, int | str]:
    """Closure size of one bundle config.

    Args:
        bundle: bundle folder name under ``bundles/``.
        config: config file name under the bundle's ``configs/``.

    Returns:
        the bundle, the static module count and source lines, and the run-time module count.
    """
    text = (REPO / "bundles" / bundle / "configs" / config).read_text(encoding="utf-8")
    package_dir = REPO / "ctan_monai"
    closure = module_closure(config_references([text], "ctan_monai"), package_dir, "ctan_monai")
    lines = sum(len(path.read_text(encoding="utf-8").splitlines()) for path in closure.files.values())
    runtime = subprocess.run(
        [sys.executable, "-c", _RUNTIME_PROBE, json.dumps(closure.modules)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return {"bundle": bundle, "modules": len(closure.modules), "lines": lines, "imported": int(runtime.stdout)}


def main() -> None:
    """Print one row per bundle."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="inference.yaml")
    args = parser.parse_args()
    print(f"| bundle ({args.config}) | modules in the closure | source lines | ctan_monai modules imported |")
    print("|---|---|---|---|")
    for bundle in BUNDLES:
        row = measure(bundle, args.config)
        print(f"| {row['bundle']} | {row['modules']} | {row['lines']} | {row['imported']} |")


if __name__ == "__main__":
    main()
