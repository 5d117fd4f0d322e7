"""Two views of one crop, BEiT's augmentation for masked image modeling, and the fixed center view for precomputed codes.

The model sees one view and the visual tokenizer the other. Both come from the same random
resized crop, after the same flip and color jitter, so a masked patch and its visual token
describe the same pixels. ``CenterView`` is the one view left when the codes were computed
beforehand (``tokenizers/encode_images.py``): a fixed center crop, so the codes still fit.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "lanczos": T.InterpolationMode.LANCZOS,
    "nearest": T.InterpolationMode.NEAREST,
}


class TwoViewTransform:
    """PIL image -> (model view, tokenizer view).

    Args:
        model_size, tokenizer_size: output sides in pixels (224 and 224 for VQ-KD; BEiT v1 gave
            the dVAE a 112 px view).
        scale, ratio: RandomResizedCrop's area and aspect ranges (BEiT v2: scale (0.2, 1)).
        color_jitter: brightness/contrast/saturation strength (0.4), 0 to turn off.
        hflip: probability of a horizontal flip.
        mean, std: normalization of the model view (0.5 as the released BEiT-3 models).
    Returns:
        model view (3, model_size, model_size), normalized; tokenizer view (3, tokenizer_size,
        tokenizer_size) in [0, 1] (each visual tokenizer applies its own input mapping).

    The random draws (jitter factors and their order, flip, crop box) come from ``rng``, a ``random.Random``
    (default: the ``random`` module, which DataLoader workers seed apart). They are Python draws rather than
    torchvision's transforms because those draw from torch's generator one tensor at a time: for the demo's
    small images the draws cost more than the pixels (a crop box with scale (1, 1) took 124 us, the resize 70).
    The distributions are torchvision's: ``RandomResizedCrop``'s box, ``ColorJitter`` in random order.
    """

    def __init__(
        self,
        model_size: int = 224,
        tokenizer_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float = 0.4,
        hflip: float = 0.5,
        model_interpolation: str = "bicubic",
        tokenizer_interpolation: str = "bicubic",
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ):
        self.model_size, self.tokenizer_size = model_size, tokenizer_size
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.color_jitter, self.hflip = color_jitter, hflip
        self.model_interpolation = _INTERPOLATION[model_interpolation]
        self.tokenizer_interpolation = _INTERPOLATION[tokenizer_interpolation]
        self.mean, self.std = list(mean), list(std)

    def crops(
        self,
        image: Image.Image,
        tokenizer_view: bool = True,
        rng: random.Random | None = None,
        model_view: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The two views as uint8 tensors (3, size, size), before ``finish``; either is None when not asked for.

        The random draws are the same whichever views are asked for: a view left out changes no other view.

        The float conversion and normalization are left to ``finish`` on the whole batch: per image they cost
        more than the crop itself.
        """
        rng = random if rng is None else rng
        image = jitter_colors(image.convert("RGB"), self.color_jitter, rng)
        if self.hflip and rng.random() < self.hflip:
            image = TF.horizontal_flip(image)
        top, left, height, width = crop_box(image.width, image.height, self.scale, self.ratio, rng)

        def view(size, interpolation):
            crop = TF.resized_crop(image, top, left, height, width, [size] * 2, interpolation, antialias=True)
            return torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)

        return (
            view(self.model_size, self.model_interpolation) if model_view else None,
            view(self.tokenizer_size, self.tokenizer_interpolation) if tokenizer_view else None,
        )

    def finish(self, model_views: torch.Tensor | None, tokenizer_views: torch.Tensor | None = None):
        """uint8 views (..., 3, S, S) from ``crops`` (one or stacked) -> (model views normalized, tokenizer views in
        [0, 1]); None stays None."""
        model = (
            None
            if model_views is None
            else TF.normalize(TF.to_dtype(model_views, torch.float32, scale=True), self.mean, self.std)
        )
        return model, None if tokenizer_views is None else TF.to_dtype(tokenizer_views, torch.float32, scale=True)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(*self.crops(image, rng=rng))


def crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """A random resized crop's (top, left, height, width), distributed as ``T.RandomResizedCrop.get_params``'s:
    up to 10 draws of an area fraction in ``scale`` and a log-uniform aspect in ``ratio`` that fit the image,
    else the largest centered box within ``ratio``."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    w, h = width, height
    if width / height < min(ratio):
        h = round(width / min(ratio))
    elif width / height > max(ratio):
        w = round(height * max(ratio))
    return (height - h) // 2, (width - w) // 2, h, w


_ADJUSTMENTS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def jitter_colors(image: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """``T.ColorJitter(strength, strength, strength)``: brightness, contrast and saturation, each by a factor
    uniform in [max(0, 1 - strength), 1 + strength], in random order; the image itself at strength 0."""
    if not strength:
        return image
    for adjust in rng.sample(_ADJUSTMENTS, len(_ADJUSTMENTS)):
        image = adjust(image, rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return image


class CenterView:
    """PIL image -> the model's view of a fixed center crop, for masked image modeling on precomputed codes.

    The shorter side is resized (bicubic) to ``size`` and the center ``size`` x ``size`` square kept: the
    crop ``tokenizers/encode_images.py`` gives the tokenizer (``beit3.data.images.tokenizer_transform``),
    here at the model's size, so patch k covers the pixels that code k was computed from. Hence no random
    crop and no flip: either would move the pixels away from their codes. Color jitter is kept, on this
    view only: it changes colors, not where things are, so the targets still describe the right patches
    (the codes are those of the unjittered image; ``color_jitter=0`` turns it off).

    Returns (3, size, size), normalized with ``mean``/``std`` (0.5, as ``TwoViewTransform``'s model view).
    """

    def __init__(
        self,
        size: int = 224,
        color_jitter: float = 0.4,
        interpolation: str = "bicubic",
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ):
        self.size, self.color_jitter = size, color_jitter
        self.resize = T.Compose(
            [T.Resize(size, interpolation=_INTERPOLATION[interpolation], antialias=True), T.CenterCrop(size)]
        )
        self.finish = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """``rng`` draws the jitter (default: the ``random`` module), as in ``TwoViewTransform``."""
        return self.finish(
            jitter_colors(self.resize(image.convert("RGB")), self.color_jitter, random if rng is None else rng)
        )
