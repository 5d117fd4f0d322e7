"""ImageNet-style classification data: one folder per class (``<root>/<class>/<image>``).

The class index is the position of the folder name in the sorted list of the *training* folders,
as the official index does; read the validation folder with the training ``classes`` so that both
agree even if a class is absent from one of them. A ``datasets`` dataset (``load_dataset("imagefolder")``,
or any with an image and a label column) feeds ``ImageClassificationDataset`` as well.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import as_records, load_rgb, transform_image
from .images import IMAGE_SUFFIXES


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
        raise ValueError(
            f"{root} has class folders that the given classes lack: {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
            f"({len(unknown)} in all). Pass the training split's classes, or check the folder."
        )
    label_of = {name: label for label, name in enumerate(classes)}
    records = [
        ImageRecord(str(path), label_of[name])
        for name in folders
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not records:
        raise ValueError(
            f"No images in class folders under {root} (expected <root>/<class>/<image> with suffixes {IMAGE_SUFFIXES})."
        )
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
        return {
            "pixel_values": transform_image(self.image_transform, load_rgb(record.image_path)),
            "labels": torch.tensor(record.label),
        }
