"""Glue between the package and the bundles: data preparation per dataset and bundle helpers."""

from ctan_monai.apps.bundle import find_bundle_root, load_weights

__all__ = ["find_bundle_root", "load_weights"]
