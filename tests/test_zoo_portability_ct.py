"""Exported CT bundles (OpenKBP, prostate) work without this repository and pass the model zoo's offline checks.

Each bundle is exported with ``python -m ctan_monai.zoo export``, trains one short epoch on its demo in a fresh
virtual environment holding torch and only the packages its ``metadata.json`` lists (from the bundle folder), runs
inference on the demo from another directory, and is exported again with that demo-trained model and its validation
report; the re-export then passes the zoo's file checks, MONAI's ``verify_metadata``, ``check_properties`` (train,
inference), ``verify_net_in_out`` and ``ckpt_export`` (in that environment) and black / isort / flake8. The
environments are made once per requirement list under the test cache (the other portability file shares them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CACHE_ROOT
from tests.zoo_checks import check_portable_bundle


@pytest.mark.parametrize("name", ["ctan_openkbp", "ctan_prostate"])
def test_exported_bundle_runs_alone_and_passes_the_zoo_checks(name: str, tmp_path: Path) -> None:
    check_portable_bundle(name, tmp_path, CACHE_ROOT / "zoo-envs")
