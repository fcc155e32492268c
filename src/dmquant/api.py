"""The public entry points: ``quantize``, ``save``, ``load``, and the sampling hooks a quantized model needs."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from . import __version__
from .calib.record import CalibrationSet, record_for, record_forward_loop
from .checkpoint import CONFIG_FILE, MANIFEST_FILE, read_checkpoint, restore_weights, state_for_saving, write_checkpoint
from .config import (
    CorrectionConfig,
    QuantConfig,
    load_recipe,
)
from .core.attach import QuantReport
from .core.quantizer import STEPS_DRIVEN, Quantizer, quantizers
from .correct.statistics import NoiseStatistics
from .correct.step import NoiseCorrection
from .denoiser import Denoiser
from .errors import CalibrationError, CheckpointError, ConfigError, ModelError
from .manifest import CODES_PER_BYTE
from .models import DiffusionModel
from .offload import offload_for, refuse_unoffloaded_probes, running
from .passes import attach_recorded
from .recipe_passes import (
    NOISE_STATISTICS,
    PASSES,
    QuantizationRun,
    StepSelector,
    noise_statistics,
    step_selector,
    wanted_passes,
)
from .sampling import Conditioning, StepHook

INFO_ATTRIBUTE = "dmquant_info"


@dataclass
class QuantizationInfo:
    """What ``quantize`` did to a model; kept on it as ``model.dmquant_info`` and saved with it."""

    config: QuantConfig
    report: QuantReport
    splits: dict[str, int]
    num_steps: int
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def info(model: nn.Module) -> QuantizationInfo:
    """The quantization info of a model returned by :func:`quantize` or :func:`load`."""
    found = getattr(model, INFO_ATTRIBUTE, None)
    if found is None:
        raise ModelError("this model was not quantized by dmquant (no dmquant_info)")
    return found


def quantize(
    model: nn.Module | DiffusionModel,
    config: QuantConfig | str | Path,
    calibration: CalibrationSet | Callable[[nn.Module], Any] | None = None,
    *,
    inplace: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    source: str | None = None,
    state_dir: str | Path | None = None,
    offload: bool | str | torch.device | None = False,
) -> nn.Module | DiffusionModel:
    """Quantize ``model`` after training: the one interpreter of a recipe.

    ``model`` is a denoiser (``nn.Module``) or a :class:`~dmquant.models.DiffusionModel` (a denoiser with its
    sampler and conditioning, as :func:`dmquant.models.load_model` gives), which is returned with its denoiser
    quantized. ``config`` is a :class:`~dmquant.config.QuantConfig` or a recipe name/path; ``calibration``
    holds (x_t, t, conditioning) recorded from the FP model's own trajectories (see
    :func:`dmquant.calib.record_calibration`), or is a ``forward_loop(model)`` that runs the model on
    representative inputs — e.g. ``lambda unet: pipe(prompts, num_inference_steps=20)`` with ``pipe.unet``
    being ``model`` — whose calls are recorded (:func:`dmquant.calib.record.record_forward_loop`); left out, a
    DiffusionModel's own trajectories are recorded as ``config.calibration`` says.

    The passes of :data:`~dmquant.recipe_passes.PASSES` then run in order, each when its config section
    asks for it: plan (the switch step of a bit schedule, the most sensitive layers to smooth, hybrid
    precision's promotions —
    these sample with the model, so they need a DiffusionModel), attach quantizers, smooth, set ranges,
    reconstruct (with ``state_dir`` a killed run resumes from the last finished block when called again
    with the same arguments), measure PTQD's noise statistics (a bare denoiser's are measured by
    :func:`measure_noise`). ``batch_size`` rows run per forward pass while calibrating (default: the
    recipe's ``calibration.batch_size`` for a DiffusionModel, else 32).

    ``offload`` (``True``: this process's GPU; or a device) keeps the weights of a denoiser given on the CPU in
    host memory and runs one block at a time on that device (:mod:`dmquant.offload`) while calibration is
    recorded (a DiffusionModel's own trajectories, or a forward loop), ranges are set and blocks reconstructed:
    for models larger than the GPU; the same result, the quantized model returned on the CPU. The passes that
    sample with a DiffusionModel (planners, PTQD's noise statistics) are refused with it
    (:func:`dmquant.offload.refuse_unoffloaded_probes`).
    Returns the quantized model (a copy unless ``inplace``), with ``model.dmquant_info``.
    """
    started = time.perf_counter()
    if isinstance(config, (str, Path)):
        config = load_recipe(config)
    bundle = model if isinstance(model, DiffusionModel) else None
    denoiser = bundle.denoiser if bundle is not None else model
    planned = [p.asks for p in wanted_passes(config) if p.samples and not p.deferrable]
    if bundle is None and planned:
        raise ConfigError(
            f"recipe {config.name!r} uses {planned}, which sample with the model: "
            f"pass a DiffusionModel (dmquant.models.load_model), not a {type(denoiser).__name__} alone"
        )
    refuse_unfused_adapters(denoiser, "quantizing it")
    place = offload_for(offload, denoiser)
    if place is not None and bundle is not None:  # a denoiser alone runs no pass that samples
        refuse_unoffloaded_probes(config)
    if calibration is None:
        if bundle is None:
            raise CalibrationError("calibration: a denoiser alone needs a CalibrationSet or a forward_loop(model)")
        with running(place, denoiser):
            calibration = record_for(bundle, config.calibration, progress=progress)
    elif not isinstance(calibration, CalibrationSet):
        if not callable(calibration):
            raise CalibrationError(
                f"calibration: expected a CalibrationSet or a forward_loop(model), got {type(calibration).__name__}"
            )
        with running(place, denoiser):
            calibration = record_forward_loop(denoiser, calibration)
    elif len(calibration) > 0:  # a recorded forward loop holds what the model itself was fed: it fits
        calibration.check_fits(Denoiser(denoiser))
    if len(calibration) == 0:
        raise CalibrationError("the calibration set is empty: record at least one sample")
    if batch_size is None:
        batch_size = config.calibration.batch_size if bundle is not None else 32
    if bundle is not None and source is None:
        source = bundle.source or bundle.name
    copy_fp = config.reconstruction.enabled or (inplace and config.correction.enabled)
    run = QuantizationRun(
        fp_model=copy.deepcopy(denoiser).eval() if copy_fp else denoiser,
        model=(denoiser if inplace else copy.deepcopy(denoiser)).eval(),
        sampler=bundle,
        config=config,
        calibration=calibration,
        batch_size=batch_size,
        progress=progress,
        state_dir=state_dir,
        offload=place,
    )
    for quantization_pass in PASSES:  # planners may change the recipe: each pass reads it when its turn comes
        if quantization_pass.wanted(run.config):
            quantization_pass.run(run)
    run.extra.update(
        {"calibration_samples": len(calibration), "calibration_seconds": round(time.perf_counter() - started, 2)}
    )
    attached = run.attached
    quant = QuantizationInfo(run.config, attached.report, attached.splits, attached.num_steps, source, run.extra)
    mark_quantized(run.model, quant)
    return bundle.with_denoiser(run.model) if bundle is not None else run.model


def mark_quantized(model: nn.Module, quant: QuantizationInfo) -> None:
    """Keep ``quant`` on ``model`` as ``model.dmquant_info``, and make the model refuse what would silently
    lose its quantization.

    * A model with per-step parts (per-step ranges, a bit schedule, PTQD's corrections) refuses to run until
      something drives its steps — :func:`sampling_hooks` in dmquant's loop, :func:`dmquant.hook_pipeline`
      inside a diffusers pipeline, or :func:`~dmquant.core.quantizer.set_step` — instead of running every
      step with step 0's parameters. The check reads one attribute per call.
    * ``model.save_pretrained`` (what ``pipe.save_pretrained`` calls) raises: diffusers would write the
      float weights without the quantization; :func:`save` and :func:`dmquant.save_pipeline` keep it.
    * ``model.load_lora_adapter`` and ``model.fuse_lora`` (what ``pipe.load_lora_weights`` and
      ``pipe.fuse_lora`` call) raise: LoRA is fused into the full-precision model before quantizing.
    """
    setattr(model, INFO_ATTRIBUTE, quant)
    model.__dict__[STEPS_DRIVEN] = False
    if not any(hook is _refuse_undriven for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_refuse_undriven)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _refuse_save_pretrained
    for method in ("load_lora_adapter", "fuse_lora"):
        if hasattr(model, method):
            setattr(model, method, _refuse_lora)


def unfused_adapters(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that carry LoRA adapters not fused into their weights: PEFT's tuner
    layers (``lora_A`` / ``lora_B``, also once merged but not unloaded) and diffusers' LoRA-compatible layers."""
    return [
        name
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") or getattr(module, "lora_layer", None) is not None
    ]


def refuse_unfused_adapters(model: nn.Module, action: str) -> None:
    """Raise :class:`ModelError` when ``model`` carries unfused LoRA adapters: quantizing or saving them
    would quantize the adapters apart from the weights they add to, and the checkpoint would not load."""
    names = unfused_adapters(model)
    if names:
        raise ModelError(
            f"{type(model).__name__} carries LoRA adapters not fused into its weights ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); fuse them before {action}: pipe.fuse_lora() then "
            "pipe.unload_lora_weights() (or model.fuse_lora() then model.unload_lora()), then quantize"
        )


def _refuse_lora(*args: Any, **kwargs: Any) -> None:
    raise ModelError(
        "LoRA cannot be loaded or fused into a quantized model: its calibrated ranges and weight codes were "
        "made for the weights without it. Fuse the LoRA into the full-precision model, then quantize that"
    )


def _refuse_undriven(model: nn.Module, args: tuple) -> None:
    if model.__dict__.get(STEPS_DRIVEN, True) or required_steps(model) is None:
        return
    raise ModelError(
        f"this quantized {type(model).__name__} has per-step parts (recipe {info(model).config.name!r}) and "
        "nothing selects its sampling step: in a diffusers pipeline use dmquant.load_pipeline, or call "
        "dmquant.hook_pipeline(pipe) after setting the model on it; in dmquant.sampling.sample pass "
        "hooks=dmquant.sampling_hooks(model); in a loop of your own call "
        "dmquant.core.quantizer.set_step(model, step_index) before each step"
    )


def _refuse_save_pretrained(*args: Any, **kwargs: Any) -> None:
    raise ModelError(
        "save_pretrained would write this quantized model's float weights and drop its quantization: "
        "save a pipeline with dmquant.save_pipeline(pipe, directory), "
        "the model alone with dmquant.save(model, directory)"
    )


def required_steps(model: nn.Module) -> int | None:
    """The trajectory length a quantized model's per-step parts were made for (noise statistics,
    a bit schedule, per-step ranges), or ``None`` when it samples with any number of steps."""
    quant = getattr(model, INFO_ATTRIBUTE, None)
    if quant is None:
        return None
    if quant.config.correction.enabled and NOISE_STATISTICS in quant.extra:
        return int(quant.extra[NOISE_STATISTICS]["num_inference_steps"])
    if quant.config.step_precision.enabled:
        return quant.config.step_precision.num_inference_steps
    return quant.num_steps if quant.num_steps > 1 else None


def _range_hooks(model: nn.Module) -> list[StepSelector]:
    """A :class:`~dmquant.recipe_passes.StepSelector` for a quantized model with per-step parts
    (see :func:`~dmquant.recipe_passes.step_selector`)."""
    if required_steps(model) is None:
        return []
    quant = info(model)
    return [step_selector(quant.config, quant.num_steps, model)]


def sampling_hooks(model: nn.Module) -> list[StepHook]:
    """The step hooks that sampling with ``model`` needs (none for an FP model).

    Per-step activation ranges get a :class:`StepSelector`; a recipe with PTQD's correction gets
    a :class:`~dmquant.correct.step.NoiseCorrection` built from the statistics that
    :func:`measure_noise` kept on the model (an error if they were never measured).
    """
    quant = getattr(model, INFO_ATTRIBUTE, None)
    if quant is None:
        return []
    hooks = _range_hooks(model)
    correction = quant.config.correction
    if correction.enabled:
        if NOISE_STATISTICS not in quant.extra:
            raise ModelError(
                f"recipe {quant.config.name!r} corrects the quantization noise while sampling, but no noise "
                "statistics were measured for this model: run dmquant.measure_noise(model, fp_model, scheduler, ...)"
            )
        statistics = NoiseStatistics.from_json(quant.extra[NOISE_STATISTICS])
        hooks.append(
            NoiseCorrection(
                statistics, correlation=correction.correlation, bias=correction.bias, variance=correction.variance
            )
        )
    return hooks


def measure_noise(
    model: nn.Module,
    fp_model: nn.Module,
    scheduler: Any,
    conditioning: Callable[[int], Conditioning],
    *,
    config: CorrectionConfig | None = None,
    progress: bool = True,
) -> NoiseStatistics:
    """Measure PTQD's per-step noise statistics of quantized ``model`` against ``fp_model``; keep them on it.

    ``scheduler`` is the sampler the model will be used with (the statistics are per step of
    ``config.num_inference_steps``), ``conditioning(n)`` the conditioning of ``n`` samples with
    the guidance scale of sampling. ``config`` defaults to the recipe's ``correction`` section.
    The statistics are saved with the model by :func:`save`, and :func:`sampling_hooks` corrects
    with them. :func:`quantize` of a DiffusionModel measures them itself.
    """
    quant = info(model)
    config = config or quant.config.correction
    statistics = noise_statistics(
        model, fp_model, scheduler, conditioning, config, _range_hooks(model), progress=progress
    )
    quant.extra[NOISE_STATISTICS] = statistics.to_json()
    return statistics


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _base_description(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if isinstance(model, diffusers.ModelMixin) and config is not None:
        return {"library": "diffusers", "class": type(model).__name__, "config": _json_roundtrip(dict(config))}
    return {"library": None, "class": type(model).__name__, "config": None}


def save(model: nn.Module, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save a quantized model to ``directory`` (atomically; refuses an existing one unless ``overwrite``).

    A model carrying unfused LoRA adapters is refused (:func:`refuse_unfused_adapters`)."""
    quant = info(model)
    refuse_unfused_adapters(model, "saving it")
    tensors, layout = state_for_saving(model)
    manifest = {
        "dmquant_version": __version__,
        "torch_version": torch.__version__,
        "base": _base_description(model),
        "recipe": quant.config.to_dict(),
        "splits": quant.splits,
        "num_steps": quant.num_steps,
        "report": quant.report.rows(),
        "unmatched_rules": quant.report.unmatched_rules,
        "weight_codes": layout,
        "source": quant.source,
        "source_relative": _relative_source(quant.source, directory),
        "extra": quant.extra,
    }
    base = manifest["base"]
    files = {}
    if base["library"] == "diffusers":
        files[DIFFUSERS_CONFIG_FILE] = json.dumps(_diffusers_config(base, quant), indent=2, sort_keys=True)
    return write_checkpoint(directory, tensors, manifest, overwrite=overwrite, files=files)


#: The diffusers model config a checkpoint of a diffusers model carries beside its manifest.
DIFFUSERS_CONFIG_FILE = CONFIG_FILE


def _diffusers_config(base: dict[str, Any], quant: QuantizationInfo) -> dict[str, Any]:
    """The base model's diffusers config with a ``quantization_config`` naming dmquant.

    Tools that read a model folder's ``config.json`` (``ModelMixin.load_config``, hub viewers) see the
    architecture; ``from_pretrained`` of the folder stops at the quantization method it does not know rather
    than building the model from weights it cannot find. :func:`load` reads the manifest, not this file.
    """
    config = {key: value for key, value in base["config"].items() if not key.startswith("_")}
    return {
        "_class_name": base["class"],
        "_diffusers_version": diffusers.__version__,
        **config,
        "quantization_config": {"quant_method": "dmquant", "recipe": quant.config.name, "manifest": MANIFEST_FILE},
    }


def _relative_source(source: str | None, directory: str | Path) -> str | None:
    """The source model's path relative to the checkpoint, when the source is a directory: a checkpoint
    and its model moved together find each other again (see :func:`load`)."""
    if source is None or not Path(source).is_absolute():
        return None
    return os.path.relpath(source, Path(directory).absolute())


def _found_source(manifest: dict[str, Any], directory: Path) -> str | None:
    """The recorded source model, or where it is now relative to the checkpoint if it moved with it."""
    source, relative = manifest.get("source"), manifest.get("source_relative")
    if source is not None and relative is not None and not Path(source).exists():
        moved = (directory.absolute() / relative).resolve()
        if moved.exists():
            return str(moved)
    return source


def _architecture(config: Any) -> dict[str, Any]:
    """A diffusers config without its bookkeeping keys (``_name_or_path``, ``_diffusers_version``, ...): where
    and by which version a model was loaded says nothing about its architecture, and changes when it moves."""
    return {key: value for key, value in _json_roundtrip(dict(config)).items() if not key.startswith("_")}


def same_architecture(first: nn.Module, second: nn.Module) -> bool:
    """Both modules are of one class and, for diffusers models, of one configuration."""
    configs = [_architecture(getattr(module, "config", {})) for module in (first, second)]
    return type(first) is type(second) and configs[0] == configs[1]


def _build_base(manifest: dict[str, Any], model: nn.Module | None) -> nn.Module:
    base = manifest["base"]
    if model is not None:
        if type(model).__name__ != base["class"]:
            raise CheckpointError(
                f"the checkpoint is for a {base['class']}, the given model is a {type(model).__name__}"
            )
        given = _architecture(getattr(model, "config", {})) if base["config"] is not None else None
        expected = _architecture(base["config"]) if base["config"] is not None else None
        if given is not None and given != expected:
            diff = sorted(k for k in set(expected) | set(given) if given.get(k) != expected.get(k))
            raise CheckpointError(f"the checkpoint is for another {base['class']} configuration (differs in {diff})")
        return copy.deepcopy(model)
    if base["library"] != "diffusers":
        raise CheckpointError(
            f"the checkpoint's base model is a {base['class']}, not a diffusers model: "
            "pass an instance of it as load(directory, model=...)"
        )
    model_class = getattr(diffusers, base["class"])
    with _bounded_parameters(CODES_PER_BYTE * manifest["tensors_bytes"]), torch.device("meta"):
        _from_config(model_class, base["config"])  # sizes checked on the meta device, nothing allocated
    return _from_config(model_class, base["config"])


def _from_config(model_class: type, config: dict[str, Any]) -> nn.Module:
    try:
        return model_class.from_config(dict(config))
    except CheckpointError:
        raise
    except Exception as error:  # diffusers raises many types for a config it cannot build
        raise CheckpointError(
            f"dmquant.json: base.config: no {model_class.__name__} can be built from it ({error})"
        ) from None


@contextlib.contextmanager
def _bounded_parameters(limit: int) -> Iterator[None]:
    """Abort any module construction whose parameters and buffers exceed ``limit`` elements in total."""
    total = 0

    def count(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        nonlocal total
        total += 0 if tensor is None else tensor.numel()
        if total > limit:
            raise CheckpointError(
                f"dmquant.json: base.config: the model it describes has more than {limit} parameters, "
                "more than the tensor file holds"
            )

    hooks = [
        torch.nn.modules.module.register_module_parameter_registration_hook(count),
        torch.nn.modules.module.register_module_buffer_registration_hook(count),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _plausible_parameters(quantizer: Quantizer) -> bool:
    """One finite, positive scale set (and a zero point set of its shape) per parameter slot."""
    scale, zero_point = quantizer.scale, quantizer.zero_point
    return (
        scale.shape == zero_point.shape
        and scale.dim() >= 1
        and scale.shape[0] == len(quantizer.slot_formats)
        and bool(torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zero_point).all())
    )


def _check_splits(model: nn.Module, splits: dict[str, int]) -> None:
    """Each split names a Conv2d of ``model`` and a channel strictly inside its input."""
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    for name, channel in splits.items():
        if name not in convs or not 0 < channel < convs[name].in_channels:
            raise CheckpointError(f"dmquant.json: splits.{name}: {channel} is no input channel of a Conv2d there")


def load(directory: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model saved by :func:`save`; its outputs equal the saved model's bit for bit.

    Diffusers models are rebuilt from the stored config. Any other ``nn.Module`` must be
    passed as ``model`` (an instance of the same architecture; its weights are replaced).
    """
    tensors, manifest = read_checkpoint(directory)
    try:
        config = QuantConfig.from_dict(manifest["recipe"])
    except ConfigError as error:
        raise CheckpointError(f"dmquant.json: recipe.{error}") from None
    base = _build_base(manifest, model).eval()
    _check_splits(base, manifest["splits"])
    attach_recorded(base, config, manifest["splits"], manifest["num_steps"], warn=False)
    layout = manifest["weight_codes"]
    expected = set(base.state_dict())
    stored = (set(tensors) - set(layout)) | {entry["weight"] for entry in layout.values()}
    if expected != stored:
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        raise CheckpointError(
            f"{directory}: the checkpoint does not fit the {type(base).__name__} it names "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    state = {k: v for k, v in tensors.items() if k not in layout}
    expected_dtypes = {name: tensor.dtype for name, tensor in base.state_dict().items()}
    retyped = sorted(name for name, tensor in state.items() if tensor.dtype != expected_dtypes[name])
    if retyped:
        raise CheckpointError(f"{directory}: {retyped[0]} is stored as {state[retyped[0]].dtype}, not as the model's")
    try:
        base.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"{directory}: tensor shapes do not fit the architecture ({error})") from None
    restore_weights(base, tensors, layout)
    for quantizer in quantizers(base):
        # quantize() leaves every enabled quantizer calibrated; an empty scale marks one it disabled
        quantizer.enabled = quantizer.enabled and quantizer.calibrated
        if quantizer.calibrated and not _plausible_parameters(quantizer):
            raise CheckpointError(f"{directory}: {quantizer.name}: malformed scales or zero points")
    try:
        report = QuantReport.from_rows(manifest["report"], manifest.get("unmatched_rules", []))
    except TypeError as error:
        raise CheckpointError(f"dmquant.json: report: malformed layer rows ({error})") from None
    extra = manifest.get("extra", {})
    if NOISE_STATISTICS in extra:
        try:
            NoiseStatistics.from_json(extra[NOISE_STATISTICS])
        except CalibrationError as error:
            raise CheckpointError(f"dmquant.json: extra.{NOISE_STATISTICS}: {error}") from None
    mark_quantized(
        base,
        QuantizationInfo(
            config, report, manifest["splits"], manifest["num_steps"], _found_source(manifest, Path(directory)), extra
        ),
    )
    return base
