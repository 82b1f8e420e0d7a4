"""Start the real MONAI Label server (monailabel 0.8.5) with this app, offline.

    python monailabel_app/start_server.py --studies STUDIES [--host 127.0.0.1] [--port 8000] [--conf NAME VALUE ...]

It is ``monailabel start_server --app monailabel_app ...`` after :func:`compat.install` (pydicom 3 and the missing
torchvision, see ``compat.py``), with ``--conf zoo_source local`` added unless given (MONAI Label otherwise asks
the model zoo's server for its bundle list at start-up) and ``--host 127.0.0.1`` unless given.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_APP_DIR = os.path.dirname(os.path.abspath(__file__))
if _APP_DIR not in sys.path:
    sys.path.insert(0, _APP_DIR)

import compat  # noqa: E402

__all__ = ["main", "server_argv"]


def server_argv(args: Sequence[str]) -> list[str]:
    """The ``monailabel`` command line for ``args`` (this script's arguments).

    Args:
        args: ``--studies ...`` and any other ``monailabel start_server`` options.

    Returns:
        ``["monailabel", "start_server", "--app", <this folder>, *args]`` plus the offline defaults.

    Raises:
        ValueError: when ``args`` names another ``--app``.

    Example:
        >>> server_argv(["--studies", "s"])[:2]
        ['monailabel', 'start_server']
    """
    args = list(args)
    if "--app" in args or "-a" in args:
        raise ValueError("start_server.py serves its own folder: leave out --app")
    conf_names = {args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--conf", "-c")}
    if "zoo_source" not in conf_names:
        args += ["--conf", "zoo_source", "local"]
    if "--host" not in args and "-i" not in args:
        args += ["--host", "127.0.0.1"]
    return ["monailabel", "start_server", "--app", _APP_DIR, *args]


def main(args: Sequence[str] | None = None) -> None:
    """Install the compatibility stand-ins and run MONAI Label's ``start_server`` in this process.

    Args:
        args: the arguments (default: ``sys.argv[1:]``).

    Example:
        >>> main(["--studies", "studies", "--port", "8000"])  # doctest: +SKIP
    """
    compat.install()
    from monailabel.main import Main

    sys.argv = server_argv(sys.argv[1:] if args is None else args)
    Main().run()


if __name__ == "__main__":
    main()
