"""Verdicts: within full precision's seed-to-seed spread or not, on which metric, and the next step."""

from __future__ import annotations

from dmquant.verdict import judge

FP = {"class accuracy": 0.90, "FID-proxy": 10.0}
OTHER_SEEDS = {"class accuracy": 0.88, "FID-proxy": 11.0}  # spread: 0.02 and 1.0


def test_a_setting_that_moved_less_than_fp_across_seeds_is_within():
    verdict = judge("W8A8", {"class accuracy": 0.89, "FID-proxy": 10.5}, FP, OTHER_SEEDS, recipe="mse")
    assert verdict.within is True
    assert "class accuracy and FID-proxy" in verdict.detail and "seed spread 0.02" in verdict.detail
    assert "dmquant convert" in verdict.next_step
    better = judge("W8A8", {"class accuracy": 0.95, "FID-proxy": 8.0}, FP, OTHER_SEEDS)
    assert better.within is True  # better than FP by more than the spread is no loss


def test_the_metric_that_left_the_spread_is_named_and_the_next_step_fits_the_recipe():
    row = {"class accuracy": 0.89, "FID-proxy": 14.0}
    verdict = judge("W4A8", row, FP, OTHER_SEEDS, recipe="mse")
    assert verdict.within is False and verdict.detail.startswith("on FID-proxy:")
    assert "q-diffusion" in verdict.next_step  # reconstruction first
    assert "ptqd" in judge("W4A8", row, FP, OTHER_SEEDS, recipe="q-diffusion").next_step
    assert verdict.line().startswith("W4A8: outside the FP seed spread — on FID-proxy")


def test_without_a_metric_that_has_a_seed_spread_the_verdict_says_so():
    verdict = judge("W8A8", {"PSNR vs FP (dB)": 31.5}, {}, None)
    assert verdict.within is None and "PSNR 31.5 dB" in verdict.detail and "no quality metric" in verdict.detail
