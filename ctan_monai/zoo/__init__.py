"""Sharing bundles through the MONAI model zoo: ``python -m ctan_monai.zoo export BUNDLE_DIR --out DIR`` writes a
self-contained bundle (its code in ``scripts/``), see :mod:`ctan_monai.zoo.export`. Nothing is imported here, so
that ``import ctan_monai.zoo.closure`` stays cheap."""
