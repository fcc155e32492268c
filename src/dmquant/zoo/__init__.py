"""Reference models and datasets that ship with dmquant."""

from pathlib import Path

#: Where the shipped reference networks live, one directory per network.
WEIGHTS_DIR = Path(__file__).parent / "weights"
