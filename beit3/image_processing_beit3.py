"""BEiT-3 image processors: turn images into the ``pixel_values`` (B, 3, S, S) the model takes.

The defaults are those of the released vision-language models (unilm's evaluation transform for
VQAv2, NLVR2, retrieval and captioning): resize to (S, S) with bicubic interpolation, no crop, so
the aspect ratio is not kept, scale to [0, 1], normalize with mean = std = 0.5. S is 224 here; the
released models use 224 (NLVR2), 384 (retrieval) and 480 (VQAv2, captioning), so pass ``size=S``.
``for_imagenet()`` gives the ImageNet evaluation transform instead: bicubic resize of the shorter
side to S / crop_pct, center crop S, ImageNet mean and std.

Two backends, as transformers' own ViT and BEiT processors have: ``Beit3ImageProcessor`` resizes
torch tensors with torchvision (antialiased bicubic, within a few gray levels of PIL) and is what
``AutoImageProcessor`` picks; ``Beit3ImageProcessorPil`` resizes with PIL, as unilm does, for
bit-exact reproduction of the official numbers (``AutoImageProcessor.from_pretrained(..., backend="pil")``).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, is_valid_image

# timm's IMAGENET_INCEPTION_MEAN / STD, which unilm uses for every vision-language task
VL_MEAN = (0.5, 0.5, 0.5)
VL_STD = (0.5, 0.5, 0.5)
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # (PIL opens 16-bit PNGs as I or I;16)


class _Beit3ImageProcessing:
    """Defaults and input handling shared by both backends (a mixin, placed before the backend class)."""

    resample = PILImageResampling.BICUBIC
    size = {"height": 224, "width": 224}
    image_mean = VL_MEAN
    image_std = VL_STD
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def for_imagenet(cls, size: int = 224, crop_pct: float = 1.0, **kwargs):
        """The ImageNet evaluation transform: shorter side to ``int(size / crop_pct)``, center crop ``size``.

        unilm's ImageNet fine-tuning leaves ``crop_pct`` at None, which means 1.0: resize to 224, crop 224.
        """
        return cls(
            size={"shortest_edge": int(size / crop_pct)},
            do_center_crop=True,
            crop_size={"height": size, "width": size},
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
            **kwargs,
        )

    def fetch_images(self, images):
        """Opens file paths with PIL and checks that everything else is an image, keeping the nesting."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        if isinstance(images, (str, os.PathLike)):
            if str(images).startswith(("http://", "https://")):
                return super().fetch_images(str(images))
            return open_image(images)
        if isinstance(images, Image.Image):
            return images
        if is_valid_image(images):
            return _checked_array(images)
        raise TypeError(
            f"{type(self).__name__} takes PIL images, numpy arrays or torch tensors shaped (H, W), (H, W, C) "
            f"or (C, H, W), image file paths, or lists of these; got a {type(images).__name__}."
        )

    def process_image(self, image, *args, **kwargs):
        """One image -> channels-first RGB in the backend's format; 16-bit images are scaled to 8 bits first."""
        if isinstance(image, Image.Image):
            image = eight_bit(image)
        return super().process_image(image, *args, **kwargs)

    def center_crop(self, image, size, **kwargs):
        """Crops (..., H, W) to ``size`` around the center, rounding the offsets as torchvision's CenterCrop does."""
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # pads first
        top, left = int(round((height - size.height) / 2.0)), int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


class Beit3ImageProcessor(_Beit3ImageProcessing, TorchvisionBackend):
    r"""BEiT-3 image processor on the torchvision backend.

    Args (all optional; each can also be passed per call):
        size: the output side S (an int, or ``{"height": S, "width": S}``); ``{"shortest_edge": S}``
            with ``do_center_crop`` and ``crop_size`` for resize-and-crop (see ``for_imagenet``).
        resample: interpolation, bicubic by default.
        image_mean, image_std: normalization, 0.5 by default (ImageNet's for ``for_imagenet``).
        do_convert_rgb: convert grayscale, RGBA (composited on white), palette, CMYK and 16-bit images to RGB.
    Returns (on call, with ``return_tensors="pt"``):
        ``BatchFeature`` with ``pixel_values`` (B, 3, S, S), float32.
    """


class Beit3ImageProcessorPil(_Beit3ImageProcessing, PilBackend):
    r"""BEiT-3 image processor on the PIL backend: the same arguments and output as ``Beit3ImageProcessor``,
    resized with PIL exactly as unilm's torchvision-on-PIL transforms do."""


def _checked_array(image):
    """A numpy array or torch tensor holding one image, (H, W), (H, W, C) or (C, H, W), or a batch (B, ...) of
    three-dimensional ones; a grayscale (H, W) gets its channel axis here, as transformers takes only 3 or 4 dims."""
    shape = tuple(image.shape)
    if len(shape) == 2:
        return image[..., None] if isinstance(image, np.ndarray) else image[None]
    single = shape[-3:]
    if len(shape) not in (3, 4) or (single[0] not in (1, 3, 4) and single[-1] not in (1, 3, 4)):
        raise ValueError(
            f"An image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3 or 4, or a batch "
            f"(B, H, W, C) or (B, C, H, W); got shape {shape}."
        )
    return image


class UnreadableImageError(ValueError):
    """An image file that exists but does not decode (corrupt, truncated, empty, not an image, over the pixel limit)."""


def open_image(path, data: bytes | None = None) -> Image.Image:
    """Reads an image fully into memory, from ``path`` or, when given, from its encoded ``data`` (``path`` then
    only names it), with errors that name it. The one opener of the package: the processors, the datasets and
    ``beit3.predict`` read through it (``beit3.data.common.load_rgb`` adds RGB)."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"No image file at {path}.") from None
    # A decompression bomb is neither OSError nor ValueError: a data-loader worker would die of it.
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(
            f"{path} has more pixels than PIL reads by default (2 x PIL.Image.MAX_IMAGE_PIXELS = "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, a guard against decompression bombs): {error}. "
            "Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(
            f"Cannot read the image {path} ({error}): {path} is not an image file PIL can read. "
            "Replace the file, or leave it out."
        ) from error
    return image


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale -> 8-bit grayscale by its top byte of 16; other modes pass unchanged.

    PIL's own conversion clips such values to 255, which turns most 16-bit images white.
    """
    if image.mode not in _WIDE_INTEGER_MODES:
        return image
    return Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
