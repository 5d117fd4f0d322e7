"""ImageNet-style classification data: one folder per class (``<root>/<class>/<image>``).

The class index is the position of the folder name in the sorted list of the *training* folders,
as the official index does; read the validation folder with the training ``classes`` so that both
agree even if a class is absent from one of them. ``read_hf_imagefolder`` reads the same layout
(or one with ``train/`` and ``val/`` split folders) through ``datasets``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import as_records, check_images_exist, load_rgb, transform_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


@dataclass
class ImageRecord:
    image_path: str
    label: int


@dataclass
class ImageFolderSplit:
    """The records, and the class names indexed by label."""

    records: list[ImageRecord]
    classes: list[str]


def read_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolderSplit:
    """Every image under ``root/<class>/`` (subfolders included), sorted by path within a class.

    ``classes``: the class names in label order (from the training split); None: the sorted folder names of ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"No image folder at {root}.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    classes = list(classes) if classes is not None else folders
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders that the given classes lack: {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                         f"({len(unknown)} in all). Pass the training split's classes, or check the folder.")
    label_of = {name: label for label, name in enumerate(classes)}
    records = [ImageRecord(str(path), label_of[name]) for name in folders
               for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    if not records:
        raise ValueError(f"No images in class folders under {root} (expected <root>/<class>/<image> with suffixes {IMAGE_SUFFIXES}).")
    return ImageFolderSplit(records, classes)


def read_hf_imagefolder(root: str | os.PathLike, split: str = "train") -> ImageFolderSplit:
    """The same records from ``datasets``' ``imagefolder`` builder on a local folder: class folders directly
    under ``root`` (split "train"), or split folders holding class folders (``train/``; ``val/`` or
    ``validation/`` -> split "validation"; ``test/``). The labels are the builder's: the sorted class
    names over all splits. Images are not decoded here."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    if not Path(root).is_dir():
        raise FileNotFoundError(f"No image folder at {root}.")
    data = load_dataset("imagefolder", data_dir=str(root), split=split)
    if "label" not in data.column_names:
        raise ValueError(f"{root} has no class folders, so imagefolder found no labels; expected <root>/<class>/<image>.")
    classes = list(data.features["label"].names)
    data = data.cast_column("image", ImageFeature(decode=False))
    records = [ImageRecord(row["image"]["path"], row["label"]) for row in data]
    check_images_exist((r.image_path for r in records), f"images of {root}")
    return ImageFolderSplit(records, classes)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Items for ``Beit3ForImageClassification``: pixel_values (C, H, W), labels () long.

    ``records``: ``ImageRecord``s, or a ``datasets.Dataset`` with an image column (``Image()`` or file paths) and an
    integer label column, e.g. ``load_dataset("imagefolder", ...)["train"]`` (``image_column``, ``label_column``).
    ``image_transform``: e.g. ``Beit3ImageProcessor.for_imagenet()`` for evaluation, or timm's
    ``create_transform(..., is_training=True)`` for training.
    """

    def __init__(self, records, image_transform, image_column: str = "image", label_column: str = "label"):
        self.records = as_records(records, ImageRecord, image_path=image_column, label=label_column)
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        return {"pixel_values": transform_image(self.image_transform, load_rgb(record.image_path)), "labels": torch.tensor(record.label)}
