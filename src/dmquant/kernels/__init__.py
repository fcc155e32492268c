"""Real low-bit execution of quantized layers.

The integer-domain reference the GPU kernels are tested against (what a W8A8 / W4A8 integer kernel
computes from the codes and scales of a calibrated layer, on any device) is ``tests/integer_reference.py``.
"""
