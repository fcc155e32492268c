"""What each ``dmquant`` command runs (the parser and ``main`` are :mod:`dmquant.cli`).

Each command imports what it runs on when it runs: ``dmquant --help`` and argument errors answer without
importing torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .atomic import check_output, check_writable, output_lock
from .errors import DmquantError

if TYPE_CHECKING:
    from .config import QuantConfig
    from .models import DiffusionModel
    from .verdict import Verdict

#: Sampling steps when neither the command line nor a checkpoint's per-step parts give them.
DEFAULT_STEPS = 20


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


def check_device(name: str) -> None:
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
    model = model.to("cpu" if getattr(args, "offload", False) else args.device)  # offloaded: run on --device
    if converting:
        _choose_kernel_paths(model, args)
    scheduler = getattr(args, "scheduler", None)
    return model.with_scheduler(scheduler) if scheduler else model


def _choose_kernel_paths(converted: DiffusionModel, args: argparse.Namespace):
    """On CUDA, unless ``--every-layer-on-kernels``: each converted layer's fastest path, measured on calls shaped
    like this command's batches (``dmquant.kernels.paths``; as they run compiled with ``--compile``), kept over bf16
    where it saves ``--min-path-gain`` of bf16's time, with what was chosen printed; the report, or None."""
    import torch

    from .deployment import choose_kernel_paths

    if torch.device(args.device).type != "cuda" or args.every_layer_on_kernels:
        return None
    compiled = getattr(args, "compile", False)
    report = choose_kernel_paths(
        converted,
        args.batch_size,
        args.guidance,
        compiled=compiled,
        min_gain=args.min_path_gain,
        progress=not args.quiet,
    )
    print(report.summary())
    return report


def _compiled(model: DiffusionModel, args: argparse.Namespace) -> DiffusionModel:
    """The model with its denoiser compiled in place under ``--compile`` (with CUDA graphs on CUDA). One graph per
    per-step parameter set, for the full batches and for a smaller last one: dynamo's recompile limit is raised to
    twice the model's number of sets, so that no step falls back to eager. Shapes stay static (``dynamic=False``):
    the kernels are planned per shape (cuDNN's FP8 attention, the measured paths), so the smaller batch gets a
    graph of its own rather than one with symbolic sizes."""
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
        model.denoiser.compile(mode="reduce-overhead" if on_cuda else None, dynamic=False)
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
    if args.offload and args.device == "cpu":
        raise DmquantError("--offload moves the denoiser's blocks to --device: give a GPU, e.g. --device cuda")
    offload = args.device if args.offload else None
    if (Path(args.model) / "model_index.json").exists():
        if args.offload:
            raise DmquantError(
                f"{args.model}: --offload quantizes a denoiser (a model directory, a built-in model), "
                "not a pipeline directory"
            )
        if num_processes() > 1:
            raise DmquantError(f"{args.model}: a pipeline directory is quantized by one process; launch one")
        return _quantize_pipeline(args, config, prompts)
    model = _prepared(open_model(args.model), args).with_defaults(prompts=prompts, labels=args.labels)
    if not is_main_process():  # records its share of the calibration trajectories; the main process saves
        quantize(model, config, progress=False, offload=offload)
        return 0
    output = check_target(args.output, overwrite=args.overwrite)
    with output_lock(output):  # held until saved: a second run on OUT fails now, not after calibrating
        return _quantize_and_save(model, config, output, args, offload)


def _quantize_and_save(
    model: DiffusionModel, config: QuantConfig, output: Path, args: argparse.Namespace, offload: str | None
) -> int:
    """Calibrate, quantize (resuming a reconstruction from its saved progress) and save to ``output``."""
    from .api import info, quantize, save

    print(
        f"quantizing {model.name} with recipe {config.name}: weights {config.weight.describe()}, "
        f"activations {config.activation.describe()}"
    )
    state_dir = _reconstruction_state(config, output, args)
    started = time.perf_counter()
    try:
        quantized = quantize(model, config, progress=not args.quiet, state_dir=state_dir, offload=offload)
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
    from .api import info
    from .config import with_overrides
    from .jobs import open_model
    from .passes import attach_traced
    from .report import markdown_table
    from .sampling import probe_call

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
        call = probe_call(model.denoiser, model.make_conditioning(1, guidance_scale=1.0))
        report = attach_traced(model.denoiser, config, call, warn=False).report
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
