"""What every fine-tuning reader shares: JSON Lines through ``datasets``, image checks and loading,
text encoding to the fixed-length ids the heads take, and splitting a batch into model inputs and ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor

from ..image_processing_beit3 import UnreadableImageError, eight_bit, open_image
from ..log import get_logger

logger = get_logger(__name__)

# Keys a task dataset returns beside the model inputs, to write predictions or score them; the heads
# do not take them, so ``split_batch`` sets them apart.
METADATA_KEYS = ("question_id", "image_id", "identifier", "index")
_SHOWN_MISSING = 5


def read_jsonl(
    path: str | os.PathLike, columns: Sequence[str] | None = None, optional: Sequence[str] = ()
) -> list[dict]:
    """The rows of a JSON Lines file as dicts, read with ``datasets`` (so a big file is parsed by Arrow).

    ``columns``: keep only these fields, which the file must have; ``optional``: also these, where present.
    """
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No JSON Lines file at {path}.")
    try:
        data = load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # datasets wraps the JSON parser's errors in its own types
        raise ValueError(f"{path} is not a JSON Lines file (one JSON object per line): {error}") from error
    if columns is not None:
        missing = [c for c in columns if c not in data.column_names]
        if missing:
            raise ValueError(
                f"{path} has no field(s) {missing}; its fields are {data.column_names}. Is it the right file?"
            )
        data = data.select_columns(list(columns) + [c for c in optional if c in data.column_names])
    return data.to_list()


def read_index(
    index_file: str | os.PathLike,
    columns: Sequence[str],
    to_record: Callable[[dict], object],
    images_of: Callable[[object], Iterable[str]],
    what: str,
    check_images: bool = True,
) -> list:
    """The records of an official BEiT-3 index file (JSON lines of ``columns``, texts as piece ids of ``beit3.spm``
    in ``text_segment``), ``to_record(row)`` each: a line whose text_segment is empty is refused, naming the line
    and ``what`` it holds (``"question"``); ``images_of(record)``, the image paths, are checked up front."""
    records = []
    for number, row in enumerate(read_jsonl(index_file, columns=columns), 1):
        if not row["text_segment"]:
            raise ValueError(f"{index_file}:{number} has an empty text_segment; every {what} needs a word (row {row}).")
        records.append(to_record(row))
    if check_images:
        check_images_exist((p for r in records for p in images_of(r)), f"images of {Path(index_file).name}")
    return records


def pair_lines(files: Sequence[str | os.PathLike]) -> Iterable[tuple[Path, str]]:
    """(image path, caption) of every usable line of the pair lists, jsonl ``{"image": path, "text": caption}``, the path
    made relative to its file's folder: what pretraining's pair kind and the image-text contrastive stage read. A bad
    line (not UTF-8, not JSON, no image path, an empty text) is skipped with a warning naming the file and line."""
    for file in files:
        base = Path(file).parent
        with open(file, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                    path, text = record["image"], record["text"]
                    if not isinstance(path, str) or not path:
                        raise ValueError(f"the image is {path!r}, not a path")
                    if not isinstance(text, str) or not text.strip():
                        raise ValueError(
                            f"the text is {text!r}: the pair kind, like the text kind, keeps only non-empty texts"
                        )
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                    logger.warning(f'{file}:{number} is not a {{"image", "text"}} line ({error}); skipped')
                    continue
                yield base / path, text


def read_json(path: str | os.PathLike):
    """One JSON document, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No JSON file at {path}.")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error


def check_images_exist(paths: Iterable[str | os.PathLike], what: str = "images") -> None:
    """Raises FileNotFoundError naming the first missing files and how many are missing in all."""
    missing = sorted({str(p) for p in paths if not os.path.isfile(p)})
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (", ..." if len(missing) > _SHOWN_MISSING else "")
        raise FileNotFoundError(
            f"{len(missing)} {what} not found: {shown}. Check the image folder argument, or pass "
            "check_images=False to read the index without the images."
        )


