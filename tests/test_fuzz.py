"""Property-based mutation of everything a user or an attacker hands dmquant: checkpoint manifests,
safetensors headers, recipe files and command lines.

For every mutated input, only dmquant's own errors escape (a CLI run exits 0 or 2 with no
traceback), nothing outside the output directory changes, and nothing hangs: each case runs under
a wall-clock alarm. The numbers of cases are bounded so that the whole file runs in well under a
minute on two CPU cores.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import struct
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dmquant.checkpoint import MANIFEST_FILE, TENSORS_FILE, sha256
from dmquant.cli import main
from dmquant.config import load_recipe
from dmquant.errors import ConfigError, DmquantError
from dmquant.jobs import open_model

#: Seconds a single case may take before it counts as hanging.
TIME_LIMIT_S = 20
FUZZ = settings(
    deadline=timedelta(seconds=TIME_LIMIT_S),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


class Hang(Exception):
    """A case ran past :data:`TIME_LIMIT_S`."""


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    def expire(signum, frame):
        raise Hang(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root: Path, *, outside: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (except below ``outside``) with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in root.rglob("*")
        if outside is None or not path.is_relative_to(outside)
    }


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["/etc/passwd", "google/ddpm-cifar10-32", "tiny-dit", "../..", "UNet2DModel"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def paths_of(value, prefix=(), depth=4) -> list[tuple]:
    """Every key path into a JSON document, to ``depth`` levels."""
    found = [prefix] if prefix else []
    if depth == 0:
        return found
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, item in list(items)[:6]:
        found += paths_of(item, (*prefix, key), depth - 1)
    return found


def mutated(document, path: tuple, operation: str, value):
    """A copy of ``document`` with the entry at ``path`` replaced, removed, or given a sibling."""
    document = json.loads(json.dumps(document))
    node = document
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if operation == "replace":
        node[last] = value
    elif operation == "remove":
        del node[last]
    elif isinstance(node, dict):
        node[f"{last}_extra"] = value
    else:
        node.append(value)
    return document


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small W4A8 checkpoint of ``tiny-unet`` with per-step ranges and PTQD's noise statistics, for 2 steps."""
    root = tmp_path_factory.mktemp("fuzz")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "base: minmax\nper_step_activations: true\n"
        "correction: {enabled: true, num_samples: 1, num_inference_steps: 2, batch_size: 1}\n"
    )
    argv = ["quantize", "tiny-unet", "-o", str(root / "q"), "--calib-trajectories", "1", "--calib-steps", "2", "-q"]
    assert main([*argv, "--recipe", str(recipe), "--w-bits", "4"]) == 0
    return root / "q"


def _loads_or_refuses(directory: Path) -> None:
    """Loading a checkpoint (with its source model) ends in a model or a CheckpointError, and changes nothing."""
    before = snapshot(directory.parent)
    with time_limit():
        try:
            open_model(str(directory))
            event("loaded")
        except DmquantError as error:
            event(f"refused: {str(error).replace(str(directory), 'CHECKPOINT')[:60]}")
    assert snapshot(directory.parent) == before


@st.composite
def manifest_mutations(draw, manifest: dict):
    path = draw(st.sampled_from(paths_of(manifest)))
    return path, draw(st.sampled_from(["replace", "remove", "add"])), draw(JSON_VALUES)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_a_mutated_manifest_loads_or_is_refused(checkpoint, data):
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    path, operation, value = data.draw(manifest_mutations(manifest))
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(shutil.copytree(checkpoint, Path(scratch) / "q"))
        document = mutated(manifest, path, operation, value)
        (directory / MANIFEST_FILE).write_text(json.dumps(document))
        _loads_or_refuses(directory)


