"""Precision allocation and its analysis: SQNR sensitivity, hybrid precision per block, step-aware
bit schedules, SmoothQuant."""
