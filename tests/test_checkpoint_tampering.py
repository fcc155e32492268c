"""A checkpoint is data, never instructions: tampered manifests and tensor files are CheckpointErrors naming
the field, refused before anything is built, allocated, hashed at length or loaded from elsewhere."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from dmquant import api
from dmquant.checkpoint import MANIFEST_FILE, TENSORS_FILE, sha256
from dmquant.config import load_recipe
from dmquant.errors import CheckpointError
from dmquant.jobs import open_model


@pytest.fixture(scope="module")
def original(unet, calibration, tmp_path_factory):
    model = api.quantize(unet.denoiser, load_recipe("minmax").with_bits(4, 8), calibration, progress=False)
    model.dmquant_info.source = "tiny-unet"
    return api.save(model, tmp_path_factory.mktemp("original") / "q")


@pytest.fixture()
def saved(original, tmp_path):
    return shutil.copytree(original, tmp_path / "q")


def edit_manifest(directory, edit) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    edit(manifest)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def _set(path: str, value):
    def edit(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def _statistics(**changed) -> dict:
    """Noise statistics of a 2-step trajectory, with ``changed`` fields."""
    fields = {"num_inference_steps": 2, "timesteps": [500, 0], "correlation": [1.0, 1.0], "residual_std": [0.0, 0.0]}
    return fields | {"bias": [[0.0], [0.0]], "num_samples": 1} | changed


def _first_codes(manifest) -> str:
    return next(iter(manifest["weight_codes"]))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_set("base.config", "google/ddpm-cifar10-32"), "base.config: expected a mapping"),
        (_set("base.config", "/etc/passwd"), "base.config: expected a mapping"),
        (_set("base.class", "AutoencoderKL"), "base.class: expected a denoiser class dmquant supports"),
        (_set("base.class", "__class__"), "base.class: expected a denoiser class"),
        (_set("base.library", "transformers"), "base.library: expected diffusers or null"),
        (_set("base.config.block_out_channels", [4096, 4096]), "base.config: the model it describes has more than"),
        (_set("base.config.layers_per_block", 100_000), "base.config: the model it describes has more than"),
        (_set("base.config.block_out_channels", "abc"), "base.config: no UNet2DModel can be built"),
        (_set("num_steps", 10**12), "num_steps: expected an integer in [1, 10000]"),
        (_set("num_steps", "4"), "num_steps: expected an integer"),
        (_set("splits", {"conv_in": 10**6}), "splits.conv_in"),
        (_set("splits", {"nowhere": 3}), "splits.nowhere"),
        (_set("report", "rows"), "report: expected a list"),
        (_set("report", [{"name": 1}]), "report[0].name: expected a string"),
        (lambda m: m["report"][0].update(colour="red"), "report: malformed"),
        (_set("recipe", {"weight": {"bits": 99}}), "recipe.weight.bits"),
        (_set("source", 42), "source: expected a string"),
        (_set("source_relative", "/etc"), "source_relative: expected a relative path"),
        (_set("source_relative", ["..", "model"]), "source_relative: expected a relative path"),
        (_set("source_relative", ""), "source_relative: expected a relative path"),
        (_set("base.class", "DiffusionPipeline"), "base.class: expected a denoiser class dmquant supports"),
        (_set("base.class", "ModelMixin"), "base.class: expected a denoiser class dmquant supports"),
        (_set("extra", []), "extra: expected a mapping"),
        (_set("extra", {"noise_statistics": {"k": 1}}), "extra.noise_statistics"),
        (_set("extra", {"noise_statistics": _statistics(correlation=["x", 1.0])}), "not a finite number"),
        (_set("extra", {"noise_statistics": _statistics(bias=[[0.0], [0.0, 1.0]])}), "one bias per channel"),
        (_set("sha256", "0" * 63), "sha256: expected a SHA-256"),
        (_set("tensors_bytes", 10), "tensors_bytes: the tensor file has"),
        (lambda m: m.pop("weight_codes"), "weight_codes: required key missing"),
        (lambda m: m["weight_codes"][_first_codes(m)].update(shape=[10**9, 10**9]), "holds more codes than"),
        (lambda m: m["weight_codes"][_first_codes(m)].update(shape=[1, 1]), "does not fit the model"),
        (lambda m: m["weight_codes"][_first_codes(m)].update(channels=[0, 1]), "does not fit the model"),
        (lambda m: m["weight_codes"][_first_codes(m)].update(format="fp8_e4m3"), "does not fit the model"),
    ],
)
def test_a_tampered_manifest_is_refused_naming_the_field(saved, edit, field):
    edit_manifest(saved, edit)
    with pytest.raises(CheckpointError, match=re.escape(field)):
        api.load(saved)


def test_a_source_recorded_as_an_absolute_and_a_relative_path_is_accepted(saved, tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    edit_manifest(saved, lambda m: m.update(source=str(tmp_path / "gone"), source_relative="../model"))
    assert api.info(api.load(saved)).source == str(source.resolve())  # found again beside the checkpoint


@pytest.mark.parametrize(
    "text", ["", "{", "[]", '"x"', "[" * 100_000, b"\xff\xfe".decode("latin-1")], ids=lambda t: repr(t[:4])
)
def test_a_manifest_that_is_not_a_json_object_is_refused(saved, text):
    (saved / MANIFEST_FILE).write_text(text, encoding="latin-1")
    with pytest.raises(CheckpointError):
        api.load(saved)


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_tensor_file_that_is_not_a_regular_file_is_refused_before_it_is_read(saved, kind):
    tensors = saved / TENSORS_FILE
    tensors.unlink()
    {"directory": tensors.mkdir, "fifo": lambda: os.mkfifo(tensors), "device": lambda: tensors.symlink_to("/dev/zero")}[
        kind
    ]()
    with pytest.raises(CheckpointError, match="not a regular file"):
        api.load(saved)  # a fifo would block and /dev/zero never end, if they were read


def test_a_manifest_that_is_a_device_is_refused(saved):
    (saved / MANIFEST_FILE).unlink()
    (saved / MANIFEST_FILE).symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="not a regular file"):
        api.load(saved)


def test_a_re_signed_tensor_file_with_a_broken_header_is_refused(saved):
    tensors = saved / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[8:20] = b'{"x":{"dtype'  # the header's start, now a broken description
    tensors.write_bytes(bytes(data))
    edit_manifest(saved, _set("sha256", sha256(tensors)))
    with pytest.raises(CheckpointError, match="unreadable"):
        api.load(saved)


def test_a_source_that_is_another_model_is_refused_not_loaded(saved):
    edit_manifest(saved, _set("source", "tiny-dit"))
    with pytest.raises(CheckpointError, match="another model than the one the checkpoint was made from"):
        open_model(str(saved))
    edit_manifest(saved, _set("source", "https://huggingface.co/google/ddpm-cifar10-32"))
    with pytest.raises(CheckpointError, match="is no model here"):
        open_model(str(saved))
    assert open_model(str(saved), base="tiny-unet").denoiser is not None  # --base names the right one


def test_a_huge_configuration_is_refused_before_anything_is_allocated(saved, monkeypatch):
    edit_manifest(saved, _set("base.config.block_out_channels", [1 << 20, 1 << 20]))
    allocated = []
    empty = torch.empty

    def watched(*args, **kwargs):
        allocated.append(kwargs.get("device"))
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", watched)
    with pytest.raises(CheckpointError, match="more than"):
        api.load(saved)
    assert all(str(device) == "meta" for device in allocated if device is not None)
