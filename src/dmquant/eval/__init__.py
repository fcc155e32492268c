"""Evaluation of quantized diffusion models against their full-precision originals."""
