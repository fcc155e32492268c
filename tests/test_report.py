from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dmquant.report import comparison_grid, image_grid, markdown_table, save_image_grid, save_samples_npz


def _constant_batch(values: list[float], channels: int = 3, height: int = 8, width: int = 6):
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, channels, height, width).clone()


def test_grid_shape_and_tile_placement():
    # Five 8x6 tiles, 3 per row -> 2 rows; padding 2 around and between tiles.
    values = [-1.0, -0.5, 0.0, 0.5, 1.0]
    grid = image_grid(_constant_batch(values), nrow=3, padding=2)
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (6 + 2) + 2, 3)
    assert grid.dtype == np.uint8
    expected = [0, 64, 128, 191, 255]  # round(255 * (v + 1) / 2)
    mask = np.zeros(grid.shape[:2], dtype=bool)
    for index, value in enumerate(expected):
        row, column = divmod(index, 3)
        top, left = 2 + row * 10, 2 + column * 8
        assert (grid[top : top + 8, left : left + 6] == value).all()
        mask[top : top + 8, left : left + 6] = True
    # Padding and the empty sixth cell are black.
    assert (grid[~mask] == 0).all()


def test_grid_default_nrow_is_ceil_sqrt():
    assert image_grid(_constant_batch([0.0] * 5), padding=0).shape == (16, 18, 3)
    assert image_grid(_constant_batch([0.0] * 4), padding=0).shape == (16, 12, 3)
    assert image_grid(_constant_batch([0.0] * 2), nrow=8, padding=1).shape == (10, 15, 3)


def test_grid_clamps_to_value_range():
    images = torch.linspace(-3, 3, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    grid = image_grid(images)
    assert grid.min() == 0 and grid.max() == 255
    grid = image_grid(torch.full((1, 3, 4, 4), 127.5), value_range=(0.0, 255.0), padding=0)
    assert (grid == 128).all()


def test_grey_images():
    images = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = image_grid(images)
    assert grid.shape[-1] == 3
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()


def test_latents_normalised_per_channel_over_batch():
    generator = torch.Generator().manual_seed(0)
    latents = 10 * torch.randn(2, 4, 6, 6, generator=generator) + 5
    latents[:, 3] = 1e6  # the fourth channel is not shown
    latents[1, :3] = 2 * latents[0, :3]
    grid = image_grid(latents, nrow=2, padding=0)
    for channel in range(3):
        assert grid[..., channel].min() == 0 and grid[..., channel].max() == 255
    # One min/max per channel for the whole batch keeps the tiles comparable.
    assert not np.array_equal(grid[:, :6], grid[:, 6:])


def test_constant_latent_channel_is_black():
    latents = torch.zeros(1, 4, 4, 4)
    latents[0, 0] = torch.arange(16.0).view(4, 4)
    grid = image_grid(latents, padding=0)
    assert grid[..., 0].max() == 255 and (grid[..., 1:] == 0).all()


@pytest.mark.parametrize("shape", [(2, 2, 4, 4), (0, 3, 4, 4), (3, 4, 4)])
def test_grid_rejects_bad_shapes(shape):
    with pytest.raises(ValueError):
        image_grid(torch.zeros(shape))


def test_save_image_grid_writes_png(tmp_path):
    images = torch.rand(5, 3, 8, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_image_grid(images, tmp_path / "out" / "nested" / "grid.png", nrow=3)
    assert path == tmp_path / "out" / "nested" / "grid.png"
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (26, 22)
        assert np.array_equal(np.asarray(picture.convert("RGB")), image_grid(images, nrow=3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]


def test_save_image_grid_rejects_other_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_image_grid(torch.zeros(1, 3, 4, 4), tmp_path / "grid.jpg")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = save_samples_npz(tmp_path / "samples.npz", torch.zeros(1, 3, 2, 2))
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        save_samples_npz(path, torch.ones(1, 3, 2, 2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_samples_npz_round_trip(tmp_path):
    images = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2).expand(2, 3, 2, 2).clone()
    images[1] = -images[1]
    labels = torch.tensor([3, 7])
    path = save_samples_npz(tmp_path / "s.npz", images, labels=labels, seeds=[11, 12])
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["images", "labels", "seeds"]
        stored = archive["images"]
        assert stored.dtype == np.uint8 and stored.shape == (2, 2, 2, 3)
        assert stored[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
        assert stored[1, :, :, 2].tolist() == [[255, 128], [0, 0]]
        assert archive["labels"].tolist() == [3, 7]
        assert archive["seeds"].tolist() == [11, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_samples_npz_uint8_and_value_range(tmp_path):
    pixels = torch.randint(0, 256, (3, 3, 4, 5), dtype=torch.uint8)
    with np.load(save_samples_npz(tmp_path / "a.npz", pixels)) as archive:
        assert np.array_equal(archive["images"], pixels.permute(0, 2, 3, 1).numpy())
    with np.load(save_samples_npz(tmp_path / "b.npz", pixels.float(), value_range=(0, 255))) as archive:
        assert np.array_equal(archive["images"], pixels.permute(0, 2, 3, 1).numpy())


def test_samples_npz_refuses_object_arrays(tmp_path):
    with pytest.raises(ValueError, match="pickl"):
        save_samples_npz(tmp_path / "s.npz", torch.zeros(1, 3, 2, 2), meta=[{"a": 1}])
    assert list(tmp_path.iterdir()) == []


def test_markdown_table():
    rows = [
        {"method": "minmax", "bits": 8, "psnr": 31.41592, "ssim": 0.987654},
        {"method": "fp32", "bits": None, "psnr": float("inf"), "ssim": torch.tensor(1.0)},
        {"method": "a|b", "bits": 4, "psnr": np.float32(-float("inf"))},
    ]
    assert markdown_table(rows) == (
        "| method | bits | psnr | ssim |\n"
        "| --- | --- | --- | --- |\n"
        "| minmax | 8 | 31.42 | 0.9877 |\n"
        "| fp32 | — | inf | 1 |\n"
        "| a\\|b | 4 | -inf | — |"
    )


def test_markdown_table_columns_and_format():
    rows = [{"psnr": 20.0, "method": "x", "extra": 1}, {"method": "y", "psnr": float("nan")}]
    table = markdown_table(rows, columns=["method", "psnr"], float_format="{:.2f} dB")
    assert table.splitlines() == [
        "| method | psnr |",
        "| --- | --- |",
        "| x | 20.00 dB |",
        "| y | nan |",
    ]
    assert markdown_table([], columns=["a"]) == "| a |\n| --- |"
    with pytest.raises(ValueError, match="column"):
        markdown_table([])


def test_comparison_grid_labels_each_row_with_its_setting(tmp_path):
    images = {name: torch.zeros(2, 3, 8, 8) for name in ("FP", "W8A8")}
    with Image.open(comparison_grid(images, tmp_path / "c.png", count=2)) as picture:
        pixels = np.asarray(picture)
    unlabelled_width = 2 * (8 + 2) + 2
    assert pixels.shape[:2] == (2 * (8 + 2) + 2, pixels.shape[1]) and pixels.shape[1] > unlabelled_width
    label_column = pixels[:, : pixels.shape[1] - unlabelled_width]
    assert label_column[:11].max() > 0 and label_column[11:].max() > 0  # text beside both rows
