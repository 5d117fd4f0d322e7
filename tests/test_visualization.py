"""The PNG helpers: each writes a real PNG of a sensible size, atomically, and draws what it is given."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from beit3.visualization import (
    code_palette,
    save_code_maps,
    save_codebook_usage,
    save_loss_curves,
    save_reconstructions,
)


def read_png(path) -> np.ndarray:
    """The pixels of a PNG, after checking it is one and of a size a person can look at."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 200 <= image.width <= 3000 and 200 <= image.height <= 3000, image.size
        return np.asarray(image.convert("RGB"))


def no_temporary_files(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def two_images() -> torch.Tensor:
    images = torch.zeros(2, 3, 32, 32)
    images[0, 0] = torch.linspace(0, 1, 32)  # a red ramp
    images[1, 2] = 1.0  # blue
    return images


def test_palette_is_fixed_and_tells_neighbouring_codes_apart():
    palette = code_palette(256)
    assert palette.shape == (256, 3) and palette.min() >= 0 and palette.max() <= 1
    assert np.array_equal(palette, code_palette(8192)[:256])  # a code keeps its color whatever K
    assert np.abs(palette[1:] - palette[:-1]).sum(axis=1).min() > 0.1
    assert len({tuple(c) for c in np.round(palette, 3)}) == 256


def test_code_maps_draw_the_codes(tmp_path):
    codes = torch.stack([torch.arange(16), torch.full((16,), 5)])
    first = save_code_maps(two_images(), codes, 4, tmp_path / "a.png", codebook_size=64)
    assert first == tmp_path / "a.png"
    a = read_png(first)
    assert a.shape[0] > a.shape[1]  # two rows of (image | code map)
    # the same call draws the same picture; other codes draw another one
    same = read_png(save_code_maps(two_images(), codes, (4, 4), tmp_path / "same.png", codebook_size=64))
    other = read_png(save_code_maps(two_images(), codes.flip(0), 4, tmp_path / "b.png", codebook_size=64))
    assert np.array_equal(a, same)
    assert a.shape == other.shape and (a != other).any(axis=2).mean() > 0.05
    # the color of code 5 fills much of the second row's code map
    color = np.round(code_palette(64)[5] * 255)
    assert (np.abs(a[a.shape[0] // 2 :].astype(float) - color).sum(axis=2) < 6).mean() > 0.1
    assert no_temporary_files(tmp_path)


def test_code_maps_reject_codes_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        save_code_maps(two_images(), torch.full((2, 16), 64), 4, tmp_path / "x.png", codebook_size=64)
    with pytest.raises(ValueError, match="4x4 grid"):
        save_code_maps(two_images(), torch.zeros(2, 9, dtype=torch.long), 4, tmp_path / "x.png", codebook_size=64)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        save_code_maps(
            torch.zeros(2, 32, 32), torch.zeros(2, 16, dtype=torch.long), 4, tmp_path / "x.png", codebook_size=64
        )
    assert not (tmp_path / "x.png").exists()


def test_reconstructions_put_originals_above(tmp_path):
    originals = two_images()
    path = save_reconstructions(originals, 1 - originals, tmp_path / "sub" / "rec.png")
    pixels = read_png(path)
    assert pixels.shape[1] > pixels.shape[0] * 0.6  # two columns, two rows
    top, bottom = pixels[: pixels.shape[0] // 2], pixels[pixels.shape[0] // 2 :]
    blue = lambda part: ((part[..., 2] > 200) & (part[..., 0] < 60) & (part[..., 1] < 60)).mean()  # noqa: E731
    yellow = lambda part: ((part[..., 0] > 200) & (part[..., 1] > 200) & (part[..., 2] < 60)).mean()  # noqa: E731
    assert blue(top) > 0.05 and blue(bottom) < 0.01  # image 1 (blue) above its inverse (yellow)
    assert yellow(bottom) > 0.05 and yellow(top) < 0.01
    with pytest.raises(ValueError, match="2 originals but 1 reconstructions"):
        save_reconstructions(originals, originals[:1], tmp_path / "rec.png")


def test_codebook_usage_with_and_without_perplexity(tmp_path):
    steps = list(range(0, 200, 10))
    usage = [1 - math.exp(-s / 50) for s in steps]
    alone = read_png(save_codebook_usage(steps, usage, tmp_path / "usage.png"))
    both = read_png(
        save_codebook_usage(
            torch.tensor(steps), torch.tensor(usage), tmp_path / "both.png", perplexity=[1 + s for s in steps]
        )
    )
    assert both.shape[1] > 1.5 * alone.shape[1]  # a second panel for perplexity
    with pytest.raises(ValueError, match="20 steps but 19 values of perplexity"):
        save_codebook_usage(steps, usage, tmp_path / "x.png", perplexity=usage[1:])
    assert no_temporary_files(tmp_path)


def test_loss_curves_one_line_per_present_key(tmp_path):
    records = [{"step": s, "loss": 5 / (1 + s), "image_loss": 6 / (1 + s), "lr": 1e-3} for s in range(0, 100, 5)]
    records[3]["loss"] = float("nan")  # a skipped step
    records.append({"step": 50, "loss": 0.1, "image_loss": 0.1})  # logged again after a resume
    one = read_png(save_loss_curves(records, tmp_path / "one.png", ["loss"]))
    two = read_png(save_loss_curves(records, tmp_path / "two.png", ["loss", "image_loss", "text_loss"]))
    assert one.shape == two.shape and (one != two).any()
    # the second line is drawn in matplotlib's second color (orange)
    orange = lambda p: ((np.abs(p.astype(float) - [255, 127, 14]).sum(axis=2)) < 40).sum()  # noqa: E731
    assert orange(two) > 50 and orange(one) == 0
    with pytest.raises(ValueError, match="None of the keys"):
        save_loss_curves(records, tmp_path / "x.png", ["text_loss"])


def test_loss_curves_draw_a_panel_per_group_and_smooth_noisy_curves(tmp_path):
    from beit3.visualization import _moving_average

    noise = np.random.default_rng(0).normal(0, 0.5, 200)
    records = [
        {"step": s, "loss": 3 / (1 + s / 50) + noise[s], "image_accuracy": s / 200, "lr": 1e-3 * min(1, s / 20)}
        for s in range(200)
    ]
    panels = {
        "loss": ["loss", "text_loss"],
        "accuracy": ["image_accuracy", "pair_accuracy"],
        "learning rate": ["lr"],
        "none": ["x"],
    }
    three = read_png(save_loss_curves(records, tmp_path / "three.png", panels, title="run"))
    one = read_png(save_loss_curves(records, tmp_path / "one.png", {"loss": ["loss"]}))
    assert three.shape[0] > 2 * one.shape[0]  # three panels stacked (the empty one left out)
    raw = read_png(save_loss_curves(records, tmp_path / "raw.png", {"loss": ["loss"]}, smoothing=0.0))
    assert (raw != one).any()  # the smoothed line is drawn over the raw one
    values = np.array([1.0, 1.0, 1.0])
    assert np.allclose(_moving_average(values, 0.9), values)  # debiased: a constant stays itself from the first point
    smoothed = _moving_average(np.array([r["loss"] for r in records]), 0.8)
    assert np.abs(np.diff(smoothed)).mean() < 0.5 * np.abs(np.diff([r["loss"] for r in records])).mean()
    assert no_temporary_files(tmp_path)


def test_captioned_images_draw_one_panel_per_image(tmp_path):
    from PIL import Image

    from beit3.visualization import save_captioned_images

    images = torch.rand(5, 3, 16, 16)
    path = save_captioned_images(
        images, [f"caption {i}\nsecond line" for i in range(5)], tmp_path / "grid.png", columns=3, title="t"
    )
    with Image.open(path) as picture:
        width, height = picture.size
    assert width > height  # 3 columns, 2 rows
    with pytest.raises(ValueError, match="5 images but 4 texts"):
        save_captioned_images(images, ["x"] * 4, tmp_path / "bad.png")
