"""The production quantizers dmquant is compared against, as optional benchmark extras.

The quality benchmark runs each zoo denoiser through the tools people would use instead of
dmquant, side by side with dmquant's own recipes:

=========================  ==============  =====  ==========================================
name                       library         bits   what it does
=========================  ==============  =====  ==========================================
torchao-int8-dynamic       torchao         W8A8   int8 per-channel weights, int8 per-token
                                                  activations quantized on the fly (Linear)
torchao-int4-weight-only   torchao         W4A16  int4 asymmetric per-group weights, tinygemm
                                                  kernel, bfloat16 activations (Linear; CUDA)
torchao-fp8-dynamic        torchao         W8A8   fp8 e4m3 per-row weights and per-token
                                                  activations (Linear; CUDA, sm >= 8.9)
quanto-w8a8                optimum-quanto  W8A8   int8 per-channel weights, int8 per-tensor
                                                  static activations from calibration
quanto-w4a8                optimum-quanto  W4A8   int4 per-group weights, int8 static activations
=========================  ==============  =====  ==========================================

None of this is a dependency of dmquant: install the ``bench`` extra (``pip install -e .[bench]``)
or the two packages. A peer whose package, device or GPU generation is missing raises
:class:`PeerUnavailable` with the reason, before touching the model, so the benchmark can print
it and go on.

The libraries quantize only some layer types, and silently leave some shapes alone. The adapter
reports, for every ``nn.Linear`` and ``nn.Conv2d``, whether the library quantized it, and why not
(:class:`PeerResult`), so that a benchmark table never credits a peer with layers it left in full
precision. Layers a library would reject or skip for their shape are excluded up front by a
filter, with the reason in ``notes``. Some limits depend on the inputs too: ``torch._int_mm`` on CUDA
takes only products of more than 16 rows, so the timestep-embedding projections of a denoiser run
at batch 2 (M = 2) break the int8 peer (eagerly, torchao catches the refusal and multiplies in
float32; under ``torch.compile`` it raises). Pass the rows each ``nn.Linear`` sees
(:func:`linear_rows` records them on one forward pass) as ``apply_peer(..., rows=...)``, and the int8
peer leaves those layers in full precision, saying why. fp8 ``torch._scaled_mm`` with row-wise scales
has no such limit: it needs only the inner and output dimensions to be multiples of 16, whatever
the rows.

Compute dtypes: torchao's int4 and fp8 configs need bfloat16 weights, so those peers return a
bfloat16 model; the others keep the model's dtype. Feed the returned model inputs of
``result.dtype`` (:func:`cast_floating` casts a batch, leaving integer tensors such as class labels
alone).

Tested with torchao 0.18.0 and optimum-quanto 0.2.7: on CPU with torch 2.13 (int8 peers), on an
H100 with torch 2.11 + CUDA (all peers). torchao 0.18 needs torch >= 2.11 for its compiled
extensions, which none of these peers uses (int4 goes through ``aten._weight_int4pack_mm``, fp8
through ``torch._scaled_mm``, int8 through ``torch._int_mm``).

Usage (from the repository root)::

    from bench.peers import PEERS, PeerUnavailable, apply_peer, cast_floating

    try:
        result = apply_peer("quanto-w8a8", unet, calibrate=run_calibration_batches)
    except PeerUnavailable as why:
        print(f"skipped: {why}")
    else:
        eps = result.model(cast_floating(x, result.dtype), t, **cast_floating(cond, result.dtype)).sample
        print(result.quantized, result.skipped, result.notes)
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "PEERS",
    "PeerNeeds",
    "PeerResult",
    "PeerSpec",
    "PeerUnavailable",
    "apply_peer",
    "cast_floating",
    "check_available",
    "count_layers",
    "linear_rows",
    "model_dtype",
    "peer_versions",
]

#: The layer types a peer's coverage is counted over.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
#: torchao int4: group sizes tried per layer, largest first (each must divide ``in_features``).
INT4_GROUP_SIZES: tuple[int, ...] = (128, 64, 32)
#: torch._int_mm on CUDA refuses a left operand of this many rows or fewer (cuBLAS int8; the CPU
#: kernel takes any number).
INT_MM_CUDA_MAX_REFUSED_ROWS = 16


class PeerUnavailable(Exception):
    """The peer cannot run here: its package is missing, or the device it needs is absent or too old."""


@dataclass(frozen=True)
class PeerNeeds:
    """What a peer requires to run.

    Attributes:
        package: the import name checked with ``importlib.util.find_spec``.
        distribution: the pip distribution that provides it.
        cuda: whether the model must be on a CUDA device.
        min_capability: the least CUDA compute capability ``(major, minor)``, if any.
        compute_dtype: the dtype the model is cast to, or ``None`` to keep the model's own.
    """

    package: str
    distribution: str
    cuda: bool = False
    min_capability: tuple[int, int] | None = None
    compute_dtype: torch.dtype | None = None

    def __str__(self) -> str:
        parts = [self.distribution]
        if self.cuda:
            parts.append("CUDA" if self.min_capability is None else "CUDA sm >= {}.{}".format(*self.min_capability))
        if self.compute_dtype is not None:
            parts.append(str(self.compute_dtype).removeprefix("torch."))
        return ", ".join(parts)


@dataclass(frozen=True)
class PeerSpec:
    """One peer quantizer: a library, a configuration of it, and what it needs.

    Attributes:
        name: the key in :data:`PEERS`.
        library: the pip distribution (``"torchao"``, ``"optimum-quanto"``).
        bits: weight / activation bits as ``"W8A8"``, ``"W4A16"``, ``"W4A8"``.
        description: what is quantized, how, and what is left alone.
        needs: the requirements checked before the model is touched.
        calibrates: whether ``apply_peer`` runs the caller's calibration batches through it.
    """

    name: str
    library: str
    bits: str
    description: str
    needs: PeerNeeds
    calibrates: bool = False


@dataclass
class PeerResult:
    """A denoiser quantized by a peer, and what the peer did and did not quantize.

    Attributes:
        name: the peer's name.
        model: the quantized copy (the caller's model is untouched); it may be bfloat16, see ``dtype``.
        quantized: layer type (``"Linear"``, ``"Conv2d"``) -> number of layers whose weights were quantized.
        skipped: layer type -> number of ``Linear``/``Conv2d`` layers left in full precision.
        compute_dtype: the dtype the model computes in (``"float32"``, ``"bfloat16"``); inputs must be cast to it.
        notes: one line per reason a layer was skipped or treated differently, with counts.
        skipped_layers: qualified layer name -> why it was left in full precision.
        unquantized_inputs: for peers that quantize activations, layer type -> number of quantized
            layers whose input still arrived in floating point (those layers ran with quantized
            weights only); checked on one calibration batch after freezing.
    """

    name: str
    model: nn.Module
    quantized: dict[str, int]
    skipped: dict[str, int]
    compute_dtype: str
    notes: list[str] = field(default_factory=list)
    skipped_layers: dict[str, str] = field(default_factory=dict)
    unquantized_inputs: dict[str, int] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """``compute_dtype`` as a ``torch.dtype``."""
        return getattr(torch, self.compute_dtype)

    @property
    def coverage(self) -> float:
        """Fraction of the ``Linear``/``Conv2d`` layers whose weights were quantized."""
        done, left = sum(self.quantized.values()), sum(self.skipped.values())
        return done / (done + left) if done + left else 0.0


_TORCHAO = PeerNeeds(package="torchao", distribution="torchao")
_QUANTO = PeerNeeds(package="optimum.quanto", distribution="optimum-quanto")

PEERS: dict[str, PeerSpec] = {
    spec.name: spec
    for spec in (
        PeerSpec(
            name="torchao-int8-dynamic",
            library="torchao",
            bits="W8A8",
            description=(
                "torchao Int8DynamicActivationInt8WeightConfig: symmetric int8 weights per output channel, "
                "symmetric int8 activations per token computed on the fly, int8 matmul (torch._int_mm). "
                "nn.Linear only; every Conv2d stays in full precision, and so, on CUDA, does every Linear "
                f"whose product has {INT_MM_CUDA_MAX_REFUSED_ROWS} rows or fewer (when the rows are given), "
                "which torch._int_mm refuses. Keeps the model's dtype."
            ),
            needs=_TORCHAO,
        ),
        PeerSpec(
            name="torchao-int4-weight-only",
            library="torchao",
            bits="W4A16",
            description=(
                "torchao Int4WeightOnlyConfig with the tile_packed_to_4d format (tinygemm kernel "
                "aten._weight_int4pack_mm): asymmetric int4 weights per group of input channels, "
                f"group size the largest of {INT4_GROUP_SIZES} dividing in_features, bfloat16 activations. "
                "nn.Linear only; Conv2d and Linear layers whose in_features no group size divides stay in "
                "full precision. Needs CUDA sm >= 8.0; casts the model to bfloat16."
            ),
            needs=PeerNeeds("torchao", "torchao", cuda=True, min_capability=(8, 0), compute_dtype=torch.bfloat16),
        ),
        PeerSpec(
            name="torchao-fp8-dynamic",
            library="torchao",
            bits="W8A8",
            description=(
                "torchao Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()): float8 e4m3 weights "
                "per output channel and activations per token, scaled on the fly, torch._scaled_mm. nn.Linear "
                "only; Conv2d and Linear layers with in_ or out_features not a multiple of 16 stay in full "
                "precision. Needs CUDA sm >= 8.9 (Ada, Hopper); casts the model to bfloat16."
            ),
            needs=PeerNeeds("torchao", "torchao", cuda=True, min_capability=(8, 9), compute_dtype=torch.bfloat16),
        ),
        PeerSpec(
            name="quanto-w8a8",
            library="optimum-quanto",
            bits="W8A8",
            description=(
                "optimum-quanto quantize(weights=qint8, activations=qint8), Calibration over the caller's "
                "batches, freeze: symmetric int8 weights per output channel, static per-tensor int8 "
                "activations (absmax with momentum). Swaps every Linear/Conv2d for QLinear/QConv2d and "
                "LayerNorm for QLayerNorm (outputs only). QLinear quantizes its input; QConv2d only its "
                "output, so a conv whose input comes from a float op (GroupNorm/SiLU) runs weight-only: "
                "see unquantized_inputs. Keeps the model's dtype."
            ),
            needs=_QUANTO,
            calibrates=True,
        ),
        PeerSpec(
            name="quanto-w4a8",
            library="optimum-quanto",
            bits="W4A8",
            description=(
                "optimum-quanto quantize(weights=qint4, activations=qint8), Calibration, freeze: asymmetric "
                "int4 weights per group (128, 96, 64 or 32 dividing the fan-in when it exceeds 128, else per "
                "output channel), static per-tensor int8 activations. Same layer coverage as quanto-w8a8. "
                "quanto builds its int4 unpack extension on first use (C++ compiler on CPU, nvcc on CUDA). "
                "Keeps the model's dtype."
            ),
            needs=_QUANTO,
            calibrates=True,
        ),
    )
}


# ----------------------------------------------------------------------------------------------
# Small helpers the benchmark uses too


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the peer libraries (``None`` where absent), for result provenance."""
    versions: dict[str, str | None] = {}
    for distribution in ("torchao", "optimum-quanto"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    return versions


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in: that of its first floating parameter (float32 if none).

    Quantized weights of torchao and quanto report their high-precision dtype, so this holds for the
    models :func:`apply_peer` returns.
    """
    for parameter in model.parameters():
        if parameter.dtype.is_floating_point:
            return parameter.dtype
    return torch.float32


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating-point tensor in it cast to ``dtype``.

    Walks mappings, lists and tuples; integer tensors (class labels, integer timesteps) and
    anything else are returned as they are.
    """
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {key: cast_floating(item, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [cast_floating(item, dtype) for item in value])
    return value


def _layer_type(module: nn.Module) -> str | None:
    for layer_type in LAYER_TYPES:
        if isinstance(module, layer_type):
            return layer_type.__name__
    return None


def count_layers(model: nn.Module) -> dict[str, int]:
    """Number of ``nn.Linear`` and ``nn.Conv2d`` layers (subclasses included) in ``model``, by type."""
    counts = Counter(_layer_type(module) for module in model.modules())
    counts.pop(None, None)
    return dict(counts)


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def linear_rows(model: nn.Module, call: Callable[[], Any]) -> dict[str, int]:
    """The rows M of the matrix product of every ``nn.Linear`` in ``model`` during ``call()``.

    ``call`` runs one forward pass of ``model`` (under ``torch.no_grad()``); a layer's M is its
    input's element count over ``in_features`` (batch × tokens), the fewest over its calls. Layers
    ``call`` does not reach are absent. Returns qualified layer name -> M, the ``rows`` of
    :func:`apply_peer`.
    """
    rows: dict[str, int] = {}
    handles = []
    for layer_name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def record(layer: nn.Linear, args: tuple, key: str = layer_name) -> None:
                seen = args[0].numel() // layer.in_features
                rows[key] = min(rows.get(key, seen), seen)

            handles.append(module.register_forward_pre_hook(record))
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return rows


# ----------------------------------------------------------------------------------------------
# Requirements


def check_available(name: str, device: torch.device | str | None = None) -> PeerSpec:
    """The spec of peer ``name``, or :class:`PeerUnavailable` saying why it cannot run on ``device``.

    ``device`` is where the model lives (default: ``cuda`` when a GPU is visible, else ``cpu``).
    Raises ``KeyError`` for a name not in :data:`PEERS`.
    """
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; the peers are {sorted(PEERS)}")
    spec = PEERS[name]
    needs = spec.needs
    if importlib.util.find_spec(needs.package.split(".")[0]) is None or importlib.util.find_spec(needs.package) is None:
        raise PeerUnavailable(
            f"{name} needs the Python package {needs.distribution!r}, which is not installed "
            f"(pip install {needs.distribution}, or the dmquant[bench] extra)"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if needs.cuda:
        if not torch.cuda.is_available():
            raise PeerUnavailable(f"{name} needs a CUDA GPU and torch sees none (torch {torch.__version__})")
        if device.type != "cuda":
            raise PeerUnavailable(f"{name} runs only on CUDA; the model is on {device.type}: move it to the GPU first")
        if needs.min_capability is not None:
            capability = torch.cuda.get_device_capability(device)
            if capability < needs.min_capability:
                raise PeerUnavailable(
                    "{} needs a GPU of compute capability >= {}.{}; {} has {}.{}".format(
                        name, *needs.min_capability, torch.cuda.get_device_name(device), *capability
                    )
                )
    if name == "quanto-w4a8":
        problem = _quanto_extension_problem(device)
        if problem:
            raise PeerUnavailable(f"{name}: {problem}")
    return spec


def _quanto_extension_problem(device: torch.device) -> str | None:
    """Why quanto's int4 ``unpack`` extension cannot be built for ``device``, or ``None``.

    quanto unpacks int4 weights with a C++ (CPU) or CUDA extension that it compiles with
    ``torch.utils.cpp_extension.load`` the first time an int4 weight is used, into its own package
    directory; without a compiler that first use fails deep inside a forward pass.
    """
    spec = importlib.util.find_spec("optimum.quanto")
    root = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    kind = "cuda" if device.type == "cuda" else "cpp"
    if root is not None:
        build = os.path.join(root, "library", "extensions", kind, "build")
        version_file = os.path.join(build, "pytorch_version.txt")
        if os.path.exists(version_file):
            with open(version_file) as handle:
                if handle.read().strip() == torch.__version__:
                    return None  # already built for this torch
        if not os.access(os.path.dirname(build), os.W_OK):
            return f"quanto builds its int4 unpack extension into {os.path.dirname(build)}, which is not writable"
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        return "quanto builds its int4 unpack extension with ninja, which is not installed"
    if device.type == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
        if nvcc is None or not os.path.exists(nvcc):
            return (
                "quanto compiles its int4 unpack CUDA extension at first use and needs nvcc (a CUDA toolkit, "
                "CUDA_HOME); none was found"
            )
    elif not any(shutil.which(compiler) for compiler in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        return "quanto compiles its int4 unpack C++ extension at first use and no C++ compiler was found"
    return None


# ----------------------------------------------------------------------------------------------
# Applying a peer


def apply_peer(
    name: str,
    denoiser: nn.Module,
    calibrate: Callable[[nn.Module], None] | None = None,
    rows: Mapping[str, int] | None = None,
) -> PeerResult:
    """Quantize a copy of ``denoiser`` with peer ``name`` and report what it covered.

    Args:
        name: a key of :data:`PEERS`.
        denoiser: the FP model (diffusers ``UNet2DModel``, ``UNet2DConditionModel``,
            ``DiTTransformer2DModel`` or any module); it is deep-copied and never modified. A peer
            that needs CUDA needs the model on the GPU already.
        calibrate: runs the FP calibration batches through the model it is given, under
            ``torch.no_grad()``, with inputs cast to that model's dtype (:func:`model_dtype`).
            Required by the peers that calibrate activations (``spec.calibrates``: quanto), ignored by
            the others.
        rows: qualified ``nn.Linear`` name -> rows M of its matrix product at the inputs the model
            will be run on (:func:`linear_rows`). With them, ``torchao-int8-dynamic`` on CUDA leaves
            the layers of 16 rows or fewer in full precision, which ``torch._int_mm`` refuses;
            without them every Linear is quantized. The other peers have no such limit.

    Returns:
        A :class:`PeerResult` with the quantized copy, per-type counts of quantized and skipped
        layers, the compute dtype and notes.

    Raises:
        PeerUnavailable: the package, device or GPU generation the peer needs is missing (checked
            before anything is copied).
        KeyError: ``name`` is not a peer.
        ValueError: a calibrating peer got no ``calibrate``, or ``calibrate`` ran no forward pass.
    """
    if not isinstance(denoiser, nn.Module):
        raise TypeError(f"apply_peer needs an nn.Module, got {type(denoiser).__name__}")
    spec = check_available(name, _device(denoiser))
    if spec.calibrates and calibrate is None:
        raise ValueError(f"{name} calibrates static activation ranges: pass calibrate=<callable running FP batches>")
    model = copy.deepcopy(denoiser).eval()
    if spec.needs.compute_dtype is not None:
        if getattr(model, "_keep_in_fp32_modules", None):
            model = model.to(spec.needs.compute_dtype)  # diffusers' override keeps (and warns about) those
        else:
            # nn.Module.to: diffusers' override warns about fp32 modules even when it has none
            model = nn.Module.to(model, spec.needs.compute_dtype)
    layers = {module_name: _layer_type(module) for module_name, module in model.named_modules() if _layer_type(module)}
    if spec.library == "torchao":
        (reasons, notes), unquantized_inputs = _apply_torchao(name, model, rows or {}), {}
        is_quantized = _torchao_is_quantized
    else:
        reasons, notes, unquantized_inputs = _apply_quanto(name, model, calibrate)
        is_quantized = _quanto_is_quantized
    return _result(name, model, layers, reasons, is_quantized, notes, unquantized_inputs)


def _result(
    name: str,
    model: nn.Module,
    layers: dict[str, str],
    reasons: dict[str, str],
    is_quantized: Callable[[nn.Module], bool],
    extra_notes: list[str],
    unquantized_inputs: dict[str, int],
) -> PeerResult:
    """Count, per layer type, what the library really left quantized; say why the rest was not."""
    modules = dict(model.named_modules())
    quantized: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    skipped_layers: dict[str, str] = {}
    for layer_name, layer_type in layers.items():
        if is_quantized(modules[layer_name]):
            quantized[layer_type] += 1
        else:
            skipped[layer_type] += 1
            skipped_layers[layer_name] = reasons.get(layer_name, "left in full precision by the library")
    by_reason = Counter((layers[layer_name], reason) for layer_name, reason in skipped_layers.items())
    notes = [f"{layer_type} x{count} not quantized: {reason}" for (layer_type, reason), count in by_reason.items()]
    return PeerResult(
        name=name,
        model=model,
        quantized=dict(quantized),
        skipped=dict(skipped),
        compute_dtype=str(model_dtype(model)).removeprefix("torch."),
        notes=notes + extra_notes,
        skipped_layers=skipped_layers,
        unquantized_inputs=unquantized_inputs,
    )


# --- torchao -------------------------------------------------------------------------------------


def _torchao_is_quantized(module: nn.Module) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)


def _torchao_reason(name: str, module: nn.Module, device: torch.device, rows: int | None = None) -> str | None:
    """Why torchao's config ``name`` would not quantize ``module`` on ``device`` (``None``: it will).

    ``rows`` is the number of rows M of the layer's matrix product, where known (:func:`linear_rows`).
    """
    if isinstance(module, nn.Conv2d):
        return "torchao's quantize_ takes nn.Linear only (its default filter); convolutions are not quantized"
    if not isinstance(module, nn.Linear):
        return None
    if name == "torchao-int4-weight-only" and _int4_group_size(module.in_features) is None:
        # torchao itself would skip it silently (logger.info) in _int4_weight_only_quantize_tensor
        return f"int4 group size: in_features={module.in_features} is not a multiple of {min(INT4_GROUP_SIZES)}"
    if name == "torchao-fp8-dynamic" and (module.in_features % 16 or module.out_features % 16):
        # torch._scaled_mm needs both dims multiples of 16; torchao would skip it silently (_fp8_mm_compat)
        return f"fp8 _scaled_mm needs in/out features multiples of 16, got {module.in_features}x{module.out_features}"
    if (
        name == "torchao-int8-dynamic"
        and device.type == "cuda"
        and rows is not None
        and rows <= INT_MM_CUDA_MAX_REFUSED_ROWS
    ):
        # eagerly torchao's safe_int_mm catches the refusal and multiplies in float32; compiled, it raises
        return f"torch._int_mm needs more than {INT_MM_CUDA_MAX_REFUSED_ROWS} rows on CUDA; this layer sees M={rows}"
    return None


def _int4_group_size(in_features: int) -> int | None:
    return next((size for size in INT4_GROUP_SIZES if in_features % size == 0), None)


def _apply_torchao(name: str, model: nn.Module, rows: Mapping[str, int]) -> tuple[dict[str, str], list[str]]:
    """Run torchao's ``quantize_`` in place; returns the reasons of the layers excluded up front, and notes.

    ``rows``: the rows M of each Linear's product that are known (see :func:`apply_peer`).
    """
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    device = _device(model)
    reasons = {
        layer_name: reason
        for layer_name, module in model.named_modules()
        if (reason := _torchao_reason(name, module, device, rows.get(layer_name))) is not None
    }

    def eligible(module: nn.Module, fqn: str, group_size: int | None = None) -> bool:
        # torchao's own default filter (_is_linear) plus ours; fqn is the module's qualified name
        if not isinstance(module, nn.Linear) or fqn in reasons or _torchao_is_quantized(module):
            return False
        return group_size is None or _int4_group_size(module.in_features) == group_size

    # set_inductor_config=False: leave torch._inductor's global settings alone (call torchao's
    # recommended_inductor_config_setter() before torch.compile when benchmarking speed).
    if name == "torchao-int8-dynamic":
        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), filter_fn=eligible)
    elif name == "torchao-fp8-dynamic":
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        quantize_(model, config, filter_fn=eligible)
    elif name == "torchao-int4-weight-only":
        # The default PLAIN packing needs the separate `mslk` kernel package; tile_packed_to_4d is the
        # tinygemm kernel built into PyTorch's CUDA build.
        for group_size in INT4_GROUP_SIZES:
            config = Int4WeightOnlyConfig(
                group_size=group_size,
                int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
                set_inductor_config=False,
            )
            quantize_(model, config, filter_fn=lambda module, fqn, size=group_size: eligible(module, fqn, size))
    else:  # pragma: no cover - PEERS and this dispatch are edited together
        raise KeyError(name)

    linears = [module for module in model.modules() if isinstance(module, nn.Linear) and _torchao_is_quantized(module)]
    notes = []
    if name == "torchao-int4-weight-only":
        sizes = Counter(_int4_group_size(module.in_features) for module in linears)
        listed = ", ".join(f"{size} x{count}" for size, count in sorted(sizes.items(), reverse=True))
        notes.append(f"int4 weight groups (group size x layers): {listed}")
    if name == "torchao-int8-dynamic" and device.type == "cuda":
        odd = sum(module.in_features % 8 != 0 or module.out_features % 8 != 0 for module in linears)
        if odd:
            # torchao.kernel.intmm.safe_int_mm: cuBLAS int8 needs both dims multiples of 8
            notes.append(f"Linear x{odd} with in/out features not multiples of 8 run torchao's slow CPU int32 fallback")
    return reasons, notes


# --- optimum-quanto --------------------------------------------------------------------------------


def _quanto_is_quantized(module: nn.Module) -> bool:
    from optimum.quanto import QModuleMixin, QTensor

    return isinstance(module, QModuleMixin) and isinstance(module.weight, QTensor)


def _apply_quanto(
    name: str, model: nn.Module, calibrate: Callable[[nn.Module], None]
) -> tuple[dict[str, str], list[str], dict[str, int]]:
    """quanto's quantize -> Calibration(calibrate) -> freeze, in place.

    Returns the reasons of excluded layers (none: quanto takes every Linear/Conv2d), extra notes,
    and per type the number of quantized layers whose input arrived unquantized.
    """
    from optimum.quanto import ActivationQBytesTensor, Calibration, QModuleMixin, freeze, qint4, qint8, quantize

    weights = qint4 if name == "quanto-w4a8" else qint8
    quantize(model, weights=weights, activations=qint8)

    # Keep one calibration batch (the first call of the root module) to replay after freezing.
    captured: list[tuple[tuple, dict]] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not captured:
            captured.append(_detached((args, kwargs)))

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad(), Calibration():
            calibrate(model)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{name}: calibrate() ran no forward pass through the model it was given")
    freeze(model)

    # Which quantized layers actually receive a quantized input in the frozen model (QLinear
    # quantizes its own input; QConv2d / QLayerNorm depend on what feeds them)?
    seen: dict[str, bool] = {}
    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, QModuleMixin) and _layer_type(module):

            def record(_module: nn.Module, args: tuple, key: str = module_name) -> None:
                seen[key] = bool(args) and isinstance(args[0], ActivationQBytesTensor)

            # registered after quanto's own input-quantizing pre-hook, so it sees what the layer computes on
            handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            args, kwargs = captured[0]
            model(*args, **kwargs)
    finally:
        for hook in handles:
            hook.remove()

    modules = dict(model.named_modules())
    unquantized_inputs = dict(Counter(_layer_type(modules[key]) for key, quantized in seen.items() if not quantized))
    notes = []
    if unquantized_inputs:
        listed = ", ".join(f"{layer_type} x{count}" for layer_type, count in sorted(unquantized_inputs.items()))
        notes.append(f"weights quantized but input activations left in float (weight-only in effect): {listed}")
    layer_norms = sum(isinstance(module, QModuleMixin) and not _layer_type(module) for module in model.modules())
    if layer_norms:
        notes.append(f"LayerNorm x{layer_norms} swapped for QLayerNorm (int8 output activations, weights kept)")
    if weights is qint4:
        group_sizes = Counter(
            module.weight_group_size or "per-channel"
            for module in model.modules()
            if isinstance(module, QModuleMixin) and _layer_type(module)
        )
        listed = ", ".join(f"{size} x{count}" for size, count in sorted(group_sizes.items(), key=str))
        notes.append(f"int4 weight groups (group size x layers): {listed}")
    return {}, notes, unquantized_inputs


def _detached(value: Any) -> Any:
    """A detached copy of the tensors in ``value`` (tuples, lists, mappings walked)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_detached(item) for item in value])
    return value


def _rebuild(sequence: list | tuple, items: list) -> list | tuple:
    """A sequence of ``sequence``'s type (named tuples included) holding ``items``."""
    if isinstance(sequence, tuple) and hasattr(sequence, "_fields"):
        return type(sequence)(*items)
    return type(sequence)(items)
