"""Real low-bit execution of quantized layers.

``integer.py`` is the integer-domain reference: what a W8A8 / W4A8 integer kernel computes from
the codes and scales of a calibrated layer, on any device, against which GPU kernels are tested.
"""
