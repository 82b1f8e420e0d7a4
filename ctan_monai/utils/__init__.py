"""Small utilities shared across the package."""

from ctan_monai.utils.atomic import atomic_path, atomic_write_json, atomic_write_text
from ctan_monai.utils.json_safe import json_safe

__all__ = ["atomic_path", "atomic_write_json", "atomic_write_text", "json_safe"]
