"""Reconstruction: learned weight rounding (AdaRound) and layer/block output reconstruction."""
