"""The README's examples run as written, on the shipped models (only sizes made smaller)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

import dmquant
from dmquant import pipelines
from dmquant.config import load_recipe
from dmquant.errors import ModelError
from dmquant.jobs import generate
from dmquant.models import MODEL_INFO_FILE, load_model
from dmquant.zoo import WEIGHTS_DIR
from dmquant.zoo.tiny import tiny_unet2d

README = Path(__file__).resolve().parents[1] / "README.md"

#: Only sizes change: 50 sampling steps, 10 calibration steps, 32 trajectories and 8 samples are
#: too slow for the test suite on a CPU.
SMALLER = {
    "num_inference_steps=50": "num_inference_steps=4",
    "count=10": "count=2",
    "num_trajectories=32": "num_trajectories=2",
    "batch_size=8": "batch_size=2",
    "classes(8)": "classes(2)",
}


def python_examples() -> list[str]:
    """The python blocks, each preceded by blank lines so that tracebacks give README line numbers."""
    text = README.read_text()
    blocks = list(re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE))
    assert blocks, "README.md has no ```python block"
    return ["\n" * text.count("\n", 0, match.start(1)) + match.group(1) for match in blocks]


def _run(code: str, sizes: dict[str, str]) -> dict:
    for large, small in sizes.items():
        assert large in code, f"{large} is no longer in the README example"
        code = code.replace(large, small)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_python_example_runs_on_the_shipped_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves its checkpoint to a relative path
    namespace = _run(python_examples()[0], SMALLER)

    assert isinstance(namespace["unet"], UNet2DModel)
    qunet = namespace["qunet"]
    quant = dmquant.info(qunet)
    assert quant.config.name == "mse"
    assert quant.report.num_quantized > 0
    assert len(namespace["calibration"]) == 2 * 2  # 2 trajectories, steps 0 and 2 of 4
    assert namespace["calibration"].cond["class_labels"].tolist() == [0, 1] * 2
    assert (tmp_path / "unet-w8a8" / "dmquant.json").is_file()
    x0 = namespace["x0"]
    assert x0.shape == (2, 3, 32, 32)
    assert torch.isfinite(x0).all()


def test_diffusers_example_runs_on_the_shipped_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text(
        "a red bold capital q on a blue background\na green small a on a white background\n"
    )

    def smaller(name):  # only the calibration's size changes: 2 trajectories of 2 steps
        config = load_recipe(name)
        config = dataclasses.replace(
            config, calibration=dataclasses.replace(config.calibration, num_trajectories=2, num_inference_steps=2)
        )
        return config

    monkeypatch.setattr(pipelines, "load_recipe", smaller)
    example = next(code for code in python_examples() if "quantize_pipeline" in code)
    namespace = _run(example, {"num_inference_steps=20": "num_inference_steps=2"})

    pipe = namespace["pipe"]
    assert dmquant.info(pipe.unet).source == str((WEIGHTS_DIR / "ldm-glyphs64").resolve())
    assert (tmp_path / "glyphs-w8a8" / "unet" / "config.json").is_file()
    assert namespace["image"].size == (64, 64)


def test_model_info_example_is_accepted(tmp_path):
    text = " ".join(README.read_text().split())
    match = re.search(r"`(\{\"conditioning\".*?\})`", text)
    assert match, "README.md no longer shows a dmquant_model.json example"
    info = json.loads(match.group(1))

    # 13 class embeddings would be inferred as 12 classes with null class 12; the file says otherwise
    unet = UNet2DModel.from_config({**tiny_unet2d().config, "num_class_embeds": 13})
    unet.save_pretrained(tmp_path / "unet")
    DDIMScheduler().save_pretrained(tmp_path / "unet" / "scheduler")
    (tmp_path / "unet" / MODEL_INFO_FILE).write_text(match.group(1))

    model = load_model(tmp_path / "unet")

    assert model.conditioning == info["conditioning"] == "class"
    assert (model.num_classes, model.null_class) == (info["num_classes"], info["null_class"])
    with pytest.raises(ModelError):
        model.make_conditioning(1, labels=[info["num_classes"]])
    images, conditioning = generate(model, 2, num_inference_steps=2, labels=[0, 9], guidance_scale=2.0, progress=False)
    assert conditioning.uncond["class_labels"].tolist() == [info["null_class"]] * 2
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_the_reliability_table_names_tests_that_exist():
    """docs/reliability.md (linked from the README) cites a test for every row: each one must exist."""
    table = README.with_name("docs").joinpath("reliability.md").read_text()
    assert "docs/reliability.md" in README.read_text()
    cited = set(re.findall(r"`(test_\w+\.py)::(\w+)`", table))
    assert len(cited) > 30
    tests = README.with_name("tests")
    missing = [f"{file}::{name}" for file, name in cited if f"def {name}(" not in (tests / file).read_text()]
    assert missing == []
