"""NLVR2: a statement about a pair of images, true or false.

Inputs, as in the lil-lab/nlvr repository (``nlvr2/data/{train,dev,test1}.json``, JSON Lines despite the name):
    {"identifier": "dev-850-0-0", "sentence": "...", "label": "True" | "False", "directory": 12 (train only), ...}
    images: <image_root>/[<directory>/]<identifier without its last -field>-img0.png and -img1.png
    (train: image_root = images/train, whose images sit in numbered subfolders; dev: dev/; test-P: test1/).
Or the official BEiT-3 index ``nlvr2.{train,dev,test-P}.index.jsonl``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import (
    DatasetRecords,
    check_images_exist,
    encode_text,
    load_rgb,
    read_index,
    read_jsonl,
    require_text,
    transform_image,
)


@dataclass
class Nlvr2Record:
    """One example: ``label`` 1 if the statement is true of the pair. The official index holds the
    statement as piece ids (``text_ids``) instead of ``sentence``."""

    identifier: str
    sentence: str | None
    label: int
    image_paths: tuple[str, str]
    text_ids: list[int] | None = None


def pair_image_names(identifier: str) -> tuple[str, str]:
    """``"train-10171-0-0"`` -> (``"train-10171-0-img0.png"``, ``"train-10171-0-img1.png"``): one pair serves several statements."""
    stem = identifier.rsplit("-", 1)[0]
    return f"{stem}-img0.png", f"{stem}-img1.png"


def _label(value, where: str) -> int:
    if value in ("True", "true", True):
        return 1
    if value in ("False", "false", False):
        return 0
    raise ValueError(f'{where} has label {value!r}; NLVR2 labels are "True" or "False".')


def read_nlvr2(
    jsonl_file: str | os.PathLike, image_root: str | os.PathLike, check_images: bool = True
) -> list[Nlvr2Record]:
    """The lil-lab JSON Lines file of one split; images under ``image_root`` (and its ``directory`` subfolder, for train)."""
    rows = read_jsonl(jsonl_file, columns=["identifier", "sentence", "label"], optional=["directory"])
    records = []
    for number, row in enumerate(rows, 1):
        where = f"{jsonl_file}:{number} ({row['identifier']})"
        folder = Path(image_root) / str(row["directory"]) if row.get("directory") is not None else Path(image_root)
        names = pair_image_names(row["identifier"])
        records.append(
            Nlvr2Record(
                identifier=row["identifier"],
                sentence=require_text(row["sentence"], where),
                label=_label(row["label"], where),
                image_paths=(str(folder / names[0]), str(folder / names[1])),
            )
        )
    if check_images:
        check_images_exist((p for r in records for p in r.image_paths), f"NLVR2 images of {Path(jsonl_file).name}")
    return records


def read_nlvr2_index(
    index_file: str | os.PathLike, data_root: str | os.PathLike, check_images: bool = True
) -> list[Nlvr2Record]:
    """The official index: lines ``{"image_path", "image2_path", "text_segment", "label", "identifier"}``, paths
    relative to ``data_root``, the statement as piece ids of ``beit3.spm``."""
    return read_index(
        index_file,
        ["image_path", "image2_path", "text_segment", "label", "identifier"],
        lambda row: Nlvr2Record(
            identifier=row["identifier"],
            sentence=None,
            label=int(row["label"]),
            text_ids=list(row["text_segment"]),
            image_paths=(os.path.join(data_root, row["image_path"]), os.path.join(data_root, row["image2_path"])),
        ),
        lambda record: record.image_paths,
        "statement",
        check_images,
    )


class Nlvr2DatasetRecords(DatasetRecords):
    """NLVR2 records from a user's ``datasets.Dataset``: two image columns (left, right), a statement column and a
    label column (True/False, 1/0 or "True"/"False"), one row at a time, the images undecoded until read. The
    identifier is a column or the row number."""

    def __init__(
        self,
        dataset,
        left: str = "left_image",
        right: str = "right_image",
        sentence: str = "sentence",
        label: str = "label",
        identifier: str | None = None,
    ):
        columns = {
            "left": left,
            "right": right,
            "sentence": sentence,
            "label": label,
            **({"identifier": identifier} if identifier else {}),
        }
        super().__init__(dataset, Nlvr2Record, **columns)

    def record(self, row: dict, row_number: int) -> Nlvr2Record:
        where = f"Row {row_number}"
        value = row[self.columns["label"]]
        return Nlvr2Record(
            identifier=str(row[self.columns["identifier"]]) if "identifier" in self.columns else str(row_number),
            sentence=require_text(row[self.columns["sentence"]], where),
            label=int(value) if value in (0, 1) and not isinstance(value, str) else _label(value, where),
            image_paths=(row[self.columns["left"]], row[self.columns["right"]]),
        )


class Nlvr2Dataset(torch.utils.data.Dataset):
    """Items for ``Beit3ForVisualReasoning``:

        pixel_values (2, C, H, W) (left image, right image), input_ids (T,), attention_mask (T,),
        labels () long, 1 = true; identifier (a string).

    ``image_transform`` is applied to each image separately (so a random augmentation differs between them).
    """

    def __init__(self, records: Sequence[Nlvr2Record], image_transform, tokenizer, max_length: int = 64):
        self.records, self.image_transform, self.tokenizer, self.max_length = (
            list(records),
            image_transform,
            tokenizer,
            max_length,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        pixel_values = torch.stack(
            [transform_image(self.image_transform, load_rgb(path)) for path in record.image_paths]
        )
        return {
            "pixel_values": pixel_values,
            **encode_text(self.tokenizer, record.sentence, record.text_ids, self.max_length),
            "labels": torch.tensor(record.label),
            "identifier": record.identifier,
        }
