"""Tensors as one safetensors file, written atomically: the writer of the safetensors files dmquant makes by
hand (a training run's state, reconstruction progress per unit).

A checkpoint's tensor file is written by :mod:`dmquant.checkpoint` into its staged directory, and a zoo export
by the library's ``save_file``/``save_pretrained``; reading is the library's ``load_file``/``safe_open``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from safetensors.torch import save
from torch import Tensor

from .atomic import write_atomically


def write_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], *, metadata: dict[str, str] | None = None
) -> bytes:
    """Write ``tensors`` (detached, on the CPU, contiguous) and ``metadata`` to one safetensors file at ``path``,
    atomically (:func:`~dmquant.atomic.write_atomically`); returns the file's bytes (for a checksum)."""
    data = save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, metadata=metadata)
    write_atomically(path, lambda file: file.write(data))
    return data
