"""The ``dmquant`` command: quantize, sample, eval, analyze, inspect, demo.

Each command imports what it runs on when it runs: ``dmquant --help`` and argument errors answer without
importing torch (the names the options offer come from :mod:`dmquant.catalog`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .atomic import check_output, check_writable, output_lock
from .catalog import REFERENCE_MODELS, SCHEDULER_NAMES, TINY_MODELS, available_recipes
from .errors import DmquantError

if TYPE_CHECKING:
    from .config import QuantConfig
    from .models import DiffusionModel
    from .verdict import Verdict

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


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


#: Sampling steps of sample / eval / analyze when neither the command line nor the model says.
DEFAULT_STEPS = 20


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


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options of the command line, as ``generate`` and ``compare`` take them."""
    return {
        "num_inference_steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "guidance_scale": args.guidance,
        "eta": args.eta,
        "progress": not args.quiet,
    }


#: Seeds torch's generators take (batch i of a run uses seed + i).
MAX_SEED = 2**63 - 1


def _check_device(name: str) -> None:
    """``name`` is a torch device this machine has (``cuda`` needs CUDA, ``cuda:3`` a fourth GPU)."""
    if name == "cpu":  # the default: answered without importing torch
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise DmquantError(f"--device {name}: not a torch device ({error})") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", lambda: False)()
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if (device.index or 0) >= count:
        raise DmquantError(f"--device {name}: no such device on this machine ({count} {device.type} device(s))")


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
        _check_device(args.device)


def _prepared(model: DiffusionModel, args: argparse.Namespace) -> DiffusionModel:
    """The model on ``--device``, with ``--scheduler`` applied where the command has it, an
    unset ``--steps`` set to what the (first) model opened needs, and a quantized denoiser
    converted to low-bit layers under ``--real-kernels``."""
    from .api import INFO_ATTRIBUTE, required_steps
    from .kernels.convert import REPORT_ATTRIBUTE, convert_model

    required = required_steps(model.denoiser)
    if getattr(args, "steps", 0) is None:
        args.steps = required or DEFAULT_STEPS
    elif hasattr(args, "steps") and required is not None and args.steps != required:
        raise DmquantError(
            f"--steps {args.steps}: this checkpoint's per-step parameters (ranges, bit schedule or noise "
            f"statistics) were made for {required} steps; sample with --steps {required}"
        )
    converting = getattr(args, "real_kernels", False) and getattr(model.denoiser, INFO_ATTRIBUTE, None) is not None
    if converting:
        model = model.with_denoiser(convert_model(model.denoiser, inplace=True))
        print(getattr(model.denoiser, REPORT_ATTRIBUTE).summary())
    model = model.to(args.device)
    if converting:
        _choose_kernel_paths(model, args)
    scheduler = getattr(args, "scheduler", None)
    return model.with_scheduler(scheduler) if scheduler else model


def _choose_kernel_paths(converted: DiffusionModel, args: argparse.Namespace):
    """On CUDA, unless ``--every-layer-on-kernels``: each converted layer's fastest path, measured on calls shaped
    like this command's batches (``dmquant.kernels.paths``), with what was chosen printed; the report, or None."""
    import torch

    from .deployment import choose_kernel_paths

    if torch.device(args.device).type != "cuda" or args.every_layer_on_kernels:
        return None
    report = choose_kernel_paths(converted, args.batch_size, args.guidance, progress=not args.quiet)
    print(report.summary())
    return report


def _compiled(model: DiffusionModel, args: argparse.Namespace) -> DiffusionModel:
    """The model with its denoiser compiled in place under ``--compile`` (with CUDA graphs on CUDA). One graph per
    per-step parameter set, for the full batches and for a smaller last one: dynamo's recompile limit is raised to
    twice the model's number of sets, so that no step falls back to eager."""
    import torch

    from .core.quantizer import quantizers
    from .kernels.dispatch import load_kernels

    if args.compile:
        on_cuda = torch.device(args.device).type == "cuda"
        if on_cuda:
            load_kernels()
        parameter_sets = max((quantizer.num_steps for quantizer in quantizers(model.denoiser)), default=1)
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * parameter_sets)
        model.denoiser.compile(mode="reduce-overhead" if on_cuda else None)
    return model


