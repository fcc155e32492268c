"""The feature-extractor interface and the FID Inception-v3, built with random weights (none are downloaded)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dmquant.errors import ModelError
from dmquant.eval.features import Features, extract_features
from dmquant.eval.inception import WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL, InceptionFeatures

# ---- Features and extract_features -------------------------------------------------------


def _toy_features(n: int, offset: float = 0.0) -> Features:
    rows = torch.arange(n, dtype=torch.float32)[:, None] + offset
    return Features(pooled=rows.repeat(1, 4), spatial=rows.repeat(1, 3), logits=-rows.repeat(1, 2))


def test_features_cat_subset_and_to():
    features = Features.cat([_toy_features(3), _toy_features(2, offset=3)])
    assert len(features) == 5 and features.pooled[:, 0].tolist() == [0, 1, 2, 3, 4]
    picked = features.subset(torch.tensor([4, 0]))
    assert picked.spatial[:, 0].tolist() == [4, 0] and picked.logits[:, 0].tolist() == [-4, 0]
    assert features.subset(slice(1, 3)).pooled.shape == (2, 4)
    assert features.to(torch.float64).logits.dtype == torch.float64


def test_features_reject_inconsistent_views():
    with pytest.raises(ValueError, match="number of images"):
        Features(pooled=torch.zeros(3, 4), spatial=torch.zeros(2, 3), logits=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="2-D"):
        _toy_features(3).subset(0)
    with pytest.raises(ValueError, match="empty"):
        Features.cat([])


class _MeanColour(nn.Module):
    """A toy extractor that records how it is called."""

    name = "mean-colour"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls: list[tuple[int, bool, bool]] = []

    def features(self, images: torch.Tensor) -> Features:
        self.calls.append((images.shape[0], self.training, torch.is_inference_mode_enabled()))
        colour = images.mean(dim=(2, 3)) * self.scale
        return Features(pooled=colour, spatial=images.flatten(1)[:, :5], logits=colour[:, :2])


def test_extract_features_batches_in_eval_and_inference_mode():
    torch.manual_seed(0)
    images = torch.rand(7, 3, 4, 4) * 2 - 1
    extractor = _MeanColour()
    features = extract_features(extractor, images, batch_size=3, progress=False)
    assert extractor.calls == [(3, False, True), (3, False, True), (1, False, True)]
    assert extractor.training  # restored
    assert features.pooled.dtype == torch.float64 and features.pooled.device.type == "cpu"
    assert not features.pooled.is_inference()  # usable outside inference mode, in place too
    torch.testing.assert_close(features.pooled, (2 * images.mean(dim=(2, 3))).double())
    from_batches = extract_features(extractor, (batch for batch in images.split(2)), progress=False)
    torch.testing.assert_close(from_batches.spatial, features.spatial)


def test_extract_features_rejects_bad_input():
    extractor = _MeanColour()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        extract_features(extractor, torch.zeros(2, 1, 4, 4), progress=False)
    assert extractor.training  # restored after an error too
    with pytest.raises(ValueError, match="no images"):
        extract_features(_MeanColour(), iter([]), progress=False)


# ---- the FID Inception-v3 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = InceptionFeatures().eval()
    with torch.no_grad():
        model.fc.bias.normal_()  # nn.Linear starts with a small bias; make it matter
    return model


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_feature_shapes(model, images):
    with torch.inference_mode():
        features = model.features(images)
    assert features.pooled.shape == (2, 2048)
    assert features.spatial.shape == (2, 7 * 17 * 17)
    assert features.logits.shape == (2, 1008)
    assert all(torch.isfinite(t).all() for t in (features.pooled, features.spatial, features.logits))
    assert not torch.allclose(features.pooled[0], features.pooled[1])


def test_architecture_matches_pytorch_fid(model):
    # torchvision documents Inception3 (1000 classes, with the aux classifier) at 27,161,264
    # parameters. FIDInceptionV3 drops AuxLogits (98,560 + 2,459,136 + 769,000) and has 8 more
    # classes (8 * 2048 + 8): 27,161,264 - 3,326,696 + 16,392.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    keys = model.state_dict().keys()
    assert sum(key.endswith(".conv.weight") for key in keys) == 94  # Inception-v3's 94 convolutions
    expected = {
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_1a_3x3.bn.running_mean",
        "Mixed_5b.branch1x1.conv.weight",
        "Mixed_5b.branch5x5_2.bn.running_var",
        "Mixed_6a.branch3x3dbl_3.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.weight",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.bn.bias",
        "fc.weight",
        "fc.bias",
    }
    assert expected <= keys
    assert model.fc.weight.shape == (1008, 2048)
    assert model.name == "inception-v3-fid"


def test_spatial_is_adm_mixed_6_conv_and_logits_skip_the_bias(model, images):
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.update(out=out))
    try:
        with torch.no_grad():
            features = model(images)
    finally:
        hook.remove()
    # TF's mixed_6/conv (NHWC) is the 1x1 branch of Mixed_6d; ADM keeps its first 7 channels.
    expected = captured["out"].permute(0, 2, 3, 1)[..., :7].reshape(2, -1)
    torch.testing.assert_close(features.spatial, expected, rtol=0, atol=0)
    torch.testing.assert_close(features.logits, features.pooled @ model.fc.weight.T)
    assert not torch.allclose(features.logits, model.fc(features.pooled))


def test_any_input_resolution_is_resized(model, images):
    upsampled = nn.functional.interpolate(images, size=(48, 40), mode="bilinear")
    with torch.inference_mode():
        assert model(upsampled).pooled.shape == (2, 2048)
        assert model(images.double()).pooled.dtype == torch.float32


def test_weights_round_trip_through_pth_and_safetensors(model, images, tmp_path, monkeypatch):
    state_dict = model.state_dict()
    # the ported weights may lack BatchNorm's num_batches_tracked; loading must not need it
    torch.save({k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "w.safetensors")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "w.pth"))
    with torch.inference_mode():
        expected = model(images).logits
        for path in (tmp_path / "w.pth", str(tmp_path / "w.safetensors"), None):
            loaded = InceptionFeatures.from_weights(path)
            assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
            torch.testing.assert_close(loaded(images).logits, expected, rtol=0, atol=0)


def test_extract_features_with_inception(model, images):
    features = extract_features(model, images, batch_size=1, progress=False)
    with torch.inference_mode():
        direct = model(images)
    assert features.logits.dtype == torch.float64
    torch.testing.assert_close(features.pooled, direct.pooled.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["argument", "environment", "nowhere"])
def test_missing_weights_say_where_to_get_them(where, tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    missing = tmp_path / WEIGHTS_FILE
    if where == "environment":
        monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(ModelError) as error:
        InceptionFeatures.from_weights(missing if where == "argument" else None)
    message = str(error.value)
    assert WEIGHTS_FILE in message and WEIGHTS_URL in message and WEIGHTS_ENV in message
    assert "from_weights(path)" in message
    assert ("no path was given" in message) == (where == "nowhere")


def test_wrong_weights_are_rejected_with_the_offending_keys(model, tmp_path):
    state_dict = dict(model.state_dict())
    state_dict["Mixed_5b.branch_1x1.conv.weight"] = state_dict.pop("Mixed_5b.branch1x1.conv.weight")
    torch.save(state_dict, tmp_path / "renamed.pth")
    with pytest.raises(ModelError, match=r"missing keys \['Mixed_5b.branch1x1.conv.weight'\].*branch_1x1"):
        InceptionFeatures.from_weights(tmp_path / "renamed.pth")

    state_dict = dict(model.state_dict(), **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(state_dict, tmp_path / "imagenet.pth")
    with pytest.raises(ModelError, match="size mismatch for fc.weight"):
        InceptionFeatures.from_weights(tmp_path / "imagenet.pth")

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        InceptionFeatures.from_weights(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ModelError, match="not a state dict"):
        InceptionFeatures.from_weights(tmp_path / "list.pth")
