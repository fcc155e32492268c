"""Smoke check of every peer quantizer (bench/peers.py) on a tiny denoiser on the GPU.

    python bench/gpu_check_peers.py            # tiny UNet2DModel
    python bench/gpu_check_peers.py --all      # + UNet2DConditionModel and DiT

Prints, per peer, the layers quantized / skipped and the error of the noise estimate against
the FP model (relative L2 and max |diff| / max |FP|); an unavailable peer prints why. Exits 0
unless the FP model itself fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import PEERS, PeerUnavailable, apply_peer, cast_floating, count_layers, peer_versions  # noqa: E402

from dmquant.denoiser import Denoiser  # noqa: E402
from dmquant.zoo import tiny  # noqa: E402


def batch(model: torch.nn.Module, seed: int, device: str, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A random (x_t, t, cond) batch for one of the tiny models."""
    g = torch.Generator().manual_seed(seed)
    d = Denoiser(model)
    side = d.sample_size
    x = torch.randn(size, d.in_channels, side, side, generator=g)
    t = torch.randint(0, 1000, (size,), generator=g)
    if d.kind == "unet2d_condition":
        cond = {"encoder_hidden_states": torch.randn(size, 7, tiny.TINY_TEXT_DIM, generator=g)}
    else:
        cond = {"class_labels": torch.randint(0, tiny.TINY_NUM_CLASSES, (size,), generator=g)}
    return x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()}


def check(builder, device: str) -> None:
    model = builder().to(device)
    calibration = [batch(model, seed, device) for seed in range(1, 5)]
    x, t, cond = batch(model, 0, device)
    with torch.no_grad():
        reference = Denoiser(model)(x, t, cond).float()
    print(f"\n== {type(model).__name__}: {count_layers(model)} on {device}")

    def calibrate(quantized: torch.nn.Module) -> None:
        denoiser, dtype = Denoiser(quantized), next(quantized.parameters()).dtype
        with torch.no_grad():
            for xs, ts, cs in calibration:
                denoiser(xs.to(dtype), ts, cast_floating(cs, dtype))

    for name, spec in PEERS.items():
        try:
            result = apply_peer(name, model, calibrate)
            with torch.no_grad():
                out = Denoiser(result.model)(cast_floating(x, result.dtype), t, cast_floating(cond, result.dtype))
        except PeerUnavailable as why:
            print(f"{name:26s} unavailable: {why}")
            continue
        except Exception as error:  # report and go on: this script surveys, it does not stop at one peer
            print(f"{name:26s} FAILED: {type(error).__name__}: {error}")
            continue
        diff = out.float() - reference
        rel_l2 = (diff.norm() / reference.norm()).item()
        rel_max = (diff.abs().max() / reference.abs().max()).item()
        print(
            f"{name:26s} {spec.bits:6s} {result.compute_dtype:9s} quantized={result.quantized} "
            f"skipped={result.skipped} rel_l2={rel_l2:.4f} rel_max={rel_max:.4f}"
        )
        for note in result.notes:
            print(f"{'':28s}- {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also the cross-attention UNet and the DiT")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; peers: {peer_versions()}")
    builders = [tiny.tiny_unet2d]
    if args.all:
        builders += [tiny.tiny_unet2d_condition, tiny.tiny_dit]
    for builder in builders:
        check(builder, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