def _recipe(args: argparse.Namespace, bits: tuple = (None, None)) -> QuantConfig:
    """The recipe with the command line's overrides (bits, calibration size, reconstruction) applied and validated."""
    from .config import load_recipe, with_overrides

    weight_bits = bits[0] if bits[0] is not None else getattr(args, "w_bits", None)
    activation_bits = bits[1] if bits[1] is not None else getattr(args, "a_bits", None)
    config = load_recipe(args.recipe).with_bits(weight_bits, activation_bits)
    overrides = {
        "calibration.num_trajectories": getattr(args, "calib_trajectories", None),
        "calibration.num_inference_steps": getattr(args, "calib_steps", None),
        "calibration.batch_size": getattr(args, "calib_batch_size", None),
    }
    if getattr(args, "no_reconstruction", False):
        overrides["reconstruction.enabled"] = False
    steps = getattr(args, "recon_iterations", None)
    if steps is not None:
        overrides["reconstruction.iterations"] = steps
        overrides["reconstruction.activation_iterations"] = steps if config.reconstruction.activation_iterations else 0
    return with_overrides(config, {key: value for key, value in overrides.items() if value is not None})


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
        "Triton, bf16 with its dequantized weight) are timed on calls shaped like this command's batches and the "
        "fastest kept, so that no layer runs slower than in bf16 (decisions cached per GPU and shape in "
        "$DMQUANT_CACHE_DIR, default ~/.cache/dmquant)",
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


