"""PTQD's corrections of the quantization noise in the noise estimate: statistics and the corrected step."""