def _header(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_a_mutated_and_re_signed_safetensors_header_loads_or_is_refused(checkpoint, data):
    """The checksum is recomputed after the mutation, as an attacker would, so the header parser is reached."""
    header, body = _header((checkpoint / TENSORS_FILE).read_bytes())
    kind = data.draw(st.sampled_from(["reshape", "retype", "rename", "entry", "length", "bytes"]))
    if kind in ("reshape", "retype", "rename"):  # a well-formed header that describes other tensors
        name = data.draw(st.sampled_from(sorted(key for key in header if key != "__metadata__")))
        entry = header[name]
        if kind == "reshape":
            count = 1
            for size in entry["shape"]:
                count *= size
            entry["shape"] = data.draw(st.sampled_from([[count], [1, count], [count, 1], []]))
        elif kind == "retype":
            same_size = {1: ["U8", "I8", "F8_E4M3", "BOOL"], 2: ["F16", "BF16", "I16"], 4: ["F32", "I32"]}
            itemsize = next(size for size, types in same_size.items() if entry["dtype"] in types)
            entry["dtype"] = data.draw(st.sampled_from(same_size[itemsize]))
        else:
            header[data.draw(st.sampled_from(["", "x", name + ".codes", "conv_in.weight"]))] = header.pop(name)
        text = json.dumps(header).encode()
        tensors = struct.pack("<Q", len(text)) + text + body
    elif kind == "entry":
        path, operation, value = data.draw(manifest_mutations(header))
        text = json.dumps(mutated(header, path, operation, value)).encode()
        tensors = struct.pack("<Q", len(text)) + text + body
    elif kind == "length":
        text = json.dumps(header).encode()
        tensors = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + text + body
    else:
        text = bytearray(json.dumps(header).encode())
        for _ in range(data.draw(st.integers(1, 4))):
            text[data.draw(st.integers(0, len(text) - 1))] = data.draw(st.integers(0, 255))
        tensors = struct.pack("<Q", len(text)) + bytes(text) + body
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(shutil.copytree(checkpoint, Path(scratch) / "q"))
        (directory / TENSORS_FILE).write_bytes(tensors)
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        manifest.update(sha256=sha256(directory / TENSORS_FILE), tensors_bytes=len(tensors))
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
        _loads_or_refuses(directory)


RECIPE_KEYS = {
    "weight": ["bits", "symmetric", "granularity", "observer", "p", "percentile", "max_elements"],
    "activation": ["bits", "unsigned", "granularity", "observer", "momentum"],
    "calibration": ["num_inference_steps", "strategy", "strategy_options", "num_trajectories", "eta"],
    "reconstruction": ["enabled", "iterations", "activation_scales", "learning_rate", "warmup", "beta_start"],
    "step_precision": ["enabled", "num_inference_steps", "late_bits", "switch_step"],
    "smoothing": ["enabled", "alpha", "patterns"],
    "rules": [],
}
SHIPPED = Path(load_recipe.__code__.co_filename).parent / "recipes"


@st.composite
def recipe_texts(draw) -> bytes:
    """A shipped recipe with a key set to a random value, or a random document, or either with corrupted bytes."""
    document = yaml.safe_load((SHIPPED / f"{draw(st.sampled_from(['mse', 'q-diffusion', 'ptqd']))}.yaml").read_text())
    if draw(st.booleans()):
        section = draw(st.sampled_from(sorted(RECIPE_KEYS)))
        key = draw(st.sampled_from(RECIPE_KEYS[section] or ["pattern"]))
        value = draw(JSON_VALUES | st.sampled_from(["int²", "٣", "group:٣", ".nan", "-.inf", "fp8_e4m3", 1e308]))
        if section == "rules":
            document["rules"] = [{key: value}]
        else:
            document.setdefault(section, {})
            if isinstance(document[section], dict):
                document[section][key] = value
    else:
        document = draw(JSON_VALUES)
    text = bytearray(yaml.safe_dump(document, allow_unicode=True).encode())
    for _ in range(draw(st.integers(0, 2))):
        if text:
            text[draw(st.integers(0, len(text) - 1))] = draw(st.integers(0, 255))
    return bytes(text)


@settings(FUZZ, max_examples=150)
@given(text=recipe_texts(), suffix=st.sampled_from([".yaml", ".toml"]))
def test_a_mutated_recipe_file_loads_or_is_a_config_error(text, suffix):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"recipe{suffix}"
        path.write_bytes(text)
        with time_limit():
            try:
                load_recipe(path)
                event("loaded")
            except ConfigError as error:
                event(f"refused: {type(error).__name__}")
        assert [p.name for p in Path(scratch).iterdir()] == [path.name]


ODD_VALUES = st.sampled_from(
    ["nan", "inf", "-inf", "-1", "0", "1e400", str(2**64), "²", "٣", "", " ", "cuda", "cuda:7", "meta", "x" * 300]
)
OPTIONS = {
    "--guidance": st.floats(allow_nan=True).map(str) | ODD_VALUES,
    "--eta": st.floats(allow_nan=True).map(str) | ODD_VALUES,
    "--seed": st.integers(-(2**65), 2**65).map(str) | ODD_VALUES,
    "--steps": st.integers(-3, 3).map(str) | ODD_VALUES,
    "--device": st.sampled_from(["cpu", "cuda", "cuda:1", "mps", "meta", "xla", "cpu:0", "nope", ""]),
    "--w-bits": st.sampled_from(["4", "8", "²", "int٣", "fp8_e4m3", "fp9", "-4", "1000"]),
    "--recipe": st.sampled_from(["mse", "ptqd-mixed", "nope", "/dev/null", "/", "../x.yaml"]),
    "--labels": st.sampled_from(["1", "1,2", "-1", "999", "a", "1,,2"]),
    "--prompt": st.text(max_size=8),
    "--scheduler": st.sampled_from(["ddim", "nope"]),
}


@st.composite
def command_lines(draw, checkpoint: Path, output: Path) -> list[str]:
    command = draw(st.sampled_from(["sample", "inspect", "quantize"]))
    model = draw(st.sampled_from(["tiny-unet", str(checkpoint), "nope", "/etc", str(output / "foreign")]))
    argv = [command, model if command != "quantize" else "tiny-unet"]
    if command == "sample":
        argv += ["-o", str(output / "grid.png"), "--num-samples", "1", "--steps", "2"]
    if command == "quantize":
        target = draw(st.sampled_from(["q", "file", "file/q", "foreign", "foreign/q"]))
        argv += ["-o", str(output / target), "--calib-trajectories", "1", "--calib-steps", "2"]
        argv += ["--overwrite"] if draw(st.booleans()) else []
        argv += ["--recipe", draw(st.sampled_from(["minmax", "nope", "/dev/null", "/"]))]  # the quick ones
    chosen = {"sample": list(OPTIONS), "inspect": ["--device", "--w-bits", "--recipe"], "quantize": ["--w-bits"]}
    usable = chosen[command]
    for name in draw(st.lists(st.sampled_from(usable), max_size=3, unique=True)):
        argv += [name, draw(OPTIONS[name])]
    return [*argv, "-q"]


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_a_fuzzed_command_line_exits_0_or_2_with_a_one_line_error(checkpoint, data, capsys):
    """Inside the output directory too, the user's files (a file, a directory of notes) survive every command."""
    root = checkpoint.parent
    output = root / "out"
    shutil.rmtree(output, ignore_errors=True)  # what the last case wrote
    (output / "foreign").mkdir(parents=True)
    (output / "file").write_text("mine")
    (output / "foreign" / "notes.txt").write_text("mine")
    argv = data.draw(command_lines(checkpoint, output))
    before = snapshot(root, outside=output)
    with time_limit():
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    err = capsys.readouterr().err
    event(f"exit {code}: {'usage' if 'usage:' in err else err.split(':')[2][:30] if code else 'ran'}")
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2 and "usage:" not in err:
        assert len(err.strip().splitlines()) == 1, err
    assert snapshot(root, outside=output) == before
    assert (output / "file").read_text() == "mine" and (output / "foreign" / "notes.txt").read_text() == "mine"