def _calibration_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values, then the lines of ``--prompts FILE`` (blank lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DmquantError(f"--prompts {args.prompts}: cannot read it ({error})") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise DmquantError(f"--prompts {args.prompts}: no prompts in it (one prompt a line)")
        prompts += from_file
    return prompts


def _reconstruction_state(config: QuantConfig, output: Path, args: argparse.Namespace) -> Path:
    """Where a reconstruction keeps its progress (``--state-dir``, default OUTPUT.reconstruction): checked
    writable now, since it is written along the way, and any progress found there announced as resumed."""
    from .recon.state import read_progress

    state_dir = Path(args.state_dir) if args.state_dir else output.with_name(output.name + ".reconstruction")
    if config.reconstruction.enabled:
        check_output(state_dir, overwrite=True, replaceable=lambda _: True, what="reconstruction progress")
        progress = read_progress(state_dir)
        if progress is not None:
            print(f"resuming the reconstruction saved in {state_dir} ({len(progress['units'])} units done)")
    return state_dir


def _remove_reconstruction_state(config: QuantConfig, state_dir: Path, args: argparse.Namespace) -> None:
    """The default progress directory goes once the result is saved; a ``--state-dir`` given is kept."""
    from .recon.state import remove_state

    if config.reconstruction.enabled and not args.state_dir:
        remove_state(state_dir)


def _quantize_pipeline(args: argparse.Namespace, config: QuantConfig, prompts: list[str]) -> int:
    """``dmquant quantize PIPELINE_DIR``: the pipeline with its denoiser quantized, as a pipeline directory."""
    from .pipelines import check_pipeline_target

    output = check_pipeline_target(args.output, overwrite=args.overwrite)
    with output_lock(output):  # held until saved: a second run on OUT fails now, not after calibrating
        return _quantize_and_save_pipeline(args, config, prompts, output)


def _quantize_and_save_pipeline(args: argparse.Namespace, config: QuantConfig, prompts: list[str], output: Path) -> int:
    from .models import read_pipeline
    from .pipelines import quantize_pipeline, save_pipeline

    pipe = read_pipeline(Path(args.model)).to(args.device)
    print(f"quantizing the denoiser of pipeline {args.model} with recipe {config.name}")
    state_dir = _reconstruction_state(config, output, args)
    started = time.perf_counter()
    quantize_pipeline(pipe, config, prompts=prompts, labels=args.labels, progress=not args.quiet, state_dir=state_dir)
    save_pipeline(pipe, output, overwrite=args.overwrite)
    _remove_reconstruction_state(config, state_dir, args)
    print(f"quantized in {time.perf_counter() - started:.1f} s; pipeline saved to {output} (dmquant.load_pipeline)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .api import quantize
    from .checkpoint import check_target
    from .distributed import is_main_process, num_processes
    from .jobs import open_model

    config = _recipe(args)
    prompts = _calibration_prompts(args)
    if (Path(args.model) / "model_index.json").exists():
        if num_processes() > 1:
            raise DmquantError(f"{args.model}: a pipeline directory is quantized by one process; launch one")
        return _quantize_pipeline(args, config, prompts)
    model = _prepared(open_model(args.model), args).with_defaults(prompts=prompts, labels=args.labels)
    if not is_main_process():  # records its share of the calibration trajectories; the main process saves
        quantize(model, config, progress=False)
        return 0
    output = check_target(args.output, overwrite=args.overwrite)
    with output_lock(output):  # held until saved: a second run on OUT fails now, not after calibrating
        return _quantize_and_save(model, config, output, args)


def _quantize_and_save(model: DiffusionModel, config: QuantConfig, output: Path, args: argparse.Namespace) -> int:
    """Calibrate, quantize (resuming a reconstruction from its saved progress) and save to ``output``."""
    from .api import info, quantize, save

    print(
        f"quantizing {model.name} with recipe {config.name}: weights {config.weight.describe()}, "
        f"activations {config.activation.describe()}"
    )
    state_dir = _reconstruction_state(config, output, args)
    started = time.perf_counter()
    try:
        quantized = quantize(model, config, progress=not args.quiet, state_dir=state_dir)
    except KeyboardInterrupt:
        if config.reconstruction.enabled and state_dir.exists():
            print(f"the finished blocks are kept in {state_dir}: rerun the same command to resume", file=sys.stderr)
        raise
    save(quantized.denoiser, output, overwrite=args.overwrite)
    _remove_reconstruction_state(config, state_dir, args)
    report = info(quantized.denoiser).report
    print(f"{report.num_quantized} layers quantized in {time.perf_counter() - started:.1f} s; saved to {output}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if Path(args.output).suffix.lower() != ".png":
        raise DmquantError(f"--output {args.output}: the grid is written as PNG; give a name ending in .png")
    check_writable(Path(args.output).parent)
    import torch

    from .api import info
    from .distributed import is_main_process
    from .jobs import generate, open_model
    from .report import save_image_grid, save_samples_npz

    model = _compiled(_prepared(open_model(args.model, base=args.base), args), args)
    if args.real_kernels and args.compile and torch.device(args.device).type == "cuda":
        from .deployment import speedup_line

        fp = _compiled(_prepared(open_model(args.base or info(model.denoiser).source), args), args)
        line = speedup_line(fp, model, args.batch_size, args.guidance)
        if is_main_process():
            print(line)
        del fp
    images, conditioning = generate(
        model, args.num_samples, labels=args.labels, prompts=args.prompt, **_sampling_kwargs(args)
    )
    if not is_main_process():  # every process sampled its share; the main one writes them all
        return 0
    grid = save_image_grid(images, args.output)
    extra = {k: v.numpy() for k, v in conditioning.cond.items() if k == "class_labels"}
    npz = save_samples_npz(Path(args.output).with_suffix(".npz"), images, **extra)
    print(f"wrote {grid} and {npz}")
    return 0


def _compare_table(results: dict[str, Any]) -> str:
    from .report import markdown_table

    return markdown_table(
        [
            {"metric": "PSNR vs FP (dB)", "value": results["psnr_db"]},
            {"metric": "SSIM vs FP", "value": results["ssim"]},
            {"metric": "noise-estimate SQNR, mean over steps (dB)", "value": results["sqnr_db_mean"]},
            {"metric": "noise-estimate SQNR, worst step (dB)", "value": results["sqnr_db_min"]},
            {"metric": "size (MiB)", "value": results["size_bytes"] / 2**20},
            {"metric": "FP size (MiB)", "value": results["fp_size_bytes"] / 2**20},
            {"metric": "compression", "value": results["compression"]},
            {"metric": "GBOPs per denoiser call (mean over the steps)", "value": results["gbops_per_call"]},
            {"metric": "FP GBOPs per denoiser call", "value": results["fp_gbops_per_call"]},
            {"metric": "GBOPs per trajectory", "value": results["gbops_per_trajectory"]},
        ]
    )


def _json_ready(results: dict[str, Any]) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean({k: v for k, v in results.items() if k != "images"})


def cmd_eval(args: argparse.Namespace) -> int:
    from .api import info
    from .checkpoint import MANIFEST_FILE
    from .distributed import is_main_process
    from .jobs import compare, open_model, quantized_checkpoint
    from .provenance import environment
    from .report import markdown_table
    from .verdict import Verdict

    if quantized_checkpoint(Path(args.model)) is None:
        raise DmquantError(
            f"{args.model}: not a dmquant checkpoint directory (no {MANIFEST_FILE}); make one with `dmquant quantize`"
        )
    if args.json:
        check_writable(Path(args.json).parent)
    quantized = _prepared(open_model(args.model, base=args.base), args)
    source = args.base or info(quantized.denoiser).source
    quantized, fp = (_compiled(model, args) for model in (quantized, _prepared(open_model(source), args)))
    label = info(quantized.denoiser).config.name
    results = compare(fp, quantized, num_samples=args.num_samples, label=label, **_sampling_kwargs(args))
    results["verdict"] = vars(_eval_verdict(fp, results, args, label))
    if not is_main_process():  # every process sampled its share; the main one reports and writes
        return 0
    results["run"] = {
        "checkpoint": str(Path(args.model).resolve()),
        "base": source,
        "seed": args.seed,
        "guidance_scale": args.guidance if args.guidance is not None else fp.guidance_scale,
        "eta": args.eta,
        "torch_device": args.device,
        **environment(),
        "dmquant": __version__,
    }
    print(f"{args.model} vs FP {source} ({args.num_samples} samples, {args.steps} steps, seed {args.seed})\n")
    print(_compare_table(results))
    print("\nper step:\n" + markdown_table(results["steps"], ["step_index", "timestep", "sqnr_db", "mse"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_json_ready(results), indent=2))
        print(f"\nwrote {args.json}")
    print("\nverdict: " + Verdict(**results["verdict"]).line())
    return 0


def _eval_verdict(fp: DiffusionModel, results: dict[str, Any], args: argparse.Namespace, recipe: str) -> Verdict:
    """The quantized model's verdict: on the zoo's glyph models, class accuracy and FID-proxy against FP
    sampled from other seeds (sampled here); on others, no metric has a seed spread and the verdict says so."""
    from .demo import glyph_judge, glyph_metrics
    from .jobs import generate
    from .verdict import OTHER_SEEDS, OTHER_SEEDS_OFFSET, judge

    row = {"PSNR vs FP (dB)": results["psnr_db"]}
    references = glyph_judge(fp, args.num_samples, args.device, not args.quiet)
    if references is None:
        return judge(Path(args.model).name, row, {}, None, recipe=recipe)
    options = {**_sampling_kwargs(args), "seed": args.seed + OTHER_SEEDS_OFFSET}
    other_images, conditioning = generate(fp, args.num_samples, desc=OTHER_SEEDS, **options)
    labels = conditioning.cond.get("class_labels")
    measured = {
        name: glyph_metrics(references, results["images"][name], labels, not args.quiet) for name in ("fp", "quantized")
    }
    other = glyph_metrics(references, other_images, labels, not args.quiet)
    results["glyph_metrics"] = {**measured, "fp_other_seeds": other}
    return judge(Path(args.model).name, {**row, **measured["quantized"]}, measured["fp"], other, recipe=recipe)


def cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from .api import info, quantize, sampling_hooks
    from .config import with_overrides
    from .jobs import open_model, quantized_checkpoint
    from .precision.sqnr import analyze_sensitivity
    from .report import markdown_table, sensitivity_bars, sensitivity_heatmap

    check_writable(Path(args.output))
    if quantized_checkpoint(Path(args.model)) is not None:
        quantized = _prepared(open_model(args.model, base=args.base), args)
        fp = _prepared(open_model(args.base or info(quantized.denoiser).source), args)
        what = f"checkpoint {args.model}"
    else:
        fp = _prepared(open_model(args.model), args)
        # the analysis looks at the ranges the recipe gives
        config = with_overrides(_recipe(args), {"reconstruction.enabled": False, "correction.enabled": False})
        quantized = quantize(fp, config, progress=not args.quiet)
        what = f"{args.model} with recipe {config.name} ({config.weight.describe()}, {config.activation.describe()})"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    sensitivity = analyze_sensitivity(
        fp.denoiser,
        quantized.denoiser,
        fp.scheduler,
        num_inference_steps=args.steps,
        conditioning=fp.make_conditioning(args.num_samples, guidance_scale=args.guidance),
        generator=torch.Generator().manual_seed(args.seed),
        hooks=sampling_hooks(quantized.denoiser),
        progress=not args.quiet,
    )
    print(f"SQNR analysis of {what}: {args.num_samples} trajectories, {args.steps} steps\n")
    rows = lambda ranking: [{"name": n, "SQNR (dB)": v} for n, v in ranking[: args.top]]  # noqa: E731
    print("blocks, each quantized alone (global; most sensitive first):\n")
    print(markdown_table(rows(sensitivity.block_ranking()), ["name", "SQNR (dB)"]))
    print("\nmodules on their own input in the quantized model (local; most sensitive first):\n")
    print(markdown_table(rows(sensitivity.module_ranking()), ["name", "SQNR (dB)"]))
    (output / "sensitivity.json").write_text(json.dumps(_json_ready(sensitivity.to_json()), indent=2))
    written = [output / "sensitivity.json", sensitivity_bars(sensitivity.module_ranking(), output / "modules.png")]
    if sensitivity.blocks:
        written.append(sensitivity_heatmap(sensitivity.blocks, sensitivity.timesteps, output / "blocks.png"))
    print("\nwrote " + ", ".join(str(path) for path in written))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from .api import info
    from .config import with_overrides
    from .core.attach import attach_quantizers, find_shortcut_splits
    from .denoiser import Denoiser
    from .jobs import open_model
    from .report import markdown_table

    model = _prepared(open_model(args.model), args)
    if getattr(model.denoiser, "dmquant_info", None) is not None:
        quant = info(model.denoiser)
        title = f"{args.model}: recipe {quant.config.name}, quantized checkpoint"
        report = quant.report
    else:
        config = _recipe(args)
        schedule = config.step_precision
        if schedule.enabled and schedule.switch_step is None:
            print(
                f"note: recipe {config.name} switches the activations to {schedule.late_bits} bits at a step chosen "
                "while quantizing (from the measured SQNR); shown: the bits before the switch\n"
            )
            config = with_overrides(config, {"step_precision.enabled": False})
        denoiser = Denoiser(model.denoiser)
        conditioning = model.make_conditioning(1, guidance_scale=1.0)
        x = torch.zeros(1, denoiser.in_channels, denoiser.sample_size, denoiser.sample_size, device=denoiser.device)
        t = torch.tensor([500], device=denoiser.device)
        cond = conditioning.to(denoiser.device).model_cond()
        with torch.no_grad():
            splits = find_shortcut_splits(model.denoiser, lambda: denoiser(x, t, cond)) if config.split_shortcut else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = attach_quantizers(model.denoiser, config, splits=splits)
        title = f"{args.model}: what recipe {config.name} would do (not calibrated)"
    print(title + "\n")
    print(markdown_table(report.rows(), ["name", "kind", "weight", "activation", "granularity", "split", "rule"]))
    split = sum(1 for layer in report.layers if layer.split)
    print(f"\n{report.num_quantized} of {len(report.layers)} layers quantized, {split} with a split shortcut input")
    for pattern in report.unmatched_rules:
        print(f"warning: rule {pattern!r} matches no layer")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import MANIFEST_FILE
    from .eval.images import psnr, to_unit_range
    from .jobs import generate, open_model, quantized_checkpoint
    from .kernels.convert import REPORT_ATTRIBUTE, convert_model
    from .report import markdown_table

    if quantized_checkpoint(Path(args.model)) is None:
        raise DmquantError(
            f"{args.model}: not a dmquant checkpoint directory (no {MANIFEST_FILE}); make one with `dmquant quantize`"
        )
    simulated = _prepared(open_model(args.model, base=args.base), args)
    converted = simulated.with_denoiser(
        convert_model(
            simulated.denoiser, dynamic_fp8=args.dynamic_fp8, fp8_fast_accumulation=not args.fp8_exact_accumulation
        )
    )
    paths = _choose_kernel_paths(converted, args)
    converted = _compiled(converted, args)
    report = getattr(converted.denoiser, REPORT_ATTRIBUTE)
    print(f"{args.model}: {report.summary()}\n")
    print(markdown_table(report.layers, ["name", "kind", "weight", "group_size", "activation"]))
    if paths is not None and paths.choices:
        rows = paths.rows()
        print("\neach layer's path on this GPU and the time of each candidate per call:\n")
        print(markdown_table(rows, list(rows[0])))
    for name, reason in report.kept.items():
        print(f"kept simulated: {name}: {reason}")
    if args.num_samples:
        kwargs = _sampling_kwargs(args)
        expected, _ = generate(simulated, args.num_samples, **kwargs)
        got, _ = generate(converted, args.num_samples, **kwargs)
        print(
            f"\nconverted vs simulated, {args.num_samples} samples from the same seeds on {args.device}: "
            f"PSNR {psnr(to_unit_range(expected), to_unit_range(got)).item():.1f} dB (inf: identical)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, demo_table, run_demo

    output = Path(args.output or time.strftime("runs/%Y%m%d-%H%M%S"))
    options = DemoOptions(
        num_samples=args.num_samples,
        num_inference_steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(
        f"dmquant demo on {args.model}: quantize at W8A8 and W4A8 (recipe {args.recipe}), save, reload, and "
        f"compare with FP on {args.num_samples} samples of {args.steps} steps; report in {output}/\n"
    )
    result = run_demo(
        args.model,
        lambda w, a: _recipe(args, bits=(w, a)),
        output,
        options=options,
        device=args.device,
        recipe_name=args.recipe,
        overwrite=args.overwrite,
    )
    print("\n" + demo_table(result))
    if result.floors:
        print(
            f"\nFID-proxy floor (real vs real, N={args.num_samples}): {result.floors['fid']:.3g}; "
            f"sFID-proxy floor: {result.floors['sfid']:.3g}"
        )
    print(f"\nreport: {result.report} (and report.html); total {result.total_seconds:.0f} s")
    if args.model.startswith("tiny-"):
        print("note: the tiny built-in models are random-initialised; their samples look like nothing")
    print("\n" + "\n".join("verdict: " + verdict.line() for verdict in result.verdicts))
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from .report import markdown_table
    from .zoo.reference import ZOO, read_model_card

    rows = []
    for entry in ZOO.values():
        card = read_model_card(entry.directory)
        quality = (card.get("quality") or {}).get("results") or [{}]
        rows.append(
            {
                "name": entry.name,
                "shipped": "yes" if card else "no",
                "parameters (M)": card["parameters"] / 1e6 if card else math.nan,
                "steps trained": card.get("training", {}).get("steps_done", 0),
                "class accuracy": quality[0].get("class_accuracy", card.get("test_accuracy", "-")),
                "FID-proxy (floor)": f"{quality[0]['fid']:.2f} ({quality[0]['fid_floor']:.2f})"
                if "fid" in quality[0]
                else "-",
                "description": entry.description,
            }
        )
    print(markdown_table(rows))
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    from .zoo_jobs import train_zoo_model

    state = Path(args.state or f"runs/zoo/{args.name}")
    result = train_zoo_model(
        args.name,
        state_dir=state,
        export_dir=args.export,
        device=args.device,
        max_minutes=args.max_minutes,
        steps=args.steps,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    status = "finished" if result.finished else "stopped on the time limit (run again to resume)"
    print(f"{args.name}: {status} at step {result.step} after {result.elapsed_s / 60:.1f} min; state in {state}/")
    return 0


def cmd_zoo_evaluate(args: argparse.Namespace) -> int:
    from .distributed import is_main_process
    from .report import markdown_table
    from .zoo_jobs import evaluate_zoo_model

    features = None
    if args.features == "inception":
        from .eval.inception import InceptionFeatures

        features = InceptionFeatures.from_weights(args.inception_weights).to(args.device)
    card = evaluate_zoo_model(
        args.name,
        features=features,
        model_dir=args.model_dir,
        num_samples=args.num_samples,
        num_inference_steps=args.steps,
        guidance_scales=tuple(args.guidance),
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        grid=args.grid,
        progress=not args.quiet,
    )
    columns = (
        "guidance_scale",
        "class_accuracy",
        "colour_accuracy",
        "fid",
        "fid_floor",
        "sfid",
        "sfid_floor",
        "precision",
        "recall",
    )
    section = "quality" if features is None else f"quality_{features.name}"
    if not is_main_process():
        return 0
    print(markdown_table([{k: row[k] for k in columns if k in row} for row in card[section]["results"]]))
    return 0


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
        "--scheduler", choices=sorted(SCHEDULER_NAMES), help="sampler for calibration instead of the model's own"
    )
    _add_processes_option(p, "each recording a share of the calibration batches (the rest runs on each)")

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
