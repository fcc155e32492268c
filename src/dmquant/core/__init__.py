"""Quantization core: pure arithmetic (``primitives``) and range estimation (``observers``)."""
