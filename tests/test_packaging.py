"""dmquant as users install it: the wheel carries every shipped model file, and the command answers at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from dmquant.zoo import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parents[1]


def _shipped_files() -> set[str]:
    """Every file under the package's zoo weights as a wheel names it (linked directories followed)."""
    names = set()
    for directory, _, files in os.walk(WEIGHTS_DIR, followlinks=True):
        relative = Path(directory).relative_to(WEIGHTS_DIR.parents[1])
        names.update(f"dmquant/{(relative / name).as_posix()}" for name in files)
    return names


def test_the_wheel_holds_every_zoo_model_file(tmp_path):
    source = tmp_path / "source"  # built from a copy: the build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src", source / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dmquant-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    shipped = _shipped_files()
    for model in ("ldm-glyphs64/unet/", "ldm-glyphs64/text_encoder/", "ldm-glyphs64/vae/", "dit-glyphs/transformer/"):
        assert any(model in name for name in shipped), model
    assert shipped - packed == set()
    assert {"dmquant/recipes/minmax.yaml", "dmquant/catalog.py"} <= packed


def test_the_command_answers_help_without_importing_torch():
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from dmquant.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 0, result.stderr
    assert "quantize" in result.stdout
    assert time.perf_counter() - started < 2.0
