"""Makes the ``bench`` package importable when one of its scripts runs as a file (``python bench/speed.py``).

Python then puts ``bench/`` itself on the import path, not the repository root above it, so ``import bench``
would fail; :func:`register` loads the package from this folder under its own name instead, and the script's
``from bench... import ...`` lines resolve as they do under ``python -m bench.speed``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def register() -> None:
    """Load ``bench`` from this folder into ``sys.modules`` (once)."""
    if "bench" in sys.modules:
        return
    folder = Path(__file__).parent
    spec = importlib.util.spec_from_file_location(
        "bench", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = package
    spec.loader.exec_module(package)


register()
