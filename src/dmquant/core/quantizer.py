"""``Quantizer``: the module that fake-quantizes one tensor and holds its calibrated parameters."""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantizerConfig
from ..errors import CalibrationError, ConfigError
from .observers import RangeObserver, make_observer
from .primitives import QFormat, choose_qparams, dequantize, expand_params, fake_quant, param_shape, quantize


class Quantizer(nn.Module):
    """Fake-quantizes a tensor with a scale and zero point per granularity block.

    It has three states: disabled (identity), observing (identity; feeds a range observer),
    and quantizing (fake-quant, straight-through gradients). It computes and answers in float32 whatever
    the input's dtype; the layers using it cast back, so a quantized model runs in bf16 / fp16. With
    ``num_steps > 1`` it holds one set of parameters per sampling step (``step`` selects the set), for
    activations whose range changes along the trajectory. :meth:`schedule_formats` instead gives it one
    set per format of a per-step bit schedule (step-aware mixed precision): ``step`` then selects the
    format and its parameters.

    Parameters are stored as buffers ``scale`` and ``zero_point`` of shape
    ``(num_steps, *param_shape)``; their shape is fixed by the first observed tensor and taken
    from the state dict on load.
    """

    def __init__(self, config: QuantizerConfig, *, num_steps: int = 1, name: str = "") -> None:
        super().__init__()
        self.config = config
        self.granularity = config.granularity_spec
        self.enabled = config.enabled
        self.num_steps = num_steps
        self.slot_formats: list[QFormat] = [config.format] * num_steps
        self.step_slots: list[int] | None = None
        self.name = name
        self.step = 0
        self.observing = False
        self._observers: dict[int, RangeObserver] = {}
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    @property
    def has_observations(self) -> bool:
        return bool(self._observers)

    @property
    def step(self) -> int:
        """The sampling step whose parameters (and format) the quantizer uses."""
        return self._step

    @step.setter
    def step(self, index: int) -> None:
        self._step = index
        self._select_slot()

    def _select_slot(self) -> None:
        """Resolve the current step to its parameter set once, when the step or the schedule changes: the forward
        reads only the slot, so ``torch.compile`` specialises on the parameter set (one graph per distinct set),
        not on the step (one graph per step, past its recompile limit)."""
        if self.step_slots is not None:
            self._slot = self.step_slots[min(self._step, len(self.step_slots) - 1)]
        else:
            self._slot = self._step if self.num_steps > 1 else 0

    def slot(self) -> int:
        """Index of the parameter set (and format) the current ``step`` uses."""
        return self._slot

    @property
    def fmt(self) -> QFormat:
        """The format of the current step."""
        return self.slot_formats[self.slot()]

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def schedule_formats(self, formats: list[QFormat]) -> None:
        """Use ``formats[i]`` at sampling step ``i``: one parameter set per distinct format.

        Call before calibration (the parameters are reset); a per-step quantizer cannot take a schedule.
        """
        if self.num_steps > 1 and self.step_slots is None:
            raise CalibrationError(f"{self.name or 'quantizer'}: per-step ranges and a bit schedule do not combine")
        distinct = list(dict.fromkeys(formats))
        self.slot_formats = distinct
        self.step_slots = [distinct.index(fmt) for fmt in formats]
        self.num_steps = len(distinct)
        self._select_slot()
        self._observers.clear()
        self.scale, self.zero_point = torch.empty(0), torch.empty(0)

    def extra_repr(self) -> str:
        state = "disabled" if not self.enabled else ("observing" if self.observing else "active")
        if self.step_slots is not None:
            steps = ", bits by step " + "/".join(fmt.name for fmt in self.slot_formats)
        else:
            steps = f", steps={self.num_steps}" if self.num_steps > 1 else ""
        return f"{self.config.describe()}, {state}{steps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self.observe(x)
            return x
        if not self.calibrated:
            raise CalibrationError(f"{self.name or 'quantizer'}: used before calibration")
        scale, zero_point = self.qparams(x.shape)
        return fake_quant(x, scale, zero_point, self.fmt)

    def qparams(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the current step, broadcastable against a tensor of ``shape``."""
        index = self.slot()
        scale = expand_params(self.scale[index], shape, self.granularity)
        zero_point = expand_params(self.zero_point[index], shape, self.granularity)
        return scale, zero_point

    def observe(self, x: torch.Tensor) -> None:
        """Feed ``x`` to the range observer of the current step."""
        if x.numel() == 0:
            return
        detached = x.detach().float()
        if not torch.isfinite(detached).all():
            raise CalibrationError(
                f"non-finite values (NaN/Inf) in the input of {self.name or 'a quantizer'} at sampling step {self.step}"
            )
        index = self.slot()
        if index not in self._observers:
            try:
                param_shape(detached.shape, self.granularity)
            except ValueError as error:
                name = self.name or "a tensor"
                raise ConfigError(f"granularity: {self.granularity} does not fit {name} ({error})") from None
            self._observers[index] = make_observer(
                self.config.observer,
                self.granularity,
                self.fmt,
                self.config.symmetric,
                **self.config.observer_options(),
            )
        self._observers[index].update(detached)

    def finalize(self) -> None:
        """Turn observed ranges into parameters and stop observing.

        Parameter sets that saw no calibration data take the range of the nearest one that did
        (by step), mapped onto their own format.
        """
        if not self._observers:
            raise CalibrationError(f"{self.name or 'quantizer'}: saw no calibration data")
        ranges = {index: observer.compute() for index, observer in self._observers.items()}
        observed = sorted(ranges)
        params = []
        for index in range(self.num_steps):
            min_val, max_val = ranges[min(observed, key=lambda s: (abs(s - index), s))]
            params.append(choose_qparams(min_val, max_val, self.slot_formats[index], self.config.symmetric))
        self.scale = torch.stack([scale for scale, _ in params])
        self.zero_point = torch.stack([zero_point for _, zero_point in params])
        self._observers.clear()
        self.observing = False

    def learn_scale(self) -> nn.Parameter:
        """Make the calibrated scale a trainable parameter (LSQ, Esser et al. 2020).

        ``fake_quant`` then passes LSQ's step-size gradient (eq. 3) to it; reconstruction uses this.
        """
        if not self.calibrated:
            raise CalibrationError(f"{self.name or 'quantizer'}: calibrate before learning the scale")
        scale = nn.Parameter(self.scale.detach().clone())
        del self._buffers["scale"]
        self.scale = scale
        return scale

    def freeze_scale(self) -> None:
        """Undo :meth:`learn_scale`: keep the learned values as an ordinary buffer again."""
        if isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self._parameters["scale"]
            self.register_buffer("scale", value)

    def calibrate_on(self, x: torch.Tensor) -> None:
        """Observe one tensor (e.g. a weight) and finalize at once."""
        self._observers.clear()
        self.observe(x)
        self.finalize()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (or float-format values) of ``x``, for storage."""
        scale, zero_point = self.qparams(x.shape)
        return quantize(x.detach().float(), scale, zero_point, self.fmt)

    def decode(self, codes: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        scale, zero_point = self.qparams(shape)
        return dequantize(codes, scale, zero_point, self.fmt)

    def _apply(self, fn, recurse=True):
        """Move the parameters with the module but keep their float32: ``model.to(torch.bfloat16)`` or
        ``.half()`` changes the dtype the model computes in, not the calibrated scales (rounded to bf16 they
        would quantize onto another grid)."""
        kept = {key: self._buffers[key] for key in ("scale", "zero_point") if key in self._buffers}
        super()._apply(fn, recurse)
        for key, before in kept.items():
            self._buffers[key] = before.to(self._buffers[key].device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The parameter shapes depend on the calibrated tensor: adopt the stored ones.
        for key in ("scale", "zero_point"):
            stored = state_dict.get(prefix + key)
            if stored is not None and stored.shape != getattr(self, key).shape:
                setattr(self, key, torch.empty_like(stored, device=getattr(self, key).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def quantizers(module: nn.Module) -> list[Quantizer]:
    return [m for m in module.modules() if isinstance(m, Quantizer)]


#: ``module.__dict__`` key: ``True`` once something selects the module's sampling steps (see :func:`set_step`).
STEPS_DRIVEN = "dmquant_steps_driven"


def set_step(module: nn.Module, step_index: int) -> None:
    """Select the per-step activation parameters of every quantizer in ``module``.

    It also marks ``module`` as driven step by step (``module.__dict__[STEPS_DRIVEN]``): a model with
    per-step parts refuses to run undriven (see :func:`dmquant.api.quantize`) rather than silently
    staying at step 0.
    """
    module.__dict__[STEPS_DRIVEN] = True
    for quantizer in quantizers(module):
        quantizer.step = step_index
