"""Reconstruction steps replayed from a CUDA graph: the same optimisation as the eager loop."""

from __future__ import annotations

import dataclasses
import gc
import warnings

import pytest
import torch
from reconstruction_settings import SMALL
from torch import nn

from dmquant import api
from dmquant.calib.record import record_for
from dmquant.config import ReconstructionConfig, load_recipe
from dmquant.denoiser import Denoiser
from dmquant.models import load_model
from dmquant.recon.brecq import _cosine_annealed
from dmquant.recon.graphed import ReplayedIteration


def test_cosine_annealing_is_torchs_schedule():
    base, iterations = 4e-5, 37
    scale = nn.Parameter(torch.ones(()))
    optimizer = torch.optim.Adam([scale], lr=base)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=0.0)
    for t in range(iterations):
        assert _cosine_annealed(base, t, iterations) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-20
        )
        optimizer.step()
        scheduler.step()


def test_off_cuda_every_step_runs_eagerly_with_plain_numbers():
    seen = []

    def step(batch, beta, weight):
        seen.append((beta, weight))
        return batch["x"].sum()

    iteration = ReplayedIteration(step, torch.device("cpu"))
    assert not iteration.graphed
    for t in range(5):
        assert iteration({"x": torch.full((3,), float(t))}, 20.0 - t, 1.0) == 3 * t
    assert seen == [(20.0 - t, 1.0) for t in range(5)]


# --------------------------------------------------------------------------------------
# On a GPU
# --------------------------------------------------------------------------------------


def _training(seed: int):
    """A small model, its capturable Adam, a device generator for a dropout mask, and the step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def step(batch, beta, weight):
        x, target = batch
        hidden = model[1](model[0](x))
        keep = torch.rand(hidden.shape, generator=generator, device="cuda") < 0.5
        output = model[2](torch.where(keep, hidden, hidden.detach()))
        loss = (output - target).pow(2).mean() + weight * model[0].weight.abs().pow(beta).sum() * 1e-4
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, generator, step


def _batches(count: int):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 16, generator=generator).cuda(), torch.randn(8, 8, generator=generator).cuda())
        for _ in range(count)
    ]


@pytest.mark.gpu
def test_a_replayed_step_repeats_the_eager_steps():
    batches = _batches(12)
    schedule = [(20.0 - t, float(t >= 4)) for t in range(12)]
    losses = {}
    models = {}
    for name, warmup in (("replayed", 3), ("eager", len(batches))):
        model, generator, step = _training(seed=0)
        iteration = ReplayedIteration(step, torch.device("cuda"), generators=[generator], warmup=warmup)
        losses[name] = [
            iteration(batch, beta, weight).clone() for batch, (beta, weight) in zip(batches, schedule, strict=True)
        ]
        models[name] = model
        assert iteration.graphed
    torch.testing.assert_close(torch.stack(losses["replayed"]), torch.stack(losses["eager"]), rtol=1e-5, atol=1e-6)
    for a, b in zip(models["replayed"].parameters(), models["eager"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_a_step_that_waits_for_the_host_runs_eagerly_with_a_warning():
    batches = _batches(6)
    results = {}
    for name in ("waits", "plain"):
        model, generator, step = _training(seed=0)

        def waiting(batch, beta, weight, step=step):
            loss = step(batch, beta, weight)
            float(loss)  # .item(): not allowed while capturing
            return loss

        iteration = ReplayedIteration(
            waiting if name == "waits" else step, torch.device("cuda"), generators=[generator]
        )
        if name == "waits":
            with pytest.warns(UserWarning, match="could not be captured"):
                results[name] = [float(iteration(b, 2.0, 1.0)) for b in batches]
            assert not iteration.graphed
        else:
            results[name] = [float(iteration(b, 2.0, 1.0)) for b in batches]
    assert results["waits"] == pytest.approx(results["plain"], rel=1e-5)


@pytest.mark.gpu
def test_one_iteration_after_another_leaves_no_memory_behind():
    """Reconstruction makes one replayed iteration per unit: once one is gone, the next leaves the GPU's allocated
    memory where it was (a side stream per iteration kept a cuBLAS workspace alive per unit, about 65 MiB each)."""
    batches = _batches(5)
    after = []
    for _ in range(4):
        model, generator, step = _training(seed=0)
        iteration = ReplayedIteration(step, torch.device("cuda"), generators=[generator], warmup=2)
        for batch in batches:
            iteration(batch, 2.0, 1.0)
        assert iteration.graphed
        del model, generator, step, iteration
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[1:] == after[:1] * 3, f"allocated bytes after each iteration: {after}"


@pytest.mark.gpu
def test_a_replayed_step_refuses_a_batch_of_another_shape():
    model, generator, step = _training(seed=0)
    iteration = ReplayedIteration(step, torch.device("cuda"), generators=[generator], warmup=1)
    batch = _batches(1)[0]
    iteration(batch, 2.0, 1.0)
    iteration(batch, 2.0, 1.0)  # captured
    with pytest.raises(ValueError, match="captured shapes"):
        iteration((batch[0][:4], batch[1][:4]), 2.0, 1.0)


RECONSTRUCTIONS = {
    "q-diffusion": {"activation_scales": "after"},
    "qdrop-joint": {"activation_scales": "jointly", "drop_probability": 0.5},
    "fbr": {"inner_loss_weight": 0.8},
}


@pytest.mark.gpu
@pytest.mark.parametrize("reconstruction", sorted(RECONSTRUCTIONS))
@pytest.mark.parametrize("name", ["tiny-unet", "tiny-unet-text", "tiny-dit"])
def test_model_reconstruction_on_cuda_graphs_matches_the_eager_loop(name, reconstruction):
    """Every unit of the three families captures (no fallback warning), and the result is the eager one's."""
    model = load_model(name)
    calibration = record_for(model, SMALL, progress=False)
    denoiser = model.denoiser.cuda()
    x, t, cond, _ = next(calibration.to("cuda").batches(len(calibration)))
    with torch.no_grad():
        reference = Denoiser(denoiser)(x, t, cond)
    errors, records = {}, {}
    for graphs in (True, False):
        options = RECONSTRUCTIONS[reconstruction] | {"cuda_graphs": graphs}
        config = dataclasses.replace(
            load_recipe("minmax").with_bits(4, 8),
            reconstruction=ReconstructionConfig(
                enabled=True, num_samples=16, iterations=30, activation_iterations=12, batch_size=8, **options
            ),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantized = api.quantize(denoiser, config, calibration, progress=False)
        assert not [w for w in caught if "could not be captured" in str(w.message)]
        with torch.no_grad():
            errors[graphs] = float((Denoiser(quantized)(x, t, cond) - reference).pow(2).mean())
        records[graphs] = api.info(quantized).extra["reconstruction"]
    # the two differ only in floating-point order (capturable Adam), and a rounding decided differently
    # moves the later units' inputs a little: the first unit starts alike, every unit ends close, and the
    # quantized models are as far from the FP model
    assert [r["unit"] for r in records[True]] == [r["unit"] for r in records[False]]
    assert records[True][0]["initial_mse"] == pytest.approx(records[False][0]["initial_mse"], rel=1e-6)
    for graph, eager in zip(records[True], records[False], strict=True):
        assert graph["final_mse"] == pytest.approx(eager["final_mse"], rel=0.05, abs=1e-7)
    assert errors[True] == pytest.approx(errors[False], rel=0.05)
