"""A verdict per quantized setting: is it within full precision's own seed-to-seed spread, on which metric,
and what to try next.

Full precision sampled from other seeds differs from itself: that difference is the spread a quality metric
has at this sample count, and a quantized setting whose metric moved less than it is indistinguishable from
full precision by that metric. Only metrics of the samples' distribution have such a spread (class accuracy,
FID-proxies: measured on the zoo's glyph models); PSNR/SSIM against the FP samples of the same seeds do not,
so a model without them gets a verdict that says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Seeds of the "FP, other seeds" run start this far from the compared run's.
OTHER_SEEDS_OFFSET = 10_000
#: Setting name of the FP run from other seeds in tables.
OTHER_SEEDS = "FP (other seeds)"
#: Metrics with a seed spread, in the order they are reported, each with the sign of "better" (+1: higher).
SPREAD_METRICS = {"class accuracy": +1, "FID-proxy": -1}
#: Recipes that already reconstruct blocks (so reconstruction is not the next thing to suggest).
RECONSTRUCTING = frozenset({"q-diffusion", "ptq4dm", "eda-dm", "ptqd", "ptqd-mixed"})


@dataclass(frozen=True)
class Verdict:
    """Whether ``setting`` is within the FP seed spread (``None``: no metric with a spread), why, and what next."""

    setting: str
    within: bool | None
    detail: str
    next_step: str

    def line(self) -> str:
        verdict = {True: "within the FP seed spread", False: "outside the FP seed spread", None: "no seed spread"}
        return f"{self.setting}: {verdict[self.within]} — {self.detail}. Next: {self.next_step}"


def _next_step(within: bool | None, recipe: str) -> str:
    if within:
        return (
            "try fewer bits, or run it on real low-bit kernels (`dmquant convert CHECKPOINT --device cuda`, "
            "then `--real-kernels` in sample/eval)"
        )
    if within is None:
        return (
            "look at the samples side by side; `dmquant analyze` ranks the blocks and layers that make the "
            "quantization noise"
        )
    if recipe not in RECONSTRUCTING:
        return (
            "reconstruct the blocks (`--recipe q-diffusion`), or keep the blocks `dmquant analyze` ranks most "
            "sensitive at 8 bits (`--recipe sqnr-hybrid`)"
        )
    return (
        "correct the quantization noise while sampling (`--recipe ptqd`), record more calibration data "
        "(`--calib-trajectories`), or keep the most sensitive blocks at 8 bits (`--recipe sqnr-hybrid`)"
    )


def judge(
    setting: str,
    row: Mapping[str, float],
    fp: Mapping[str, float],
    fp_other_seeds: Mapping[str, float] | None,
    *,
    recipe: str = "",
) -> Verdict:
    """The verdict of quantized ``row`` against ``fp`` (same seeds) and ``fp_other_seeds`` (the spread).

    ``within`` holds when, on every metric of :data:`SPREAD_METRICS` measured, the quantized value is no
    worse than FP's by more than FP from other seeds differs from FP (one draw of the spread: a setting
    better than FP is within); ``detail`` names the metric that decided.
    """
    metrics = [m for m in SPREAD_METRICS if fp_other_seeds and m in row and m in fp and m in fp_other_seeds]
    if not metrics:
        detail = (
            f"PSNR {row.get('PSNR vs FP (dB)', float('nan')):.1f} dB against the FP samples of the same seeds; "
            "this model has no quality metric with a seed spread (the zoo's glyph models have class accuracy "
            "and FID-proxies)"
        )
        return Verdict(setting, None, detail, _next_step(None, recipe))
    parts, outside = [], []
    for metric in metrics:
        loss = SPREAD_METRICS[metric] * (fp[metric] - row[metric])
        spread = abs(fp_other_seeds[metric] - fp[metric])
        parts.append(f"{metric} {row[metric]:.3g} vs FP {fp[metric]:.3g} (seed spread {spread:.3g})")
        if loss > spread:
            outside.append(metric)
    within = not outside
    detail = ("on " + " and ".join(metrics) if within else "on " + " and ".join(outside)) + ": " + "; ".join(parts)
    return Verdict(setting, within, detail, _next_step(within, recipe))
