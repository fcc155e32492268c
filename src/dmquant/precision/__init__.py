"""Precision allocation: which bits where (per sampling step; later per block and module)."""
