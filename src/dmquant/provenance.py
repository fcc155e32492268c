"""Where and with what a result was made: device, library versions and date, for every record we write."""

from __future__ import annotations

import platform
from datetime import datetime, timezone

import torch


def environment() -> dict[str, str]:
    """Device, torch / diffusers / Python versions and today's UTC date."""
    import diffusers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
