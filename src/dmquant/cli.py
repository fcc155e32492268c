"""The ``dmquant`` command: its options, the parser and ``main`` (each command is in :mod:`dmquant.cli_commands`).

Each command imports what it runs on when it runs: ``dmquant --help`` and argument errors answer without
importing torch (the names the options offer come from :mod:`dmquant.catalog`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .catalog import MIN_PATH_GAIN, REFERENCE_MODELS, SCHEDULER_NAMES, TINY_MODELS, available_recipes
from .cli_commands import (
    DEFAULT_STEPS,
    check_device,
    cmd_analyze,
    cmd_convert,
    cmd_demo,
    cmd_eval,
    cmd_inspect,
    cmd_quantize,
    cmd_sample,
    cmd_zoo_evaluate,
    cmd_zoo_list,
    cmd_zoo_train,
)
from .errors import DmquantError

if TYPE_CHECKING:
    pass

MODEL_HELP = (
    "a built-in model (" + ", ".join((*REFERENCE_MODELS, *TINY_MODELS)) + "), a diffusers pipeline or model directory, "
    "or (where it makes sense) a dmquant checkpoint directory"
)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions without splitting words at hyphens (an option like --real-kernels stays whole), and
    keeps the example lines of an epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        text = " ".join(text.split())
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


def _bits(value: str) -> int | str:
    return int(value) if value.isascii() and value.isdigit() else value


def _fraction(value: str) -> float:
    """A number in [0, 1), for argparse."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan  # refused below, with the same message
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


#: Sampling steps of sample / eval / analyze when neither the command line nor the model says.


def _add_sampling_options(parser: argparse.ArgumentParser, num_samples: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--num-samples", type=_positive_int, default=num_samples, help="images to generate (default: %(default)s)"
    )
    group.add_argument(
        "--steps",
        type=_positive_int,
        help=f"sampling steps (default: {DEFAULT_STEPS}, or the number a checkpoint's noise statistics or "
        "bit schedule were made for)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the first batch; batch i uses seed+i (default: 0)")
    group.add_argument("--batch-size", type=_positive_int, default=16, help="samples per batch (default: %(default)s)")
    group.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)"
    )
    group.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default: 0)")
    group.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), help="sampler to use instead of the model's own")


#: Seeds torch's generators take (batch i of a run uses seed + i).
MAX_SEED = 2**63 - 1


def _check_arguments(args: argparse.Namespace) -> None:
    """Values argparse's types let through but no command can use: each a one-line error."""
    guidance = getattr(args, "guidance", None)
    for value in guidance if isinstance(guidance, list) else [guidance]:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise DmquantError(f"--guidance {value}: must be a finite number >= 0")
    eta = getattr(args, "eta", 0.0)
    if not (math.isfinite(eta) and eta >= 0):
        raise DmquantError(f"--eta {eta}: must be a finite number >= 0 (0: deterministic DDIM)")
    if not 0 <= getattr(args, "seed", 0) <= MAX_SEED:
        raise DmquantError(f"--seed {args.seed}: must lie in [0, {MAX_SEED}]")
    if hasattr(args, "device"):
        check_device(args.device)


def _add_real_kernels_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--real-kernels",
        action="store_true",
        help="run a checkpoint's Linear and Conv2d layers on real low-bit kernels (see `dmquant convert`); with "
        "--compile on CUDA, `sample` also times a denoiser call of the FP model and of the converted one and prints "
        "the speed-up",
    )
    _add_path_option(parser)
    _add_compile_option(parser)


def _add_processes_option(parser: argparse.ArgumentParser, shared: str) -> None:
    parser.add_argument(
        "--num-processes",
        type=_positive_int,
        default=1,
        metavar="N",
        help=f"run on N processes launched through accelerate (with --device cuda, one per GPU), {shared}, "
        "gathered by the first process, which alone writes; the same results as one process (default: 1)",
    )