def require_text(text, where: str) -> str:
    """``text`` if it holds a word; else a ValueError saying which record is empty."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"{where} has an empty text ({text!r}); every question or caption needs at least one word. "
            "Fix or drop that record."
        )
    return text


def load_rgb(path: str | os.PathLike | dict | None, data: bytes | None = None) -> Image.Image:
    """Reads an image fully into memory as RGB, from ``path`` or, when given, from its encoded ``data``
    (``path`` then only names it); an unreadable image raises an error naming its path. ``path`` may also be
    what a ``datasets`` ``Image(decode=False)`` column holds, ``{"bytes": ..., "path": ...}``."""
    if isinstance(path, dict):
        path, data = path.get("path") or "an image of the dataset", path.get("bytes")
    return eight_bit(open_image(path, data)).convert("RGB")


def undecoded_columns(dataset, columns: Sequence[str], what: str, purpose: str = "", hint: str = ""):
    """``dataset`` with only ``columns``, each checked to exist (the error names the columns there), an ``Image()``
    column left undecoded (``{"bytes", "path"}``, which ``load_rgb`` takes)."""
    from datasets import Image as ImageFeature

    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{what} has no column {', '.join(map(repr, missing))}{purpose}; its columns are {dataset.column_names}. {hint}".rstrip()
        )
    for column in set(columns):
        if isinstance(dataset.features[column], ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset.select_columns(sorted(set(columns)))


class DatasetRecords(Sequence):
    """A user's ``datasets.Dataset`` seen as a reader's records, one row at a time (nothing copied or decoded ahead).

    ``columns`` maps each record field to its column, e.g. ``DatasetRecords(data, ImageRecord, image_path="image",
    label="label")``: an ``Image()`` column is read undecoded (``{"bytes", "path"}``, which ``load_rgb`` takes). A
    record field ``image_id`` that no column gives is the row number.
    """

    def __init__(self, dataset, record_class, **columns: str):
        self.dataset = undecoded_columns(
            dataset, list(columns.values()), "The dataset", hint=f"Name the columns that hold {', '.join(columns)}."
        )
        self.record_class, self.columns = record_class, columns
        self.row_as_id = "image_id" in getattr(record_class, "__dataclass_fields__", {}) and "image_id" not in columns
        self.rows: Sequence[int] | None = None  # the rows kept, when a reader leaves some out (None: all)

    def __len__(self) -> int:
        return len(self.dataset) if self.rows is None else len(self.rows)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        row_number = index if self.rows is None else self.rows[index]
        return self.record(self.dataset[row_number], row_number)

    def record(self, row: dict, row_number: int):
        """The record of one row (the columns already picked out); readers with more to do per row override this."""
        return self.record_class(
            **{field: row[column] for field, column in self.columns.items()},
            **({"image_id": row_number} if self.row_as_id else {}),
        )

    def values(self, field: str) -> list:
        """Every record's ``field``, read from its column alone (the images stay unread)."""
        column = self.dataset[self.columns[field]]
        return list(column) if self.rows is None else [column[i] for i in self.rows]


def as_records(records, record_class, **columns: str) -> Sequence:
    """``records`` as they are (a list), or, for a ``datasets.Dataset``, a ``DatasetRecords`` view of it with ``columns``."""
    from datasets import Dataset

    return DatasetRecords(records, record_class, **columns) if isinstance(records, Dataset) else list(records)


def transform_image(transform, image: Image.Image) -> torch.Tensor:
    """(C, H, W) float from a PIL image: ``transform`` is a Hugging Face image processor (e.g.
    ``Beit3ImageProcessor``) or any callable returning a tensor (e.g. a torchvision transform)."""
    if isinstance(transform, BaseImageProcessor):
        return transform(image, return_tensors="pt")["pixel_values"][0]
    out = transform(image)
    if isinstance(out, Mapping):
        out = out["pixel_values"]
        out = out[0] if out.dim() == 4 else out
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise TypeError(
            f"The image transform must give a (C, H, W) tensor; it gave {type(out).__name__} "
            f"{tuple(getattr(out, 'shape', ()))}."
        )
    return out


