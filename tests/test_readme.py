"""The README's examples run as written, on tiny models saved to disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

import dmquant
from dmquant.errors import ModelError
from dmquant.jobs import generate
from dmquant.models import MODEL_INFO_FILE, load_model
from dmquant.zoo.tiny import tiny_unet2d

README = Path(__file__).resolve().parents[1] / "README.md"

#: Only sizes change: 50 sampling steps, 10 calibration steps, 32 trajectories and 8 samples are
#: too slow for the test suite on a CPU.
SMALLER = {
    "num_inference_steps=50": "num_inference_steps=4",
    "count=10": "count=2",
    "num_trajectories=32": "num_trajectories=2",
    "batch_size=8": "batch_size=2",
}


def python_example() -> str:
    """The first python block, preceded by blank lines so that tracebacks give README line numbers."""
    text = README.read_text()
    match = re.search(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert match, "README.md has no ```python block"
    return "\n" * text.count("\n", 0, match.start(1)) + match.group(1)


def test_python_example_runs(tmp_path, monkeypatch):
    unet_dir, scheduler_dir = tmp_path / "unet", tmp_path / "scheduler"
    tiny_unet2d(class_conditional=False).save_pretrained(unet_dir)
    DDIMScheduler().save_pretrained(scheduler_dir)

    code = python_example()
    for placeholder, directory in {"path/to/unet": unet_dir, "path/to/scheduler": scheduler_dir}.items():
        assert f'"{placeholder}"' in code
        code = code.replace(f'"{placeholder}"', repr(str(directory)))
    for large, small in SMALLER.items():
        assert large in code, f"{large} is no longer in the README example"
        code = code.replace(large, small)

    monkeypatch.chdir(tmp_path)  # the example saves its checkpoint to a relative path
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)

    assert isinstance(namespace["unet"], UNet2DModel)
    qunet = namespace["qunet"]
    quant = dmquant.info(qunet)
    assert quant.config.name == "mse"
    assert quant.report.num_quantized > 0
    assert len(namespace["calibration"]) == 2 * 2  # 2 trajectories, steps 0 and 2 of 4
    assert (tmp_path / "unet-w8a8" / "dmquant.json").is_file()
    x0 = namespace["x0"]
    assert x0.shape == (2, 3, 16, 16)
    assert torch.isfinite(x0).all()


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
