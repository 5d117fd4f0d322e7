"""COCO and Flickr30k in Karpathy's splits (``dataset_coco.json``, ``dataset_flickr30k.json``), for retrieval and captioning.

Input: {"images": [{"filename", "filepath" (COCO: train2014 | val2014), "split": train | restval | val | test,
                    "cocoid" (COCO) | "imgid", "sentences": [{"raw", "tokens", ...}]}]}
Images: <image_root>/<filepath>/<filename> for COCO (image_root holds train2014/ and val2014/), and
<image_root>/<filename> for Flickr30k (image_root = the flickr30k-images folder).

Ids, as the official BEiT-3 index files have them: retrieval items carry ``image_id`` = the running
index of the image within the split (its 5 captions share it); captioning items carry the dataset's
own id (``cocoid``, or ``imgid`` for Flickr30k), the id of the COCO caption ground-truth files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import (
    DatasetRecords,
    as_records,
    check_images_exist,
    encode_text,
    load_rgb,
    pair_lines,
    read_json,
    require_text,
    transform_image,
)

SPLITS = ("train", "val", "test")


@dataclass
class KarpathyImage:
    """An image of a split: ``index`` runs 0..N-1 in the split; ``source_id`` is cocoid (COCO) or imgid (Flickr30k)."""

    index: int
    source_id: int
    image_path: str
    captions: list[str]


@dataclass
class CaptionRecord:
    """An image with one caption (retrieval, captioning training) or with all its ``references`` (captioning evaluation)."""

    image_id: int
    image_path: str
    caption: str | None = None
    references: list[str] | None = None


def read_karpathy(
    split_file: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str,
    include_restval: bool = True,
    check_images: bool = True,
) -> list[KarpathyImage]:
    """The images of ``split`` (train, val or test) with their raw captions, in file order.

    ``include_restval``: train also takes Karpathy's "restval" images (COCO's 113,287 training images, as BEiT-3 trains).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    data = read_json(split_file)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(
            f'{split_file} is not a Karpathy split file: it needs a top-level "images" list (dataset_coco.json).'
        )
    wanted = {"train", "restval"} if split == "train" and include_restval else {split}
    images = []
    for entry in data["images"]:
        if entry["split"] not in wanted:
            continue
        source_id = entry.get("cocoid", entry.get("imgid"))
        captions = [
            require_text(s.get("raw"), f"A caption of {entry['filename']} in {split_file}") for s in entry["sentences"]
        ]
        if not captions:
            raise ValueError(f"{entry['filename']} in {split_file} has no captions; every Karpathy image has some.")
        images.append(
            KarpathyImage(
                index=len(images),
                source_id=source_id,
                captions=captions,
                image_path=os.path.join(image_root, entry.get("filepath", ""), entry["filename"]),
            )
        )
    if not images:
        raise ValueError(f"{split_file} has no images in split {split!r}.")
    if check_images:
        check_images_exist((im.image_path for im in images), f"{split} images of {Path(split_file).name}")
    return images


def retrieval_records(images: Sequence[KarpathyImage]) -> list[CaptionRecord]:
    """One record per caption, ``image_id`` = the image's running index in the split."""
    return [CaptionRecord(image_id=im.index, image_path=im.image_path, caption=c) for im in images for c in im.captions]


def pair_list_records(files: Sequence[str | os.PathLike], check_images: bool = True) -> list[CaptionRecord]:
    """Image-text pairs in the pretraining format, jsonl lines ``{"image": path, "text": caption}`` with paths
    relative to their file (``pair_lines``, pretraining's reader and rule): the corpus of the image-text contrastive stage that BEiT-3's retrieval models start
    from. ``image_id`` numbers the distinct images in order of first appearance."""
    records, ids = [], {}
    for path, text in pair_lines(files):  # pretraining's reader: a bad line is skipped and named
        records.append(CaptionRecord(image_id=ids.setdefault(str(path), len(ids)), image_path=str(path), caption=text))
    if not records:
        raise ValueError(
            f'The pair lists {[str(f) for f in files]} hold no usable pairs (lines {{"image": path, "text": caption}}).'
        )
    if check_images:
        check_images_exist(ids, f"images of the pair lists {[Path(f).name for f in files]}")
    return records


def captioning_records(images: Sequence[KarpathyImage], train: bool) -> list[CaptionRecord]:
    """Training: one record per caption; evaluation: one per image, with its captions as ``references``.
    ``image_id`` = the dataset's id (cocoid / imgid)."""
    if train:
        return [
            CaptionRecord(image_id=im.source_id, image_path=im.image_path, caption=c)
            for im in images
            for c in im.captions
        ]
    return [
        CaptionRecord(image_id=im.source_id, image_path=im.image_path, references=list(im.captions)) for im in images
    ]


def _require_captions(records: Sequence[CaptionRecord]) -> None:
    """Every record has a caption with a word in it (an error names the first that has none)."""
    if isinstance(records, DatasetRecords):  # the captions column alone: reading rows would read every image
        for row, caption in enumerate(records.values("caption")):
            require_text(caption, f"The record of image {row}")
    else:
        for record in records:
            require_text(record.caption, f"The record of image {record.image_id} ({record.image_path})")


class TextOnlyDataset(torch.utils.data.Dataset):
    """Each caption once, for retrieval evaluation (text embeddings): input_ids (T,), attention_mask (T,), image_id () long."""

    def __init__(self, records: Sequence[CaptionRecord], tokenizer, max_length: int = 64):
        self.records = records if isinstance(records, DatasetRecords) else list(records)
        self.tokenizer, self.max_length = tokenizer, max_length
        _require_captions(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def _text(self, record: CaptionRecord) -> dict[str, torch.Tensor]:
        return {
            **encode_text(self.tokenizer, record.caption, max_length=self.max_length),
            "image_id": torch.tensor(record.image_id),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self._text(self.records[index])


class ImageTextDataset(TextOnlyDataset):
    """Image-caption pairs, for retrieval training (``Beit3ForImageTextRetrieval``) and captioning training
    (``Beit3ForCaptioning``, after a collator masks the caption):

        pixel_values (C, H, W), input_ids (T,), attention_mask (T,), image_id () long.

    ``records``: ``CaptionRecord``s, or a ``datasets.Dataset`` with an image column (``Image()`` or file paths) and a
    caption column (``image_column``, ``text_column``); its row number is the image id.
    """

    def __init__(
        self,
        records,
        image_transform,
        tokenizer,
        max_length: int = 64,
        image_column: str = "image",
        text_column: str = "caption",
    ):
        super().__init__(
            as_records(records, CaptionRecord, image_path=image_column, caption=text_column), tokenizer, max_length
        )
        self.image_transform = image_transform

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        return {
            "pixel_values": transform_image(self.image_transform, load_rgb(record.image_path)),
            **self._text(record),
        }


class ImageOnlyDataset(torch.utils.data.Dataset):
    """Each image once, for retrieval evaluation (image embeddings) and caption generation:

    pixel_values (C, H, W), image_id () long (running index for KarpathyImage, the record's id for CaptionRecord).
    """

    def __init__(self, items: Sequence[KarpathyImage | CaptionRecord], image_transform):
        self.items, self.image_transform = list(items), image_transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        image_id = item.index if isinstance(item, KarpathyImage) else item.image_id
        return {
            "pixel_values": transform_image(self.image_transform, load_rgb(item.image_path)),
            "image_id": torch.tensor(image_id),
        }