def encode_text(
    tokenizer, text: str | None = None, ids: Sequence[int] | None = None, max_length: int = 64
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (max_length,): ``<s> text </s>`` right-padded, as unilm feeds the models.

    ``ids``: the text already as piece ids without specials (the official index files' ``text_segment``);
    they are wrapped, truncated and padded exactly like a tokenized text.
    """
    if ids is None:
        encoded = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"][0], "attention_mask": encoded["attention_mask"][0]}
    if max_length < 3:
        raise ValueError(f"max_length {max_length} leaves no room for a token between <s> and </s>.")
    tokens = [tokenizer.bos_token_id, *list(ids)[: max_length - 2], tokenizer.eos_token_id]
    input_ids = torch.full((max_length,), tokenizer.pad_token_id, dtype=torch.long)
    input_ids[: len(tokens)] = torch.tensor(tokens)
    attention_mask = torch.zeros(max_length, dtype=torch.long)
    attention_mask[: len(tokens)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_trimmed(items: list[dict]) -> dict:
    """``default_collate``, then the text tensors cut to the batch's longest text.

    Texts come right-padded to ``max_length``; the padding past the longest one is attended by nobody and
    predicts nothing, so cutting it changes no output and saves its compute (a VQA question is a third of
    the 64 positions). Text tensors are the (B, T) tensors shaped like ``attention_mask``.
    """
    batch = torch.utils.data.default_collate(items)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.numel() == 0:
        return batch
    length = max(1, int(mask.sum(1).max()))
    if bool(mask[:, length:].any()):  # not right-padded: leave it as it is
        return batch
    shape = mask.shape
    return {
        key: value[:, :length] if isinstance(value, torch.Tensor) and value.shape == shape else value
        for key, value in batch.items()
    }


MAX_REPLACEMENTS = 16  # unreadable samples in a row that one slot may skip before the data counts as broken
SKIPPED = "skipped_images"  # the count an item of ReplaceUnreadable carries, and the counter it becomes


class ReplaceUnreadable(torch.utils.data.Dataset):
    """Training items of ``dataset`` where an item whose image does not decode is replaced by the next item that
    does, as pretraining replaces its unreadable images: the image is named on stderr and each item carries how
    many it replaced (``skipped_images``), which ``counted`` turns into the batch's ``counts`` for the engine.
    Sixteen unreadable items in a row are an error (the data is broken, not a file)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        for shift in range(MAX_REPLACEMENTS):
            try:
                item = self.dataset[(index + shift) % len(self.dataset)]
            except UnreadableImageError as error:
                logger.warning(f"{error} (skipped: the next example takes its place)")
                continue
            return {**item, SKIPPED: shift}
        raise RuntimeError(
            f"{MAX_REPLACEMENTS} examples in a row from {index} have an unreadable image; check the data."
        )


def counted(collate):
    """``collate`` for items of ``ReplaceUnreadable``: their ``skipped_images`` summed into the batch's ``counts``."""

    def collate_counted(items: list[dict]) -> dict:
        skipped = sum(item.pop(SKIPPED, 0) for item in items)
        batch = collate(items)
        batch["counts"] = {SKIPPED: skipped}
        return batch

    return collate_counted


def split_batch(batch: Mapping) -> tuple[dict, dict]:
    """(model inputs, metadata): the ids in ``METADATA_KEYS`` go to the second dict, so ``head(**inputs)`` works."""
    inputs = {k: v for k, v in batch.items() if k not in METADATA_KEYS}
    return inputs, {k: v for k, v in batch.items() if k in METADATA_KEYS}


class ImagesOfOthers(torch.utils.data.Dataset):
    """A blind control: the items of ``dataset``, each with the ``pixel_values`` of another item (a seeded
    derangement), everything else its own. A model that reads the image scores near chance on it; one that
    answers from the text alone scores as before.
    """

    def __init__(self, dataset, seed: int = 0):
        if len(dataset) < 2:
            raise ValueError("A blind control needs at least 2 examples to swap images between.")
        self.dataset = dataset
        order = np.random.default_rng(seed).permutation(len(dataset))
        self.source = np.empty(len(dataset), dtype=np.int64)
        self.source[order] = np.roll(order, -1)  # each item takes the next one's image in a random cycle: never its own

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        if "pixel_values" in item:
            item["pixel_values"] = self.dataset[int(self.source[index])]["pixel_values"]
        return item