def _launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """This command again, on ``--num-processes`` processes: ``accelerate launch --multi_gpu`` on CUDA; on the
    CPU, torch's launcher with accelerate's state on gloo (accelerate's own starts several CPU processes only
    through MPI). Returns the launcher's exit status."""
    import os
    import subprocess

    count = str(args.num_processes)
    command = [*argv, "--num-processes", "1"]  # the last value given wins: the processes launch nothing more
    env = dict(os.environ)
    if args.device.startswith("cuda"):
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", count, "--num_machines", "1"]
        launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", count]
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run([sys.executable, *launcher, "-m", "dmquant.cli", *command], env=env).returncode


def _add_path_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--every-layer-on-kernels",
        action="store_true",
        help="keep every converted layer on its low-bit kernel; by default, on CUDA, each layer's paths (cuBLASLt, "
        "Triton, bf16 with its dequantized weight; cuDNN's FP8 attention or bf16 SDPA) are timed on calls shaped "
        "like this command's batches and the fastest kept, so that no layer runs slower than in bf16 (with "
        "--compile, timed as they run compiled: a layer's input quantization fuses into the op producing it, "
        "except where none in the compiled graph does (the model's inputs, an attention's output; the table's "
        "'input quantization' column says which); "
        "decisions cached per GPU and shape in $DMQUANT_CACHE_DIR, default ~/.cache/dmquant)",
    )
    parser.add_argument(
        "--min-path-gain",
        type=_fraction,
        default=MIN_PATH_GAIN,
        metavar="FRACTION",
        help="a measured low-bit path replaces bf16 only where it saves this fraction of bf16's time (default: "
        "%(default)s); a layer that saves a little alone can cost more in the model (the fp8 copies its "
        "producer writes, a layout copy), so 0 keeps the fastest however close and can end slower than bf16",
    )


def _add_compile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser (on CUDA with CUDA graphs: mode reduce-overhead). Each distinct set of "
        "per-step quantization parameters (a bit schedule's precisions, per-step activation ranges) gets its own "
        "graph, compiled and captured once and replayed at every step that uses it; the first steps are slow",
    )


def _add_calibration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument(
        "--calib-trajectories",
        type=int,
        metavar="N",
        help="FP trajectories to record calibration data from (default: the recipe's)",
    )
    group.add_argument(
        "--calib-steps",
        type=int,
        metavar="N",
        help="sampling steps of the calibration trajectories (default: the recipe's)",
    )
    group.add_argument(
        "--calib-batch-size",
        type=_positive_int,
        metavar="N",
        help="calibration trajectories sampled at once; on several processes (accelerate launch) the batches "
        "are spread over them (default: the recipe's)",
    )


def _add_reconstruction_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "reconstruction (recipes with a reconstruction section: q-diffusion, ptq4dm)",
        "Block reconstruction optimises each block's weight rounding (and activation step sizes) "
        "against the FP block's output; it is the slow part, so its progress is saved after every "
        "block and rerunning the same command resumes where a killed run stopped.",
    )
    group.add_argument(
        "--recon-iterations",
        type=int,
        metavar="N",
        help="optimisation steps per block in each pass (default: the recipe's; q-diffusion: 2000, then 500)",
    )
    group.add_argument("--no-reconstruction", action="store_true", help="skip the recipe's reconstruction")
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where reconstruction keeps its progress (default: OUTPUT.reconstruction, removed once saved)",
    )


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization")
    group.add_argument(
        "--recipe",
        default="mse",
        help=f"recipe name ({', '.join(available_recipes())}) or path to a YAML/TOML recipe (default: %(default)s)",
    )
    group.add_argument(
        "--w-bits",
        type=_bits,
        metavar="BITS",
        help="weight bits (2-8, 16) or format (fp8_e4m3, fp4_e2m1); overrides the recipe",
    )
    group.add_argument("--a-bits", type=_bits, metavar="BITS", help="activation bits or format; overrides the recipe")


# ---------------------------------------------------------------- commands


# ---------------------------------------------------------------- parser


