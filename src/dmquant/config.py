"""Quantization configs as dataclasses, and recipes (YAML/TOML files) that fill them.

A recipe is validated at the boundary: an unknown key or an impossible value raises
:class:`~dmquant.errors.ConfigError` naming the key by its full path (``weight.bits``) and,
for unknown keys, the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import yaml

from .calib.strategies import get_strategy
from .catalog import RECIPES_DIR, available_recipes
from .core.observers import OBSERVERS
from .core.primitives import FloatFormat, Granularity, IntFormat, QFormat, parse_format
from .errors import ConfigError


@dataclass(frozen=True)
class QuantizerConfig:
    """How one kind of tensor (weights, activations) is quantized.

    ``bits`` is an integer bit width (2–8 or 16) or a float format name (``fp8_e4m3``,
    ``fp8_e5m2``, ``fp4_e2m1``). Asymmetric integer quantizers use unsigned codes with a zero
    point; symmetric ones signed codes, unless ``unsigned`` (for non-negative tensors such as
    a softmax output). The observer options apply to the observer that uses them: ``p``,
    ``num_candidates`` (mse), ``percentile`` (percentile), ``momentum`` (ema),
    ``max_elements`` (the subsample kept by mse and percentile).
    """

    bits: int | str = 8
    symmetric: bool = True
    unsigned: bool = False
    granularity: str = "tensor"
    observer: str = "minmax"
    p: float = 2.0
    num_candidates: int = 80
    percentile: float = 99.99
    momentum: float = 0.9
    max_elements: int = 2**18
    enabled: bool = True

    def __post_init__(self) -> None:
        fmt = _keyed("bits", lambda: self.format)
        _keyed("granularity", lambda: self.granularity_spec)
        if fmt.is_float and not self.symmetric:
            raise ConfigError(f"symmetric: float format {fmt.name} supports symmetric quantization only")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"observer: unknown observer {self.observer!r}; valid: {sorted(OBSERVERS)}")
        if self.p <= 0:
            raise ConfigError(f"p: must be positive, got {self.p}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile: must be in (50, 100], got {self.percentile}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.num_candidates < 1 or self.max_elements < 1:
            raise ConfigError("num_candidates and max_elements: must be positive")

    @property
    def format(self) -> QFormat:
        fmt = parse_format(self.bits)
        if isinstance(fmt, IntFormat):
            return IntFormat(fmt.bits, signed=fmt.signed and self.symmetric and not self.unsigned)
        return fmt

    @property
    def granularity_spec(self) -> Granularity:
        return Granularity.parse(self.granularity)

    def observer_options(self) -> dict[str, Any]:
        """The options of this config that its observer takes."""
        per_observer = {
            "minmax": {},
            "unit": {},
            "ema": {"momentum": self.momentum},
            "percentile": {"percentile": self.percentile, "max_elements": self.max_elements},
            "mse": {"p": self.p, "num_candidates": self.num_candidates, "max_elements": self.max_elements},
        }
        return per_observer[self.observer]

    def with_bits(self, bits: int | str | None) -> QuantizerConfig:
        """A copy at ``bits``; float formats have no zero point, so they make it symmetric."""
        if bits is None:
            return self
        is_float = _keyed("bits", lambda: parse_format(bits)).is_float
        return dataclasses.replace(self, bits=bits, symmetric=self.symmetric or is_float)

    def describe(self) -> str:
        fmt = self.format
        sym = "sym" if self.symmetric else "asym"
        return f"{fmt.name} {sym} {self.granularity} {self.observer}"


def _default_weight() -> QuantizerConfig:
    return QuantizerConfig(bits=8, symmetric=True, granularity="channel", observer="mse", p=2.4)


def _default_activation() -> QuantizerConfig:
    return QuantizerConfig(bits=8, symmetric=False, granularity="tensor", observer="mse", p=2.4)


@dataclass(frozen=True)
class AttentionConfig:
    """Quantization of the two activation-activation matmuls of attention (Q·Kᵀ and softmax·V).

    Q, K and V are quantized with the activation config at ``bits``; the softmax output with an
    unsigned quantizer at ``softmax_bits`` (Q-Diffusion, Li et al. 2023, uses 8 or 16), or in ``fp8_e4m3``
    on the fixed range [0, 1] of a probability: FP8 attention (``bits: fp8_e4m3`` too), which converted
    models run on cuDNN's FP8 flash attention (:mod:`dmquant.kernels.fp8_attention`).
    """

    enabled: bool = True
    bits: int | str | None = None
    softmax_bits: int | str = 8

    def __post_init__(self) -> None:
        if self.bits is not None:
            _keyed("bits", lambda: parse_format(self.bits))
        fmt = _keyed("softmax_bits", lambda: parse_format(self.softmax_bits))
        if fmt.is_float and fmt.name != "fp8_e4m3":
            raise ConfigError(
                f"softmax_bits: the softmax output uses unsigned integers or fp8_e4m3 (FP8 attention), got {fmt.name}"
            )


@dataclass(frozen=True)
class LayerRule:
    """Overrides for the layers whose qualified name matches ``pattern``.

    ``pattern`` is an fnmatch glob, or several separated by ``|`` (``conv_in|pos_embed.proj``).

    ``keep_fp`` leaves them in full precision; ``weight_bits``/``activation_bits`` force a bit
    width (e.g. 8 bits for the first and last layer and the time embedding). A pattern that
    matches an attention module sets its matmul quantizers.
    """

    pattern: str
    keep_fp: bool = False
    weight_bits: int | str | None = None
    activation_bits: int | str | None = None

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ConfigError("pattern: must be a non-empty glob")
        for name in ("weight_bits", "activation_bits"):
            value = getattr(self, name)
            if value is not None:
                _keyed(name, lambda value=value: parse_format(value))
        if self.keep_fp and (self.weight_bits is not None or self.activation_bits is not None):
            raise ConfigError(f"keep_fp: cannot be combined with weight_bits/activation_bits (rule {self.pattern!r})")

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob.strip()) for glob in self.pattern.split("|"))


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration data comes from: the FP model's own sampling trajectories.

    ``strategy`` names a timestep-selection strategy of :mod:`dmquant.calib.strategies`
    (``uniform``: Q-Diffusion; ``ndtc``: PTQ4DM) and ``strategy_options`` its arguments;
    ``num_trajectories`` samples are recorded at each selected step, or once each at a step of
    their own with ``ndtc`` (twice that under classifier-free guidance: conditional and
    unconditional).
    """

    num_inference_steps: int = 20
    strategy: str = "uniform"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    num_trajectories: int = 16
    batch_size: int = 16
    guidance_scale: float = 1.0
    eta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "num_trajectories", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.guidance_scale < 0 or self.eta < 0:
            raise ConfigError("guidance_scale and eta: must be >= 0")
        _keyed("strategy", lambda: get_strategy(self.strategy, **self.strategy_options))


