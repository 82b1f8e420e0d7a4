"""Renaming a package inside Python source and bundle configs, so that copied code imports ``scripts`` (the
model-zoo convention for a bundle's own code) instead of the package it came from."""

from __future__ import annotations

import io
import re
import tokenize

__all__ = ["rename_package_in_config", "rename_package_in_source", "remaining_references"]


def rename_package_in_source(source: str, old: str, new: str) -> str:
    """Rename package ``old`` to ``new`` in Python source: every name token ``old`` (imports, attribute chains)
    and every string literal that is a dotted module path starting with ``old.`` (``importlib`` targets, config
    targets built in code). Other strings (messages, logger names) and comments are left as they are.

    Args:
        source: the module's text.
        old: the package name to replace, e.g. ``"ctan_monai"``.
        new: its new name, e.g. ``"scripts"``.

    Returns:
        the rewritten text, otherwise byte for byte the same (``tokenize.untokenize`` is not used).

    Example:
        >>> rename_package_in_source("from ctan_monai.data import x  # ctan_monai\\n", "ctan_monai", "scripts")
        'from scripts.data import x  # ctan_monai\\n'
    """
    dotted_path = re.compile(rf"^(?P<q>[rRbBuU]?['\"]){re.escape(old)}((?:\.\w+)+)(?P=q)$")
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, int, str]] = []  # (row, start col, end col, replacement) on one line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        (row, col), (end_row, end_col) = token.start, token.end
        if token.type == tokenize.NAME and token.string == old:
            edits.append((row, col, end_col, new))
        elif token.type == tokenize.STRING and row == end_row:
            match = dotted_path.match(token.string)
            if match:
                edits.append((row, col, end_col, f"{match.group('q')}{new}{match.group(2)}{match.group('q')}"))
    for row, col, end_col, replacement in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + replacement + line[end_col:]
    return "".join(lines)


def rename_package_in_config(text: str, old: str, new: str) -> str:
    """Rename package ``old`` to ``new`` wherever a config refers to it as code: ``old.`` followed by a name
    (``_target_`` values, ``$`` expressions) and ``import old``. Prose that names the package without a dot (a
    comment "... ctan_monai ...") is left.

    Args:
        text: a YAML or JSON config.
        old: the package name to replace.
        new: its new name.

    Returns:
        the rewritten text.

    Example:
        >>> rename_package_in_config("- $import ctan_monai.apps\\nb: $ctan_monai.f()", "ctan_monai", "scripts")
        '- $import scripts.apps\\nb: $scripts.f()'
    """
    text = re.sub(rf"\b{re.escape(old)}(?=\.[A-Za-z_])", new, text)
    return re.sub(rf"(\bimport\s+){re.escape(old)}\b", rf"\g<1>{new}", text)


def remaining_references(source: str, name: str) -> list[int]:
    """Lines (1-based) of Python source where ``name`` is still used as code (a name token, not prose).

    Args:
        source: Python source.
        name: the name that must be gone, e.g. ``"ctan_monai"``.

    Returns:
        the line numbers, empty when the source no longer refers to it.

    Example:
        >>> remaining_references("import scripts\\nprint('ctan_monai')\\n", "ctan_monai")
        []
    """
    return sorted(
        {
            token.start[0]
            for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type == tokenize.NAME and token.string == name
        }
    )
