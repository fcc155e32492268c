"""Speed benchmark: denoiser models × execution rows, one JSON file per cell.

Every cell times one denoiser call (the noise estimate of one sampling step) of one model under one
row, with CUDA events after warm-up: median and interquartile range over ``--repeats`` calls. It
also records the peak GPU memory of those calls (``torch.cuda.max_memory_allocated``, reset per
measurement, less what the benchmark itself holds), the bytes of the weights as run (parameters and
buffers; torchao tensor subclasses and packed low-bit weights at their real storage), the FLOPs of a
call (Linear and Conv2d layers by forward hooks, dmquant's converted layers recognised by their
in/out features or channels, attention matmuls Q·Kᵀ and P·V), the achieved TFLOP/s, the kernels
that took the time (torch.profiler on one call) and the fraction of the FLOPs left in full precision.
All rows of a model run side by side in one process.

Models (``--models``), random weights unless trained ones ship with dmquant:

- ``sd15-unet``: Stable Diffusion 1.5's UNet2DConditionModel; latents 2×4×64×64, text 2×77×768.
- ``sdxl-unet``: SDXL base's UNet; latents 2×4×128×128, text 2×77×2048, text_embeds 2×1280, time_ids 2×6.
- ``dit-xl-2-256``: DiT-XL/2 at 256 px; latents 2×4×32×32, class labels.
- ``ddpm-glyphs32``, ``dit-glyphs``, ``ldm-glyphs64``: the trained zoo models at the sampling batch of
  ``bench/quality.py`` (1,000 samples; 2,000 denoiser rows for the two guided models).

Rows (``--rows``), each measured in the execution settings it lists (the first is its headline):

- ``bf16-eager``: the model in bfloat16, eager PyTorch (diffusers' default SDPA attention).
- ``bf16-compiled``: torch.compile (default mode, ``dynamic=False``) of every outermost
  BasicTransformerBlock / ResnetBlock2D / Attention (``--compile-scope blocks``, regional
  compilation: one compiled graph per distinct block shape, the glue between blocks eager) or of
  the whole model (``--compile-scope model``).
- ``bf16-compiled-cudagraphs``: bf16-compiled, its whole call captured once into an explicit
  ``torch.cuda.CUDAGraph`` and replayed (not ``mode="reduce-overhead"``).
- torchao peers on nn.Linear, convolutions left in bfloat16 (``peers.py``; unsupported rows say
  why): ``int8-dynamic`` (Int8DynamicActivationInt8WeightConfig), ``fp8-dynamic-row``
  (Float8DynamicActivationFloat8WeightConfig, PerRow), ``int4-weight-only`` (Int4WeightOnlyConfig,
  tinygemm packing, group 128/64/32 by fan-in).
- dmquant: ``quantize`` with the ``minmax`` recipe at the row's formats, attention matmuls off,
  calibrated on 2 random rows shaped like the inputs, then ``dmquant.kernels.convert.convert_model``
  (real low-bit kernels): ``dmquant-w8a8-fp8`` (fp8 e4m3 weights per channel and activations per
  tensor), ``dmquant-w8a8-fp8-fast`` (the same, its fp8 GEMMs on cuBLASLt with fast accumulation,
  as torchao's fp8 row), ``dmquant-w8a8-fp8-every-layer`` (that, every layer on its fp8 kernel, no paths
  measured), ``dmquant-w8a8-fp8-any-gain`` (that, each measured path kept over bf16 however little it saves, where
  the default asks ``catalog.MIN_PATH_GAIN``), ``dmquant-w8a8-fp8-attention`` (that with the attention matmuls
  of diffusers ``Attention`` (SD3's joint one too) and FLUX's ``FluxAttention`` in fp8 too: FP8 attention on cuDNN
  where it takes the head dimension), ``dmquant-w8a8-fp8-linear-fast`` (that on the nn.Linear layers only, the
  convolutions left in bfloat16 as torchao leaves them), ``dmquant-w8a8-int8`` (int8 symmetric
  per-channel weights, asymmetric per-tensor activations), ``dmquant-w4a8`` and ``dmquant-w4a16``
  (packed int4 weights per output channel, which every layer takes, where torchao's int4 row groups
  by 128/64/32 inputs).
  A conversion that raises makes an ``unsupported`` cell with the reason.

Quantized rows are measured eager, compiled and compiled+CUDA graph (headline: compiled), each
compared with the bf16 row of the same setting; all compiled rows share the inductor settings in
``INDUCTOR_SETTINGS`` (torchao's recommended ones less coordinate-descent tuning, for compile time).

Results go to ``--results`` (default ``bench/results/speed``) as ``<model>/<row>.json``, with the
device's measured peaks (bf16 ``torch.mm``, fp8 ``torch._scaled_mm`` with row-wise scales, int8
``torch._int_mm``, all 8192³) in ``peaks.json``. A cell whose file exists is skipped (``--force``
redoes it); ``--max-minutes`` leaves a model that would not finish in time for the next run of the
same command, and a first model that alone would not finish is split by rows (those left compare with
the stored bf16 cells). The ten rows of the specification on the six models take an H100 about 47
minutes, mostly compiling: run the same command until it says nothing is left. ``--table`` prints the
results as markdown.

Without CUDA the script runs on the CPU in float32 (no CUDA graphs, fp8 and int4 rows
unsupported); ``--tiny`` shrinks the SD/SDXL/DiT configs and the zoo batch for smoke tests. Such
cells are marked ``"representative": false``.

Example (an H100; rerun to resume)::

    python bench/speed.py --max-minutes 9

The whole-model compile goes to a folder of its own, which ``bench/report.py`` shows as a second table::

    python bench/speed.py --compile-scope model --results bench/results/speed-model-scope
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

if not __package__:  # run as a file, `python bench/speed.py`: make the bench package importable
    import _package  # noqa: F401

from bench.common import command_line
from bench.speed_measure import MEMORY_FORMATS
from bench.speed_rows import ROWS, SETTINGS
from bench.speed_run import run_matrix
from bench.speed_table import speed_table
from bench.speed_workloads import MODELS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " See the module docstring (below) for what is measured.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=MODELS,
        metavar="MODEL",
        help=f"models (default: all): {', '.join(MODELS)}",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        choices=list(ROWS),
        metavar="ROW",
        help=f"rows (default: all): {', '.join(ROWS)}",
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS, metavar="SETTING",
                        help=f"execution settings measured (default: all): {', '.join(SETTINGS)}; "
                        "a row with none of them is left out")  # fmt: skip
    parser.add_argument("--memory-format", choices=list(MEMORY_FORMATS), default="channels_last",
                        help="layout of every row's 4-D weights and latents (default: %(default)s, as diffusers "
                        "recommends for UNets; cuDNN and dmquant's convolutions both read NHWC)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per setting (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when a GPU is visible) or cpu (float32, a smoke test)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, help="denoiser batch of every model (default: 2; zoo: quality's)")
    parser.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks",
                        help="torch.compile the outermost transformer/resnet/attention blocks (default) "
                        "or the whole model")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="shrunk SD/SDXL/DiT configs, zoo batch 2: CPU tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--results", default="bench/results/speed", help="where cell JSON goes")
    parser.add_argument("--max-minutes", type=float, help="leave models that would not finish in time for a rerun")
    parser.add_argument("--force", action="store_true", help="rerun cells whose results exist")
    parser.add_argument("--table", action="store_true", help="print the results as a markdown table and exit")
    parser.add_argument("-q", "--quiet", dest="progress", action="store_false", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(speed_table(args.results), end="")
        return 0
    command = command_line("speed", argv)
    run_matrix(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
