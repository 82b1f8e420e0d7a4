"""One room per dataset (``openkbp``, ``prostate``, ``ham10000``, ``stoic``: reader, validation, demo writer,
preparation, transforms, inference, evaluation), what the bundles share (``bundle``, ``volume_inference``)."""

from ctan_monai.apps.bundle import find_bundle_root, load_weights

__all__ = ["find_bundle_root", "load_weights"]