#: How the activation step sizes are treated during reconstruction (see :class:`ReconstructionConfig`).
ACTIVATION_SCALE_MODES = ("after", "jointly", "fixed")


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block reconstruction after range calibration (BRECQ, Li et al. 2021; AdaRound, Nagel et al. 2020).

    Every block of the model (residual, transformer, lone attention; every other quantized layer
    on its own) is optimised in execution order against the FP block's output, its input taken
    from the model quantized so far. ``activation_scales`` says what happens to the activation
    quantizers:

    - ``after`` (Q-Diffusion, Li et al. 2023): a first pass learns the weight rounding with
      activations in full precision; activation ranges are then calibrated on the reconstructed
      model, and a second pass learns their step sizes (LSQ, Esser et al. 2020) for
      ``activation_iterations`` with the weights fixed;
    - ``jointly`` (QDrop, Wei et al. 2022, as PTQ4DM runs it): one pass with activations
      quantized, learning rounding and step sizes together;
    - ``fixed``: one pass with activations quantized at their calibrated ranges, rounding only.

    ``drop_probability`` is QDrop's ``p``: during reconstruction each quantized activation element
    is replaced by its full-precision value (its quantization dropped) with this probability, and
    so is each element of the block's input. QDrop's and PTQ4DM's code count the other way (their
    ``drop_prob`` / ``prob`` / ``input_prob`` is the probability of keeping the quantized value),
    so their ``v`` is ``1 − v`` here; their released 0.5 is 0.5 either way
    (:mod:`dmquant.recon.qdrop`).
    ``inner_loss_weight`` is EDA-DM's FBR γ (0.8 in its experiments; 0: BRECQ's block loss only):
    the loss of each block's inner quantized layers' outputs, weighted by it, joins the block loss.
    ``num_samples`` calibration rows (drawn at random with ``seed`` when the set is larger) are
    cached per block within ``memory_budget_mb`` of accelerator memory (the rest spills to host).
    ``cuda_graphs`` replays each unit's optimisation step from a CUDA graph on CUDA devices
    (:mod:`dmquant.recon.graphed`): the same computation without the host's per-kernel launch
    work, which bounds small models; ``false`` runs every step eagerly.
    """

    enabled: bool = False
    num_samples: int = 1024
    iterations: int = 2000
    activation_iterations: int = 500
    activation_scales: str = "after"
    batch_size: int = 32
    learning_rate: float = 1e-3
    activation_learning_rate: float = 4e-5
    regularizer_scale: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    drop_probability: float = 0.0
    inner_loss_weight: float = 0.0
    memory_budget_mb: int = 4096
    cuda_graphs: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.activation_iterations < 0 or self.memory_budget_mb < 0:
            raise ConfigError("activation_iterations and memory_budget_mb: must be >= 0")
        if self.activation_scales not in ACTIVATION_SCALE_MODES:
            raise ConfigError(
                f"activation_scales: must be one of {', '.join(ACTIVATION_SCALE_MODES)}, got {self.activation_scales!r}"
            )
        if self.learning_rate <= 0 or self.activation_learning_rate <= 0 or self.regularizer_scale < 0:
            raise ConfigError("learning rates must be > 0 and regularizer_scale >= 0")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup: must be in [0, 1), got {self.warmup}")
        if not 0 < self.beta_end <= self.beta_start:
            raise ConfigError(
                f"beta_start, beta_end: need 0 < beta_end <= beta_start, got {self.beta_start}, {self.beta_end}"
            )
        if not 0.0 <= self.drop_probability < 1.0:
            raise ConfigError(f"drop_probability: must be in [0, 1), got {self.drop_probability}")
        if self.inner_loss_weight < 0:
            raise ConfigError(f"inner_loss_weight: must be >= 0, got {self.inner_loss_weight}")

    @property
    def ranges_after_weights(self) -> bool:
        """Q-Diffusion's order (``activation_scales: after``): activation ranges are estimated only once the
        weights are reconstructed, not before the reconstruction."""
        return self.enabled and self.activation_scales == "after"


@dataclass(frozen=True)
class CorrectionConfig:
    """PTQD's corrections of the quantization noise (He et al. 2023), applied while sampling.

    After quantization the FP and the quantized model run side by side along ``num_samples``
    FP trajectories of ``num_inference_steps`` steps (the sampler's: statistics are per step, so
    sampling must use the same number of steps), measuring per step the correlation ``k_t``, the
    per-channel bias ``b_t(c)`` and the residual spread ``σ_res(t)`` of the noise-estimate error.
    ``correlation`` (CNC), ``bias`` (BC) and ``variance`` (VSC) switch the three corrections.
    """

    enabled: bool = False
    correlation: bool = True
    bias: bool = True
    variance: bool = True
    num_samples: int = 256
    num_inference_steps: int = 50
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class StepPrecisionConfig:
    """Step-aware mixed precision (PTQD, He et al. 2023, Sec. 4.3): more activation bits late.

    Activation quantizers at the recipe's default activation bits use those bits for the first
    ``switch_step`` sampling steps of ``num_inference_steps`` and ``late_bits`` for the rest,
    where the signal-to-noise ratio of the denoising collapses. ``switch_step: null`` chooses it
    from the measured per-step SQNR of the noise estimate at the early bits: the first step from
    which it stays below ``snr_threshold_db``. Quantizers fixed by rules (first/last layer) and the
    softmax output keep their bits. Sampling must use ``num_inference_steps`` steps.
    """

    enabled: bool = False
    num_inference_steps: int = 50
    late_bits: int | str = 8
    switch_step: int | None = None
    snr_threshold_db: float = 20.0

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps: must be >= 1, got {self.num_inference_steps}")
        _keyed("late_bits", lambda: parse_format(self.late_bits))
        if self.switch_step is not None and not 0 <= self.switch_step <= self.num_inference_steps:
            raise ConfigError(
                f"switch_step: must be in [0, {self.num_inference_steps}] (num_inference_steps), got {self.switch_step}"
            )

    def bits_by_step(self, early_bits: int | str) -> list[int | str]:
        """Activation bits of every sampling step (``switch_step`` must be known)."""
        if self.switch_step is None:
            raise ConfigError("switch_step: not chosen yet (measure the per-step SQNR first)")
        late = self.num_inference_steps - self.switch_step
        return [early_bits] * self.switch_step + [self.late_bits] * late


@dataclass(frozen=True)
class HybridConfig:
    """Hybrid precision from the SQNR analysis (efficient-LDM study, Yang et al. 2023): the blocks
    whose quantization noise matters most get ``weight_bits`` / ``activation_bits``.

    Both the recipe's precision and the higher one are analysed (:mod:`dmquant.precision.sqnr`,
    ``num_samples`` trajectories of ``num_inference_steps`` steps); blocks are then promoted
    greedily by SQNR gain per extra BOP while the model's BOPs stay within ``max_bops_ratio``
    times those at the recipe's precision. The promotions become rules of the saved recipe.
    """

    enabled: bool = False
    weight_bits: int | str = 8
    activation_bits: int | str = 8
    max_bops_ratio: float = 1.25
    num_inference_steps: int = 20
    num_samples: int = 8

    def __post_init__(self) -> None:
        _keyed("weight_bits", lambda: parse_format(self.weight_bits))
        _keyed("activation_bits", lambda: parse_format(self.activation_bits))
        if self.max_bops_ratio < 1.0:
            raise ConfigError(
                f"max_bops_ratio: must be >= 1 (a budget above the recipe's own), got {self.max_bops_ratio}"
            )
        if self.num_inference_steps < 1 or self.num_samples < 1:
            raise ConfigError("num_inference_steps and num_samples: must be >= 1")


@dataclass(frozen=True)
class SmoothingConfig:
    """SmoothQuant (Xiao et al. 2023) on selected layers: activation outliers moved into the weights.

    ``patterns`` are fnmatch globs of the layers to smooth; ``most_sensitive > 0`` adds that many
    layers with the lowest SQNR on their own input (:mod:`dmquant.precision.sqnr`, measured on the
    recipe's ranges along ``num_samples`` trajectories of ``num_inference_steps`` steps), as the
    efficient-LDM study smooths the modules its analysis flags; the chosen names join ``patterns``
    in the saved recipe. ``alpha`` is the migration strength.
    """

    enabled: bool = False
    alpha: float = 0.5
    patterns: list[str] = field(default_factory=list)
    most_sensitive: int = 0
    num_inference_steps: int = 20
    num_samples: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha: must be in [0, 1], got {self.alpha}")
        if self.most_sensitive < 0 or self.num_inference_steps < 1 or self.num_samples < 1:
            raise ConfigError("most_sensitive must be >= 0, num_inference_steps and num_samples >= 1")


@dataclass(frozen=True)
class QuantConfig:
    """A whole quantization recipe."""

    name: str = "custom"
    weight: QuantizerConfig = field(default_factory=_default_weight)
    activation: QuantizerConfig = field(default_factory=_default_activation)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    split_shortcut: bool = True
    per_step_activations: bool = False
    rules: list[LayerRule] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    step_precision: StepPrecisionConfig = field(default_factory=StepPrecisionConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)

    def __post_init__(self) -> None:
        if self.step_precision.enabled and self.per_step_activations:
            raise ConfigError("step_precision.enabled: a bit schedule and per_step_activations do not combine")
        if self.reconstruction.enabled and self.per_step_activations:
            raise ConfigError(
                "reconstruction.enabled: reconstruction learns one set of activation ranges; "
                "it cannot be combined with per_step_activations"
            )

    def ranges_only(self) -> QuantConfig:
        """A copy that only sets ranges: reconstruction, correction, schedules, hybrid precision and
        smoothing off (the cheap model that analyses of a recipe's precision look at)."""
        return dataclasses.replace(
            copy.deepcopy(self),
            reconstruction=dataclasses.replace(self.reconstruction, enabled=False),
            correction=dataclasses.replace(self.correction, enabled=False),
            step_precision=dataclasses.replace(self.step_precision, enabled=False),
            hybrid=dataclasses.replace(self.hybrid, enabled=False),
            smoothing=dataclasses.replace(self.smoothing, enabled=False),
        )

    def with_bits(self, weight_bits: int | str | None = None, activation_bits: int | str | None = None) -> QuantConfig:
        """A copy with the default weight / activation bit widths replaced (rules still apply)."""
        return dataclasses.replace(
            copy.deepcopy(self),
            weight=self.weight.with_bits(weight_bits),
            activation=self.activation.with_bits(activation_bits),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        return _build(cls, data, "")


def with_overrides(config: QuantConfig, overrides: Mapping[str, object]) -> QuantConfig:
    """A copy of ``config`` with the values at dotted key paths replaced (``{"weight.bits": 4,
    "reconstruction.enabled": False}``), each checked as a recipe's value at that path and every section it
    changes validated again (configs are frozen: :func:`dataclasses.replace` is the only way to change one).
    ``weight.bits`` and ``activation.bits`` go through :meth:`QuantizerConfig.with_bits` (a float format
    makes its quantizer symmetric). Errors name the full key path."""
    for path, value in overrides.items():
        config = _replaced(config, str(path).split("."), value, "")
    return config


def _replaced(section: Any, keys: list[str], value: Any, prefix: str) -> Any:
    """``section`` with the value at ``keys`` (below ``prefix``) replaced."""
    key, rest = keys[0], keys[1:]
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"{prefix}{key}: unknown key; valid keys: {', '.join(fields)}")
    current = getattr(section, key)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{prefix}{key}: not a section, it holds no {'.'.join(rest)}")
        new = _replaced(current, rest, value, f"{prefix}{key}.")
    else:
        new = _convert(typing.get_type_hints(type(section))[key], value, f"{prefix}{key}", current)
    try:
        if key == "bits" and isinstance(section, QuantizerConfig):
            return section.with_bits(new)
        return dataclasses.replace(section, **{key: new})
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}") from None


def _keyed(key: str, check: Callable[[], Any]) -> Any:
    """Run ``check`` and prefix any ConfigError it raises with ``key``."""
    try:
        return check()
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None


def _build(cls: type, data: Any, path: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value type.

    Keys the mapping leaves out keep their values in ``base`` (the enclosing config's default
    for this section) or, without one, the class defaults.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.rstrip('.') or 'recipe'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key_path}: unknown key{hint}; valid keys: {', '.join(fields)}")
        kwargs[key] = _convert(hints[key], value, key_path, _field_default(fields[key]))
    if base is None:
        missing = [name for name, f in fields.items() if name not in kwargs and _field_default(f) is _REQUIRED]
        if missing:
            raise ConfigError(f"{path}{missing[0]}: required key missing")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{path}{error}" if path else str(error)) from None


_REQUIRED = object()


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED


def _convert(hint: Any, value: Any, path: str, default: Any = None) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, hint):
        return value  # a section given whole, {"calibration": CalibrationConfig(...)}: checked when it was made
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path + ".", default if dataclasses.is_dataclass(default) else None)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{path}: expected {_type_names(allowed)}, got a boolean")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value}")
    if not isinstance(value, tuple(t for t in allowed if isinstance(t, type))):
        raise ConfigError(f"{path}: expected {_type_names(allowed)}, got {value!r}")
    return value


