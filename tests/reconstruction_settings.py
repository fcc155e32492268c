"""Small calibration and reconstruction settings the reconstruction tests share (tiny models, seconds per run)."""

import dataclasses

from dmquant.config import CalibrationConfig, QuantConfig, ReconstructionConfig, load_recipe

SMALL = CalibrationConfig(num_inference_steps=4, num_trajectories=4, batch_size=4)
FAST = ReconstructionConfig(enabled=True, num_samples=16, iterations=12, activation_iterations=6, batch_size=8)


def reconstruction_config(**reconstruction) -> QuantConfig:
    """minmax at W4A8 with :data:`FAST` reconstruction, ``reconstruction`` overriding its fields."""
    return dataclasses.replace(
        load_recipe("minmax").with_bits(4, 8), reconstruction=dataclasses.replace(FAST, **reconstruction)
    )
