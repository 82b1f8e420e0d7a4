"""The packages an exported bundle lists in its ``metadata.json``: pinned to releases that have wheels for the
model zoo CI's Python 3.10 as well as 3.11 (checked with ``pip install --dry-run --python-version 3.10
--only-binary=:all:``; the test suite repeats that check)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BASE_REQUIREMENTS", "DISTRIBUTION_OF_IMPORT", "ZOO_PINS", "bundle_requirements"]

# import name -> distribution name, for the imports whose names differ
DISTRIBUTION_OF_IMPORT: dict[str, str] = {
    "PIL": "pillow",
    "SimpleITK": "SimpleITK",
    "ignite": "pytorch-ignite",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "yaml": "PyYAML",
}

# The newest releases with wheels for both Python 3.10 and 3.11 (numpy 2.3+, scipy 1.16+, pandas 3 need 3.11).
# metadata.json carries monai, torch and numpy under their own keys; everything else goes to
# required_packages_version.
ZOO_PINS: dict[str, str] = {
    "monai": "1.6.1",
    "torch": "2.13.0",
    "numpy": "2.2.6",
    "pytorch-ignite": "0.5.5",
    "PyYAML": "6.0.3",
    "fire": "0.7.1",
    "nibabel": "5.3.2",
    "SimpleITK": "2.5.3",
    "pydicom": "3.0.1",
    "scipy": "1.15.3",
    "scikit-image": "0.25.2",
    "scikit-learn": "1.7.2",
    "pandas": "2.3.3",
    "matplotlib": "3.10.7",
    "pillow": "12.0.0",
    "tensorboard": "2.20.0",
    "tqdm": "4.67.1",
}

# every bundle: configs are YAML (PyYAML), ``python -m monai.bundle`` parses its arguments with fire, the engines
# are Ignite's
BASE_REQUIREMENTS = ("PyYAML", "fire", "pytorch-ignite")
_OWN_KEYS = {"monai", "torch", "numpy"}


def bundle_requirements(third_party_imports: Iterable[str], extra: Iterable[str] = ()) -> dict[str, str]:
    """The ``required_packages_version`` of an exported bundle: the distributions of its code's third-party
    imports, the base requirements and ``extra`` (e.g. what MONAI needs for the configs' readers), pinned.

    Args:
        third_party_imports: top-level import names found in the bundle's code.
        extra: further distribution names.

    Returns:
        distribution -> version, sorted by name; monai, torch and numpy are left out (metadata.json has their own
        keys).

    Raises:
        KeyError: for a distribution with no pin in :data:`ZOO_PINS` (add one that installs on Python 3.10).

    Example:
        >>> bundle_requirements(["yaml", "numpy", "skimage"])["scikit-image"]
        '0.25.2'
    """
    names = {DISTRIBUTION_OF_IMPORT.get(name, name) for name in third_party_imports}
    names |= set(BASE_REQUIREMENTS) | set(extra)
    if "matplotlib" in names:
        names.add("pillow")  # matplotlib writes PNGs with it: pinned here so that the environment is reproducible
    names -= _OWN_KEYS
    missing = sorted(name for name in names if name not in ZOO_PINS)
    if missing:
        raise KeyError(f"no Python 3.10 pin for {missing}: add them to ctan_monai.zoo.requirements.ZOO_PINS")
    return {name: ZOO_PINS[name] for name in sorted(names, key=str.lower)}
