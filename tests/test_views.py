import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2 as T

from beit3.views import TwoViewTransform, crop_box, jitter_colors


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
        assert (shrunk - tokenizer_view).abs().mean() < 0.03 < (other - tokenizer_view).abs().mean() or torch.equal(
            other, tokenizer_view
        )


def test_grayscale_and_rgba_images_become_rgb():
    transform = TwoViewTransform(model_size=32, tokenizer_size=16)
    for mode in ("L", "RGBA", "P"):
        model_view, tokenizer_view = transform(gradient_image(48).convert(mode))
        assert model_view.shape == (3, 32, 32) and tokenizer_view.shape == (3, 16, 16)


def test_views_repeat_under_a_seeded_generator_and_differ_under_another():
    transform = TwoViewTransform(model_size=32, tokenizer_size=32)
    a, b, c = (transform(gradient_image(), rng=random.Random(seed)) for seed in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_crop_boxes_and_jitter_follow_torchvisions_distributions():
    # Our Python-generator draws replace torchvision's (cheaper on small images): same box statistics as
    # RandomResizedCrop.get_params, same jitter as ColorJitter (each factor in [0.6, 1.4], in a random order).
    rng, image = random.Random(0), gradient_image(96)
    for scale, ratio in (((0.2, 1.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (0.5, 2.0))):
        ours = np.array([crop_box(96, 64, scale, ratio, rng) for _ in range(3000)], dtype=float)
        torch.manual_seed(0)
        theirs = np.array(
            [T.RandomResizedCrop.get_params(Image.new("RGB", (96, 64)), list(scale), list(ratio)) for _ in range(3000)],
            dtype=float,
        )
        assert (ours[:, 0] + ours[:, 2] <= 64).all() and (ours[:, 1] + ours[:, 3] <= 96).all() and (ours >= 0).all()
        area_ours, area_theirs = ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3]
        assert abs(area_ours.mean() - area_theirs.mean()) < 0.03 * 96 * 64
        assert abs(np.log(ours[:, 3] / ours[:, 2]).mean() - np.log(theirs[:, 3] / theirs[:, 2]).mean()) < 0.03
    jittered = [np.asarray(jitter_colors(image, 0.4, rng), dtype=float) for _ in range(200)]
    brightness = np.array([j.mean() / np.asarray(image, dtype=float).mean() for j in jittered])
    assert 0.5 < brightness.min() < 0.75 and 1.25 < brightness.max() < 1.5  # roughly the brightness range 0.6-1.4
    assert jitter_colors(image, 0.0, rng) is image


def test_batched_finish_of_uint8_crops_equals_the_one_image_transform():
    transform = TwoViewTransform(model_size=32, tokenizer_size=16, color_jitter=0.4)
    images = [gradient_image(), gradient_image(64).rotate(90)]
    crops, singles = [], []
    for seed, image in enumerate(images):
        singles.append(transform(image, rng=random.Random(seed)))
        crops.append(transform.crops(image, rng=random.Random(seed)))
        assert crops[-1][0].dtype == torch.uint8 and crops[-1][0].shape == (3, 32, 32)
    model, tokenizer = transform.finish(torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops]))
    assert torch.equal(model, torch.stack([s[0] for s in singles])) and torch.equal(
        tokenizer, torch.stack([s[1] for s in singles])
    )
    model_only, none = transform.crops(images[0], tokenizer_view=False, rng=random.Random(0))
    assert none is None and torch.equal(transform.finish(model_only)[0], singles[0][0])
