"""Decisions measured on the GPU, kept between processes: one JSON object per file in the user's cache directory.

The kernel paths of converted layers (:mod:`~dmquant.kernels.paths`) and the cuDNN plan of each FP8 convolution
shape (:mod:`~dmquant.kernels.cudnn_conv`) are measured once per device and shape; each kind has a file here,
mapping a key (the device, versions and shape, as JSON) to what was measured. A file that cannot be read, or an
entry of the wrong form, counts as absent: it is only a cache. Writes merge with what another process may have
added meanwhile, atomically; a cache that cannot be written costs a later run its measurements, never this one's
result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_atomically

#: The environment variable that moves the cache directory (default: ``$XDG_CACHE_HOME/dmquant``).
CACHE_VARIABLE = "DMQUANT_CACHE_DIR"


def cache_dir() -> Path:
    """``$DMQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/dmquant``, else ``~/.cache/dmquant``."""
    folder = os.environ.get(CACHE_VARIABLE)
    if not folder:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dmquant")
    return Path(folder)


def read_entries(path: Path, valid: Callable[[Any], bool]) -> dict[str, Any]:
    """The entries of the cache file ``path`` whose value is ``valid``; none if it is unreadable or not an object."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {key: value for key, value in entries.items() if valid(value)}


def merge_entries(path: Path, entries: dict[str, Any], valid: Callable[[Any], bool]) -> None:
    """Write ``entries`` into the cache file ``path``, over the valid ones it holds now; a warning if it cannot."""
    merged = read_entries(path, valid) | entries
    try:
        write_atomically(path, lambda file: file.write(json.dumps(merged, indent=1, sort_keys=True).encode()))
    except OSError as error:
        print(f"warning: cache not written to {path}: {error}")
