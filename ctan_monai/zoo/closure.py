"""What a bundle's configs need of a package: the modules they name and everything those import, found by reading
the source (nothing is imported), with the third-party packages they use."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ModuleClosure", "config_references", "module_closure"]


def config_references(config_texts: Iterable[str], package: str) -> set[str]:
    """The dotted names under ``package`` that config files mention (``_target_`` values, ``$`` expressions,
    ``$import`` lines).

    Args:
        config_texts: the text of each config file (YAML or JSON).
        package: the top-level package name, e.g. ``"ctan_monai"``.

    Returns:
        every dotted name ``package.a.b...`` found, as written (it may end in a class or function name).

    Example:
        >>> sorted(config_references(["x: $ctan_monai.apps.f(@y)"], "ctan_monai"))
        ['ctan_monai.apps.f']
    """
    pattern = re.compile(rf"\b{re.escape(package)}(?:\.[A-Za-z_]\w*)*")
    return {match.group(0) for text in config_texts for match in pattern.finditer(text)}


@dataclass
class ModuleClosure:
    """The modules of one package that a set of roots needs, and the third-party top-level imports among them.

    Attributes:
        modules: dotted module names (packages included, as their ``__init__``), sorted.
        files: the source file of each module, by name.
        third_party: top-level names of imported modules outside the package and the standard library.
    """

    modules: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    third_party: set[str] = field(default_factory=set)


def _module_file(package_dir: Path, package: str, name: str) -> Path | None:
    """The file of module ``name`` (``package.x.y``) under ``package_dir``, or None when it is not a module."""
    parts = name.split(".")
    if parts[0] != package:
        return None
    base = package_dir.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _longest_module(package_dir: Path, package: str, dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the package (``a.b.Class`` -> ``a.b``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if _module_file(package_dir, package, candidate) is not None:
            return candidate
    return None


def _lazy_exports(path: Path) -> dict[str, str]:
    """A package's lazy exports (``_EXPORTS = {submodule: [names]}``, see ``ctan_monai.utils.lazy``), name to
    submodule; empty for a module without them."""
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            exports = ast.literal_eval(node.value)
            return {name: submodule for submodule, names in exports.items() for name in names}
    return {}


def _defining_module(package_dir: Path, package: str, module: str, attribute: str) -> str:
    """``module``, or its submodule that a lazy package exports ``attribute`` from (``pkg`` + ``Name`` ->
    ``pkg.sub``)."""
    path = _module_file(package_dir, package, module)
    if attribute and path is not None and path.name == "__init__.py":
        submodule = _lazy_exports(path).get(attribute)
        if submodule is not None:
            return f"{module}.{submodule}"
    return module


def _resolve(package_dir: Path, package: str, dotted: str) -> str | None:
    """The module that defines ``dotted``: its longest module prefix, or the submodule a lazy package exports the
    next name from."""
    module = _longest_module(package_dir, package, dotted)
    if module is None:
        return None
    return _defining_module(package_dir, package, module, dotted[len(module) + 1 :].split(".")[0])


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names | set(_lazy_exports(path))


def _imports_of(path: Path, module: str, is_package: bool) -> list[str]:
    """Absolute names imported anywhere in a module (inside functions too: a lazy import is still needed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    current_package = module if is_package else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = current_package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            # ``from pkg import sub`` may name a submodule
            names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def module_closure(roots: Iterable[str], package_dir: str | Path, package: str) -> ModuleClosure:
    """Every module of ``package`` that importing ``roots`` executes: the roots, what they import (recursively,
    lazy imports included) and each one's parent packages.

    Args:
        roots: dotted names under ``package`` (modules, or attributes of modules: ``a.b.f`` counts as ``a.b``).
        package_dir: the package's folder (holding its ``__init__.py``).
        package: the package's import name.

    Returns:
        the closure, with its third-party imports.

    Raises:
        ValueError: when a root is not in the package, or names an attribute its module does not define (a typo
            in a config).

    Example:
        >>> import ctan_monai, pathlib
        >>> closure = module_closure(["ctan_monai.tasks"], pathlib.Path(ctan_monai.__file__).parent, "ctan_monai")
        >>> "ctan_monai.tasks" in closure.modules
        True
    """
    package_dir = Path(package_dir)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    closure = ModuleClosure()
    pending: list[str] = []
    for root in roots:
        module = _longest_module(package_dir, package, root)
        if module is None:
            raise ValueError(f"{root!r} is not a module of {package} (or an attribute of one) in {package_dir}")
        attribute = root[len(module) + 1 :].split(".")[0]
        module = _defining_module(package_dir, package, module, attribute)
        module_file = _module_file(package_dir, package, module)
        if attribute and module_file is not None and attribute not in _top_level_names(module_file):
            raise ValueError(f"{root!r}: {module} is not a module of {package} with {attribute!r} ({module_file})")
        pending.append(module)
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(package_dir, package, module)
        assert path is not None
        closure.files[module] = path
        parts = module.split(".")
        pending.extend(".".join(parts[:end]) for end in range(1, len(parts)))  # parent packages run first
        for name in _imports_of(path, module, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top == package:
                found = _resolve(package_dir, package, name)
                if found is not None:
                    pending.append(found)
            elif top and top not in stdlib:
                closure.third_party.add(top)
    closure.modules = sorted(seen)
    return closure
