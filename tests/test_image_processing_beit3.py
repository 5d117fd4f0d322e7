"""Beit3ImageProcessor: unilm's transforms, every PIL mode to RGB, arrays, errors, save/load."""

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from transformers import AutoImageProcessor

from beit3 import Beit3ImageProcessor, Beit3ImageProcessorPil

S = 32
BICUBIC = T.InterpolationMode.BICUBIC
# Constant images come out the same from both backends, whatever the resize.
TOLERANCE = 1e-5


def random_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def unilm_vl(image, size=S):
    """unilm's evaluation transform for the vision-language tasks."""
    return T.Compose(
        [T.Resize((size, size), interpolation=BICUBIC), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    )(image)


def unilm_imagenet(image, size=S):
    return T.Compose(
        [
            T.Resize(size, interpolation=BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )(image)


def pixels(processor, images):
    return processor(images, return_tensors="pt")["pixel_values"]


def assert_close_to_pil_resize(result, expected, std=(0.5, 0.5, 0.5)):
    """The torchvision backend resizes tensors (antialiased bicubic, its own rounding and clamping between the
    two passes): on random noise, the worst case, it stays within a gray level on average of PIL's resize."""
    levels = (result - expected).abs() * torch.tensor(std).view(3, 1, 1) * 255
    assert levels.mean() < 0.5 and levels.max() < 12, (levels.mean(), levels.max())


def test_defaults_are_the_released_vl_models_transform():
    processor = Beit3ImageProcessor()
    assert (processor.size.height, processor.size.width) == (224, 224) and not processor.do_center_crop
    assert tuple(processor.image_mean) == tuple(processor.image_std) == (0.5, 0.5, 0.5)
    assert pixels(processor, random_image(100, 300)).shape == (1, 3, 224, 224)


@pytest.mark.parametrize("height, width", [(50, 70), (71, 33)])
def test_squash_resize_matches_unilm(height, width):
    image = random_image(height, width)
    expected = unilm_vl(image)
    assert torch.equal(pixels(Beit3ImageProcessorPil(size=S), image)[0], expected)  # bit-exact: both resize with PIL
    assert_close_to_pil_resize(pixels(Beit3ImageProcessor(size=S), image)[0], expected)


@pytest.mark.parametrize("height, width", [(50, 70), (94, 64), (40, 33)])
def test_imagenet_option_matches_unilm_resize_and_center_crop(height, width):
    # (94, 64) resizes to 47 x 32, so the crop offset is 7.5: torchvision rounds it to 8, a floor would give 7.
    image = random_image(height, width, seed=1)
    expected = unilm_imagenet(image)
    assert torch.equal(pixels(Beit3ImageProcessorPil.for_imagenet(size=S), image)[0], expected)
    assert_close_to_pil_resize(
        pixels(Beit3ImageProcessor.for_imagenet(size=S), image)[0], expected, IMAGENET_DEFAULT_STD
    )


def test_imagenet_crop_pct_resizes_the_shorter_side_to_size_over_crop_pct():
    processor = Beit3ImageProcessor.for_imagenet(size=S, crop_pct=0.8)
    assert processor.size.shortest_edge == 40 and (processor.crop_size.height, processor.crop_size.width) == (S, S)
    assert tuple(processor.image_mean) == tuple(IMAGENET_DEFAULT_MEAN)


def level(value):
    """A gray level 0..255 after the default normalization."""
    return (value / 255 - 0.5) / 0.5


@pytest.mark.parametrize("processor_class", [Beit3ImageProcessor, Beit3ImageProcessorPil])
def test_every_pil_mode_becomes_rgb(processor_class):
    processor = processor_class(size=S)
    rgb = random_image(40, 40, seed=2)
    transparent = rgb.convert("RGBA")
    transparent.putalpha(0)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette_with_transparency = palette.copy()
    palette_with_transparency.info["transparency"] = 0
    images = {
        "L": (Image.new("L", (40, 40), 200), torch.full((3, S, S), level(200))),
        "1": (Image.new("1", (40, 40), 1), torch.full((3, S, S), level(255))),
        "RGBA opaque": (rgb.convert("RGBA"), pixels(processor, rgb)[0]),
        "RGBA transparent": (transparent, torch.full((3, S, S), level(255))),  # composited on white
        "LA": (Image.new("LA", (40, 40), (90, 255)), torch.full((3, S, S), level(90))),
        "P": (rgb.convert("P"), pixels(processor, rgb.convert("P").convert("RGB"))[0]),
        "P flat": (palette, torch.stack([torch.full((S, S), level(v)) for v in (10, 20, 30)])),
        "P transparent": (palette_with_transparency, torch.full((3, S, S), level(255))),  # composited on white
        "CMYK": (
            Image.new("CMYK", (40, 40), (0, 255, 255, 0)),
            torch.stack([torch.full((S, S), level(v)) for v in (255, 0, 0)]),
        ),
        # 16-bit: the top byte, not PIL's clipping (which would make it white)
        "I;16": (Image.fromarray(np.full((40, 40), 0x5A00, dtype=np.uint16)), torch.full((3, S, S), level(0x5A))),
    }
    for mode, (image, expected) in images.items():
        result = pixels(processor, image)
        assert result.shape == (1, 3, S, S) and result.dtype == torch.float32 and torch.isfinite(result).all(), mode
        assert torch.allclose(result[0], expected, atol=TOLERANCE), mode
    assert Image.fromarray(np.zeros((4, 4), dtype=np.uint16)).mode == "I;16"


def test_a_16_bit_gradient_keeps_its_range():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    result = pixels(Beit3ImageProcessorPil(size=64), Image.fromarray(ramp))[0, 0]
    assert (
        result.min() == pytest.approx(level(0))
        and result.max() == pytest.approx(level(255))
        and result[:, 32].mean() < 0.1
    )


@pytest.mark.parametrize("processor_class", [Beit3ImageProcessor, Beit3ImageProcessorPil])
def test_arrays_tensors_paths_and_batches(processor_class, tmp_path):
    processor = processor_class(size=S)
    image = random_image(45, 60, seed=3)
    expected = pixels(processor, image)
    array = np.array(image)
    image.save(tmp_path / "image.png")
    for same in (array, torch.from_numpy(array).permute(2, 0, 1), str(tmp_path / "image.png"), tmp_path / "image.png"):
        assert torch.allclose(pixels(processor, same), expected, atol=1e-6)
    gray = np.full((45, 60), 30, dtype=np.uint8)
    assert torch.allclose(pixels(processor, gray)[0], torch.full((3, S, S), level(30)), atol=1e-6)
    batch = pixels(processor, [image, random_image(20, 90, seed=4), array])
    assert batch.shape == (3, 3, S, S) and torch.allclose(batch[0], batch[2], atol=1e-6)
    stacked = pixels(processor, np.stack([array, array[::-1]]))
    assert stacked.shape == (2, 3, S, S) and torch.allclose(stacked[0], expected[0], atol=1e-6)


def test_inputs_that_are_not_images_get_clear_errors(tmp_path):
    processor = Beit3ImageProcessor(size=S)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        processor(str(tmp_path / "missing.jpg"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes.txt is not an image file"):
        processor(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="got a dict"):
        processor({"image": 1})
    with pytest.raises(TypeError, match="got a NoneType"):
        processor([random_image(8, 8), None])
    with pytest.raises(ValueError, match=r"got shape \(40, 40, 7\)"):
        processor(np.zeros((40, 40, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(40,\)"):
        processor(torch.zeros(40))


def test_save_and_load_through_auto_image_processor(tmp_path):
    Beit3ImageProcessor(size=480).save_pretrained(tmp_path / "vl")
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "vl")
    assert type(loaded) is Beit3ImageProcessor and (loaded.size.height, loaded.size.width) == (480, 480)
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "vl", backend="pil")) is Beit3ImageProcessorPil
    Beit3ImageProcessorPil.for_imagenet(size=S).save_pretrained(tmp_path / "imagenet")
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "imagenet", backend="pil")
    image = random_image(50, 70)
    assert loaded.do_center_crop and torch.equal(pixels(loaded, image)[0], unilm_imagenet(image))


def test_a_decompression_bomb_path_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"bomb\.png has more pixels than PIL reads by default"):
        Beit3ImageProcessor(size=32)(str(path))
