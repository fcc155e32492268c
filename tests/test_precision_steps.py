"""Step-aware mixed precision: per-step formats in one quantizer, the schedule, its switch, its cost."""

import dataclasses

import pytest
import torch

from dmquant import api
from dmquant.calib.record import record_for
from dmquant.config import CalibrationConfig, QuantizerConfig, StepPrecisionConfig, load_recipe
from dmquant.core.quantizer import Quantizer, set_step
from dmquant.denoiser import Denoiser
from dmquant.errors import CalibrationError, ConfigError
from dmquant.jobs import forward_cost
from dmquant.models import load_model
from dmquant.precision.step_schedule import choose_switch_step, scheduled_quantizers
from dmquant.sampling import Conditioning, sample

A8 = QuantizerConfig(bits=8, symmetric=False, granularity="tensor", observer="minmax")


def test_a_quantizer_switches_format_and_range_with_the_step():
    quantizer = Quantizer(A8)
    formats = [A8.with_bits(4).format] * 3 + [A8.format] * 2
    quantizer.schedule_formats(formats)
    assert quantizer.num_steps == 2 and quantizer.step_slots == [0, 0, 0, 1, 1]
    x = torch.linspace(-1, 1, 1001)
    quantizer.observing = True
    for step in (0, 4):  # steps 1-3 see no data: they share their slot's range
        quantizer.step = step
        quantizer(x * (step + 1))
    quantizer.finalize()
    quantizer.step = 1
    assert quantizer.bits == 4 and quantizer(x).unique().numel() <= 16
    quantizer.step = 3
    assert quantizer.bits == 8 and quantizer(x * 5).unique().numel() > 200
    assert quantizer.scale[1] == pytest.approx(10 / 255)  # the step-4 range [-5, 5] on 8 bits
    assert "bits by step uint4/uint8" in repr(quantizer)


def test_a_compiled_scheduled_quantizer_compiles_once_per_parameter_set_not_per_step():
    """Switching precision by step replays the graph of the step's parameter set: torch.compile specialises on the
    set, so 10 steps of an A4-early / A8-late schedule compile 2 graphs (not one per step, past the recompile
    limit, after which the steps would run eagerly)."""
    quantizer = Quantizer(A8)
    quantizer.schedule_formats([A8.with_bits(4).format] * 3 + [A8.format] * 7)
    x = torch.linspace(-1, 1, 1001)
    quantizer.observing = True
    for step in range(10):
        set_step(quantizer, step)
        quantizer(x * (step + 1))
    quantizer.finalize()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(quantizer, backend=counting_backend)
    for step in range(10):
        set_step(quantizer, step)
        torch.testing.assert_close(compiled(x), quantizer(x), rtol=0, atol=0)
    assert len(graphs) == 2


def test_per_step_ranges_and_a_schedule_do_not_combine():
    with pytest.raises(CalibrationError, match="do not combine"):
        Quantizer(A8, num_steps=5).schedule_formats([A8.format] * 5)


@pytest.mark.parametrize(
    ("sqnr", "switch"),
    [([30, 25, 18, 22, 15, 12], 4), ([30, 25, 24], 3), ([10, 9, 8], 0), ([25, 19, 21], 3), ([], 0)],
)
def test_the_switch_is_where_the_sqnr_stays_below_the_threshold(sqnr, switch):
    assert choose_switch_step(sqnr, 20.0) == switch


def test_schedule_config():
    schedule = StepPrecisionConfig(enabled=True, num_inference_steps=5, late_bits=8, switch_step=3)
    assert schedule.bits_by_step(4) == [4, 4, 4, 8, 8]
    with pytest.raises(ConfigError, match="switch_step"):
        StepPrecisionConfig(num_inference_steps=5, switch_step=6)
    with pytest.raises(ConfigError, match="not chosen yet"):
        StepPrecisionConfig(enabled=True).bits_by_step(4)
    with pytest.raises(ConfigError, match="per_step_activations"):
        dataclasses.replace(load_recipe("minmax"), step_precision=schedule, per_step_activations=True)


@pytest.fixture(scope="module")
def unet():
    return load_model("tiny-unet")


@pytest.fixture(scope="module")
def calibration(unet):
    return record_for(unet, CalibrationConfig(num_inference_steps=4, num_trajectories=4), progress=False)


def _mixed_config(switch_step=2):
    config = load_recipe("minmax").with_bits(4, 4)
    config = dataclasses.replace(
        config,
        step_precision=StepPrecisionConfig(enabled=True, num_inference_steps=4, late_bits=8, switch_step=switch_step),
    )
    return config


def _labels(n):
    return Conditioning.classes(torch.arange(n) % 4)


def test_a4_early_a8_late_on_a_unet(unet, calibration, tmp_path):
    config = _mixed_config()
    mixed = api.quantize(unet.denoiser, config, calibration, progress=False)
    uniform = api.quantize(unet.denoiser, load_recipe("minmax").with_bits(4, 4), calibration, progress=False)
    scheduled = scheduled_quantizers(mixed, config)
    assert scheduled and all(q.step_slots == [0, 0, 1, 1] for q in scheduled)
    assert mixed.conv_in.input_quantizer.step_slots is None  # fixed at 8 bits by a rule
    assert all(m.probs.step_slots is None for m in mixed.modules() if hasattr(m, "probs"))
    x, t, cond, _ = next(calibration.batches(8))
    with torch.no_grad():
        fp = Denoiser(unet.denoiser)(x, t, cond)

        def error(model, step):
            set_step(model, step)
            return (Denoiser(model)(x, t, cond) - fp).pow(2).mean().item()

        assert error(mixed, 0) == pytest.approx(error(uniform, 0), rel=0.3)
        assert error(mixed, 3) < 0.5 * error(uniform, 3)
    set_step(mixed, 0)

    api.save(mixed, tmp_path / "mixed")
    loaded = api.load(tmp_path / "mixed")
    for step in (0, 3):
        set_step(mixed, step)
        set_step(loaded, step)
        with torch.no_grad():
            assert torch.equal(Denoiser(loaded)(x, t, cond), Denoiser(mixed)(x, t, cond))

    def draw(steps):
        return sample(
            loaded,
            unet.scheduler,
            batch_size=2,
            num_inference_steps=steps,
            conditioning=_labels(2),
            generator=torch.Generator().manual_seed(0),
            hooks=api.sampling_hooks(loaded),
            progress=False,
        )

    assert torch.isfinite(draw(4)).all()
    with pytest.raises(CalibrationError, match="sample with 4 steps"):
        draw(3)

    cost = forward_cost(unet.with_denoiser(mixed), _labels(1), 4)
    uniform_cost = forward_cost(unet.with_denoiser(uniform), _labels(1), 4)
    assert uniform_cost["bops"] < cost["bops"] < 2 * uniform_cost["bops"]
    assert cost["trajectory_bops"] == pytest.approx(4 * cost["bops"])


def test_the_switch_is_chosen_from_the_measured_sqnr_when_not_given(unet):
    config = _mixed_config(switch_step=None)
    config = dataclasses.replace(config, calibration=CalibrationConfig(num_inference_steps=4, num_trajectories=2))
    config = dataclasses.replace(
        config, step_precision=dataclasses.replace(config.step_precision, snr_threshold_db=1000.0)
    )  # unreachable: every step counts as late
    quantized = api.quantize(unet, config, progress=False)
    assert api.info(quantized.denoiser).config.step_precision.switch_step == 0