def _command(commands, name: str, *, help: str, description: str, example: str, run) -> argparse.ArgumentParser:
    """A subcommand with its one-line help, description, an example line, and the function it runs."""
    parser = commands.add_parser(
        name, help=help, description=description, epilog=f"example:\n  {example}", formatter_class=_HelpFormatter
    )
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmquant",
        description="Post-training quantization for diffusion models. Start with `dmquant demo`; "
        "then `dmquant inspect MODEL` to see what a recipe does, `dmquant quantize MODEL -o DIR`, "
        "`dmquant eval DIR` to compare with full precision and `dmquant sample DIR` for images.",
    )
    parser.add_argument("--version", action="version", version=f"dmquant {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        commands,
        "quantize",
        help="calibrate on the model's own trajectories and save a quantized checkpoint",
        description="Record calibration data from the FP model's sampling trajectories (on your prompts with "
        "--prompts/--prompt, your classes with --labels), quantize its denoiser as the recipe says, and save a "
        "checkpoint directory. A diffusers pipeline directory gives a pipeline directory: its other components "
        "as they were, the denoiser quantized (load it with dmquant.load_pipeline).",
        example="dmquant quantize tiny-unet -o out/w4a8 --recipe mse --w-bits 4 --a-bits 8",
        run=cmd_quantize,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    _add_recipe_options(p)
    _add_calibration_options(p)
    group = p.add_argument_group("calibration inputs (default: the model's own)")
    group.add_argument("--prompts", metavar="FILE", help="text-to-image models: calibrate on these prompts, one a line")
    group.add_argument("--prompt", action="append", help="a calibration prompt (repeatable; added to --prompts)")
    group.add_argument(
        "--labels", type=lambda s: [int(v) for v in s.split(",")], help="class-conditional models: classes, e.g. 1,2,3"
    )
    _add_reconstruction_options(p)
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep the denoiser's weights in host memory and move one block at a time to --device while "
        "calibrating and reconstructing: for a denoiser larger than the GPU (FLUX's 12 B parameters on one 80 GB "
        "GPU), or one that leaves no room for reconstruction's caches. The same result, slower (every model call "
        "copies each block to the GPU and back); needs a GPU --device and at least the denoiser's size twice in "
        "host memory (the FP copy reconstruction compares against). A model that fits the GPU runs faster without",
    )
    p.add_argument(
        "--scheduler", choices=sorted(SCHEDULER_NAMES), help="sampler for calibration instead of the model's own"
    )
    _add_processes_option(
        p, "each recording a share of the calibration batches and reconstructing on a share of the samples"
    )

    p = _command(
        commands,
        "sample",
        help="generate images: a grid PNG and an .npz of the samples",
        description="Generate images with an FP model or a quantized checkpoint.",
        example="dmquant sample out/w4a8 --labels 1,2,3 --num-samples 9 -o out/w4a8.png",
        run=cmd_sample,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("-o", "--output", default="samples.png", help="grid PNG to write; the .npz goes beside it")
    p.add_argument("--labels", type=lambda s: [int(v) for v in s.split(",")], help="class labels, comma-separated")
    p.add_argument("--prompt", action="append", help="prompt for text-conditional models (repeatable)")
    p.add_argument("--base", help="FP model a checkpoint was made from, if not the recorded one")
    _add_real_kernels_option(p)
    _add_sampling_options(p, num_samples=16)
    _add_processes_option(p, "each sampling a share of the batches")

    p = _command(
        commands,
        "eval",
        help="compare a quantized checkpoint with its FP model",
        description="Sample FP and quantized models from the same noise and report PSNR/SSIM of "
        "the final samples, per-step SQNR of the noise estimate, size and BOPs.",
        example="dmquant eval out/w4a8 --num-samples 64 --json out/w4a8-eval.json",
        run=cmd_eval,
    )
    p.add_argument("model", help="a dmquant checkpoint directory")
    p.add_argument("--base", help="the FP model to compare with (default: the one the checkpoint records)")
    p.add_argument("--json", help="also write the results to this JSON file")
    _add_real_kernels_option(p)
    _add_sampling_options(p, num_samples=16)
    _add_processes_option(p, "each sampling a share of the batches")

    p = _command(
        commands,
        "convert",
        help="run a checkpoint's Linear and Conv2d layers on real low-bit kernels, and check them",
        description="Convert a quantized checkpoint's layers to real low-bit ones (weights stored as int8, packed "
        "int4 or fp8 codes; activations quantized just before each kernel) and list what each layer became. With "
        "--num-samples, sample the simulated and the converted model from the same seeds and report their PSNR. "
        "On CPU the converted layers take the reference path and match bit for bit; on CUDA they run on the "
        "kernels. `dmquant sample` and `dmquant eval` take --real-kernels to sample with converted layers.",
        example="dmquant convert out/w8a8 --num-samples 16 --device cuda",
        run=cmd_convert,
    )
    p.add_argument("model", help="a dmquant checkpoint directory")
    p.add_argument("--base", help="the FP model the checkpoint was made from, if not the recorded one")
    p.add_argument(
        "--dynamic-fp8",
        action="store_true",
        help="Linear layers with fp8 activations take per-token scales from each input, not the calibrated one",
    )
    p.add_argument(
        "--fp8-exact-accumulation",
        action="store_true",
        help="fp8 GEMMs on cuBLASLt (Linear, 1x1 conv) promote their partial sums to fp32, as the simulated model "
        "assumes, instead of accumulating in the tensor cores' reduced precision as torchao and TensorRT do (the "
        "default: faster kernels, within the fidelity floor on the zoo models; bench/fidelity.py measures both)",
    )
    _add_path_option(p)
    _add_compile_option(p)
    _add_sampling_options(p, num_samples=0)

    p = _command(
        commands,
        "analyze",
        help="rank blocks and modules by how much quantization noise they make (SQNR per step)",
        description="Quantize a model with a recipe's ranges (or take a checkpoint) and measure, along FP "
        "trajectories at every step, the SQNR of each block's output with only that block quantized (global) "
        "and of each quantized layer's output on its own input (local). Prints the rankings and writes "
        "sensitivity.json, blocks.png (blocks x steps heatmap) and modules.png (the most sensitive modules).",
        example="dmquant analyze ddpm-glyphs32 --recipe minmax --w-bits 4 --a-bits 8 -o out/sqnr",
        run=cmd_analyze,
    )
    p.add_argument("model", help=MODEL_HELP + ", or a dmquant checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="directory for sensitivity.json and the plots")
    p.add_argument("--base", help="for a checkpoint: its FP model (default: the one it records)")
    p.add_argument("--top", type=_positive_int, default=15, help="rows of each ranking to print (default: %(default)s)")
    _add_recipe_options(p)
    _add_calibration_options(p)
    _add_sampling_options(p, num_samples=4)

    p = _command(
        commands,
        "inspect",
        help="list the layers and how they are (or would be) quantized",
        description="For a checkpoint: its layer report. For an FP model: what a recipe would do "
        "to each layer, including the split shortcut convs it finds.",
        example="dmquant inspect tiny-unet --recipe mse --w-bits 4",
        run=cmd_inspect,
    )
    p.add_argument("model", help=MODEL_HELP)
    _add_recipe_options(p)

    p = _command(
        commands,
        "demo",
        help="the whole job on a shipped model: quantize, save, reload, compare, report",
        description="Quantize a model at W8A8 and W4A8, save and reload the checkpoints, sample them "
        "from the same seeds as FP, and write a report (markdown + HTML: table, FP-vs-quantized grids, "
        "per-step SQNR plot). On the zoo's glyph models the table has class accuracy and "
        "FID/sFID-proxies with their real-vs-real floor.",
        example="dmquant demo --num-samples 512 --steps 50 -o runs/demo-512",
        run=cmd_demo,
    )
    p.add_argument("--model", default="ddpm-glyphs32", help="model to run on (default: %(default)s)")
    p.add_argument("--recipe", default="mse", help="recipe (default: %(default)s)")
    p.add_argument("-o", "--output", help="new directory for the report (default: runs/<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it holds an earlier demo report")
    p.add_argument("--num-samples", type=_positive_int, default=256, help="samples per setting (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=20, help="sampling steps (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="samples per batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch (default: 0)")
    _add_calibration_options(p)

    zoo = commands.add_parser(
        "zoo",
        help="the shipped reference models: list, train, evaluate",
        description="dmquant's reference zoo: glyph-image diffusion models and the GlyphNet feature "
        "network behind the FID-proxies, trained by this command (on a GPU) and shipped as fp16 safetensors.",
    )
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    _command(
        zoo_commands,
        "list",
        help="the zoo's models, whether they ship, and their FP quality",
        description="List the zoo's models with their model cards' headline numbers.",
        example="dmquant zoo list",
        run=cmd_zoo_list,
    )
    p = _command(
        zoo_commands,
        "train",
        help="train (or resume) a zoo model and export it",
        description="Train a zoo model by its plan. State is saved every few thousand steps and on "
        "--max-minutes, and the same command resumes. Whenever it stops, the EMA weights are "
        "exported (fp16 safetensors + model card) to --export, by default into the package so "
        "the model becomes the shipped one.",
        example="dmquant zoo train ddpm-glyphs32 --device cuda --max-minutes 8",
        run=cmd_zoo_train,
    )
    p.add_argument("name", help="zoo model (see `dmquant zoo list`)")
    p.add_argument("--state", help="training state directory (default: runs/zoo/NAME)")
    p.add_argument("--export", help="where the trained model goes (default: the package's zoo/weights/NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace --export if it holds something else")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes (state is saved; rerun resumes)")
    p.add_argument("--steps", type=_positive_int, help="total steps instead of the plan's")
    p = _command(
        zoo_commands,
        "evaluate",
        help="measure a zoo diffusion model's FP quality and write it into its model card",
        description="Sample a zoo model with DDIM, asking for held-out glyphs' classes (or prompts), and judge "
        "the samples with GlyphNet: class accuracy (and foreground-colour accuracy for the text-to-image model), "
        "FID/sFID/KID-proxies with their real-vs-real floors, IS, precision/recall.",
        example="dmquant zoo evaluate ddpm-glyphs32 --device cuda --num-samples 10000 --guidance 1 2",
        run=cmd_zoo_evaluate,
    )
    p.add_argument("name", help="zoo model (see `dmquant zoo list`)")
    p.add_argument("--model-dir", help="model directory to evaluate (default: the shipped one)")
    p.add_argument("--num-samples", type=_positive_int, default=10_000, help="samples (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=100, help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="guidance scales (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch (default: 0)")
    p.add_argument("--batch-size", type=_positive_int, default=500, help="samples per batch (default: %(default)s)")
    p.add_argument("--grid", help="also write a PNG grid of the first 64 samples here")
    _add_processes_option(p, "each sampling a share of the batches")
    p.add_argument(
        "--features",
        choices=("glyphnet", "inception"),
        default="glyphnet",
        help="feature network of the distribution metrics (default: glyphnet; class accuracy always uses it)",
    )
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="the FID Inception weights file pt_inception-2015-12-05-6726825d.pth "
        "(default: $DMQUANT_INCEPTION_WEIGHTS); never downloaded",
    )

    for sub in [*commands.choices.values(), *zoo_commands.choices.values()]:
        if sub is zoo:
            continue
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        sub.add_argument("--device", default="cpu", help="torch device to run on, e.g. cuda (default: %(default)s)")
    return parser


def _log_to_stderr(quiet: bool) -> None:
    """Show dmquant's log messages (what a run decided, e.g. a correction that does nothing) on stderr."""
    logger = logging.getLogger("dmquant")
    if not any(getattr(handler, "dmquant_cli", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dmquant: %(message)s"))
        handler.dmquant_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import device, is_main_process, num_processes

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if hasattr(args, "quiet") and not is_main_process():  # progress and log messages from the main process
        args.quiet = True
    _log_to_stderr(getattr(args, "quiet", False))
    try:
        _check_arguments(args)
        if not hasattr(args, "num_processes") and num_processes() > 1:
            raise DmquantError(
                f"dmquant {args.command} runs on one process; sample, eval, quantize and zoo evaluate take several"
            )
        if getattr(args, "num_processes", 1) > 1:
            if num_processes() > 1:
                raise DmquantError("--num-processes: this is already one of several launched processes; leave it out")
            return _launch(args, argv)
        if getattr(args, "device", "cpu") != "cpu":  # under a launcher of several processes, each on its own GPU
            args.device = str(device(args.device))
        return args.run(args)
    except DmquantError as error:
        print(f"dmquant {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine refused a read or write (no space, no such place, no permission)
        where = f"{error.filename}: " if error.filename else ""
        print(f"dmquant {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dmquant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
