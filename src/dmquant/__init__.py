"""dmquant: post-training quantization for diffusion models.

The public entry points are :func:`quantize`, :func:`save`, :func:`load`, :func:`info` and
:func:`sampling_hooks`, :func:`measure_noise` (from :mod:`dmquant.api`), and for diffusers pipelines
:func:`quantize_pipeline`, :func:`save_pipeline`, :func:`load_pipeline`, :func:`hook_pipeline` (from
:mod:`dmquant.pipelines`); they are imported on first use so that ``import dmquant.core.primitives`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = ("quantize", "save", "load", "info", "sampling_hooks", "measure_noise", "QuantizationInfo")
_PIPELINES = ("quantize_pipeline", "save_pipeline", "load_pipeline", "hook_pipeline")
_CONFIG = (
    "QuantConfig",
    "QuantizerConfig",
    "AttentionConfig",
    "CalibrationConfig",
    "ReconstructionConfig",
    "CorrectionConfig",
    "LayerRule",
    "load_recipe",
)

__all__ = [*_API, *_PIPELINES, *_CONFIG, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _PIPELINES:
        return getattr(importlib.import_module(".pipelines", __name__), name)
    if name in _CONFIG:
        return getattr(importlib.import_module(".config", __name__), name)
    raise AttributeError(f"module 'dmquant' has no attribute {name!r}")
