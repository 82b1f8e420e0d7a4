"""The CT bundles (OpenKBP, prostate) exported for the model zoo run alone and pass its checks (see
``tests.zoo_checks.check_portable_bundle``; one file per pair, so that pytest-xdist runs the pairs side by side)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CACHE_ROOT
from tests.zoo_checks import check_portable_bundle


@pytest.mark.parametrize("name", ["ctan_openkbp", "ctan_prostate"])
def test_exported_bundle_runs_alone_and_passes_the_zoo_checks(name: str, tmp_path: Path) -> None:
    check_portable_bundle(name, tmp_path, CACHE_ROOT / "zoo-envs")
