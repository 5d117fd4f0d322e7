import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from beit3.views import TwoViewTransform


def gradient_image(size=96) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 255, size), np.linspace(0, 255, size))
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def test_both_views_show_the_same_crop():
    transform = TwoViewTransform(model_size=64, tokenizer_size=32, color_jitter=0.4)
    image = gradient_image()
    for _ in range(5):
        model_view, tokenizer_view = transform(image)
        assert model_view.shape == (3, 64, 64) and tokenizer_view.shape == (3, 32, 32)
        assert 0 <= tokenizer_view.min() and tokenizer_view.max() <= 1
        assert model_view.min() < 0  # normalized with mean = std = 0.5
        shrunk = F.interpolate((model_view * 0.5 + 0.5)[None], size=32, mode="bilinear", antialias=True)[0]
        other = transform(image)[1]
        assert (shrunk - tokenizer_view).abs().mean() < 0.03 < (other - tokenizer_view).abs().mean() or torch.equal(other, tokenizer_view)


def test_grayscale_and_rgba_images_become_rgb():
    transform = TwoViewTransform(model_size=32, tokenizer_size=16)
    for mode in ("L", "RGBA", "P"):
        model_view, tokenizer_view = transform(gradient_image(48).convert(mode))
        assert model_view.shape == (3, 32, 32) and tokenizer_view.shape == (3, 16, 16)


def test_views_repeat_under_the_torch_seed():
    transform = TwoViewTransform(model_size=32, tokenizer_size=32)
    torch.manual_seed(5)
    a = transform(gradient_image())
    torch.manual_seed(5)
    b = transform(gradient_image())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batched_finish_of_uint8_crops_equals_the_one_image_transform():
    transform = TwoViewTransform(model_size=32, tokenizer_size=16, color_jitter=0.4)
    images = [gradient_image(), gradient_image(64).rotate(90)]
    crops, singles = [], []
    for seed, image in enumerate(images):
        torch.manual_seed(seed)
        singles.append(transform(image))
        torch.manual_seed(seed)
        crops.append(transform.crops(image))
        assert crops[-1][0].dtype == torch.uint8 and crops[-1][0].shape == (3, 32, 32)
    model, tokenizer = transform.finish(torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops]))
    assert torch.equal(model, torch.stack([s[0] for s in singles])) and torch.equal(tokenizer, torch.stack([s[1] for s in singles]))
    torch.manual_seed(0)
    model_only, none = transform.crops(images[0], tokenizer_view=False)
    assert none is None and torch.equal(transform.finish(model_only)[0], singles[0][0])