def _type_names(types_: tuple) -> str:
    return " or ".join(getattr(t, "__name__", str(t)) for t in types_ if t is not type(None))


def _recipe_path(name_or_path: str | Path) -> Path:
    """The file of a shipped recipe's name (no suffix, no directory), or a recipe file's path."""
    path = Path(name_or_path)
    if not path.suffix and path.name != str(name_or_path):
        raise ConfigError(f"{name_or_path}: not a recipe file (a recipe file's name ends in .yaml or .toml)")
    if not path.suffix:
        candidates = [RECIPES_DIR / f"{name_or_path}.yaml", RECIPES_DIR / f"{name_or_path}.toml"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise ConfigError(
                f"unknown recipe {str(name_or_path)!r}; shipped recipes: {', '.join(available_recipes())}"
            )
        path = found[0]
    if not path.exists():
        raise ConfigError(f"recipe file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path}: not a recipe file (a directory or device)")
    return path


#: Mappings that hold a component's own options: an override replaces them whole (the options of
#: one timestep strategy mean nothing to another).
_OPTION_MAPPINGS = frozenset({"strategy_options"})


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: config sections merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        both = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and key not in _OPTION_MAPPINGS
        merged[key] = _merged(merged[key], value) if both else value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        for index, key in enumerate(keys):
            if key in keys[:index]:
                raise ConfigError(f"{key}: key given twice (line {node.start_mark.line + 1})")
        return super().construct_mapping(node, deep)


#: Recipes are small; a larger file is not one.
MAX_RECIPE_BYTES = 1 << 20


def _parse(path: Path) -> Any:
    """The YAML or TOML document of a recipe file; any fault of the file is a ConfigError."""
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a recipe can be ({MAX_RECIPE_BYTES})")
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text) if kind == "TOML" else yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506
    except ConfigError as error:
        raise ConfigError(f"{path.name}: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError, TypeError) as error:
        raise ConfigError(f"{path}: not valid {kind}: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a recipe") from None
    except OSError as error:
        raise ConfigError(f"{path}: unreadable ({error.strerror})") from None


def _recipe_data(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's mapping, with the recipe named by its ``base`` key (if any) underneath."""
    if path.resolve() in seen:
        chain = " -> ".join(p.name for p in (*seen, path.resolve()))
        raise ConfigError(f"recipes inherit from each other in a circle: {chain}")
    data = _parse(path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping at the top level, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path.name}: base: expected a recipe name or path, got {base!r}")
    base_path = _recipe_path(base if Path(base).suffix == "" else path.parent / base)
    return _merged(_recipe_data(base_path, (*seen, path.resolve())), data)


def load_recipe(name_or_path: str | Path) -> QuantConfig:
    """Load a recipe by name (``minmax``, ``mse``, ...: shipped under ``dmquant/recipes``) or path.

    A recipe may name another as its ``base`` (a shipped name, or a path relative to its own
    file): it then holds only what differs, its sections merged key by key over the base's.
    """
    path = _recipe_path(name_or_path)
    data = _recipe_data(path)
    try:
        return QuantConfig.from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path.name}: {error}") from None


__all__ = [
    "AttentionConfig",
    "CalibrationConfig",
    "CorrectionConfig",
    "FloatFormat",
    "HybridConfig",
    "LayerRule",
    "QuantConfig",
    "QuantizerConfig",
    "ReconstructionConfig",
    "SmoothingConfig",
    "StepPrecisionConfig",
    "available_recipes",
    "load_recipe",
    "with_overrides",
]
