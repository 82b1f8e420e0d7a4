"""Small utilities shared across the package."""

from ctan_monai.utils.atomic import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["atomic_path", "atomic_write_json", "atomic_write_text"]
