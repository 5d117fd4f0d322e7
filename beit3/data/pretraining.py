"""Pretraining data: images, texts and image-text pairs, mixed so that every step sees all three kinds.

Sources are local: an image folder, text files (``.txt``, one text per line, or ``.jsonl`` with a
``text`` field) and pair files (``.jsonl`` lines ``{"image": path, "text": caption}``, paths relative
to the file, or webdataset ``.tar`` shards holding ``<key>.jpg``/``.png`` + ``<key>.txt``). They are
read with Hugging Face ``datasets``, whose Arrow files are memory-mapped: a corpus larger than RAM
still gives random access, which the step-indexed order below relies on.

Every batch is a pure function of (seed, step, rank): the order of each kind comes from a seeded
permutation per epoch, and each sample's crop, flip, color jitter and mask are seeded from its
global position. A resumed run therefore sees exactly the batches the interrupted run would have
seen, with no data-loader state to save. A corrupt image is replaced by the next sample of the
same permutation and counted.

With ``image_codes`` (the folder ``tokenizers/encode_images.py`` wrote for the image folder), each
image carries its precomputed visual tokens as ``image_labels`` and the model sees the same fixed
center crop they were computed from (``beit3.views.CenterView``) instead of a random crop.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, Value, load_dataset

from ..log import get_logger
from ..masking import PAIR_TEXT_MASK_PROB, TEXT_MASK_PROB, BlockMaskGenerator, mask_text_tokens, text_masker
from ..views import CenterView, TwoViewTransform
from .common import MAX_REPLACEMENTS, load_rgb, pair_lines, undecoded_columns
from .images import list_images, read_codes, read_codes_info
from .sampling import mixed_seed
from .streaming import (
    IMAGE_EXTENSIONS,
    ShardStream,
    check_stream_count,
    expand_shards,
    is_shard_pattern,
    is_url,
    pair_of,
    shard_samples,
    text_pieces,
    text_samples,
)

logger = get_logger(__name__)

KINDS = ("image", "text", "pair")
MAX_TEXT_LENGTH = 64  # tokens per text, <s> and </s> included
# The pairs' crop and flip by default: mild, since a caption may name what a tight crop cuts out.
PAIR_CROP_SCALE = (0.5, 1.0)
PAIR_HFLIP = 0.5
# Hard negatives for image-text matching are drawn with weights exp(token overlap / this): at 0.1 a caption sharing
# 0.1 more of its tokens is e times as likely.
HARD_NEGATIVE_TEMPERATURE = 0.1


def _has_text(row: dict) -> bool:
    """The one rule for the text of texts and pairs: a string with something besides whitespace."""
    return isinstance(row["text"], str) and bool(row["text"].strip())


class Shards(list):
    """A kind read as a stream from these webdataset shards (``beit3.data.streaming``), not copied to Arrow."""


class TextFiles(Shards):
    """The text kind read as a stream from these ``.txt`` / ``.jsonl`` files, in pieces (``streaming.text_pieces``)."""


def load_sources(
    images: str | list[str] | dict | None = None,
    texts: list[str] | dict | None = None,
    pairs: list[str] | dict | None = None,
    image_codes: str | None = None,
    streaming: bool = False,
) -> dict[str, Dataset | Shards]:
    """The three kinds as ``datasets.Dataset`` objects: image ``{"path"}``, text ``{"text"}``, pair ``{"path", "text"}``.

    Any kind may instead be a ``datasets`` dataset of the user's, saved with ``save_to_disk``:
    ``{"dataset": folder, "image": column, "text": column, "split": name}`` (see ``saved_dataset_source``).

    With ``image_codes`` (a folder written by ``tokenizers/encode_images.py`` for ``images``), image rows
    also hold ``codes``, that image's row of visual tokens (see ``image_codes_source``).
    With ``streaming``, pairs given as webdataset shards (paths, brace patterns, URLs) and images given as
    shards (their images; the texts are ignored) become ``Shards``, and the text files ``TextFiles``, read shard
    by shard (piece by piece) by ``StreamingPretrainingBatches``; without it, they are copied into the ``datasets`` cache.
    A kind without a source is left out; a source that yields nothing is an error.
    """
    sources = {}
    saved = {
        kind: spec for kind, spec in (("image", images), ("text", texts), ("pair", pairs)) if isinstance(spec, dict)
    }
    for kind, spec in saved.items():
        if image_codes and kind == "image":
            raise ValueError(
                "image_codes are the codes of an image folder; with images from a saved dataset, let the visual "
                "tokenizer compute the targets (set image_codes to null)."
            )
        sources[kind] = saved_dataset_source(spec, kind)
    images, texts, pairs = (None if isinstance(x, dict) else x for x in (images, texts, pairs))
    if image_codes and not images and "image" not in saved:
        raise ValueError(
            f"image_codes ({image_codes}) are the codes of an image folder, but no images source is given; "
            "set images to the folder they were encoded from."
        )
    image_shards = images is not None and (isinstance(images, (list, tuple)) or is_shard_pattern(images))
    if image_shards:
        if not streaming:
            raise ValueError(
                f"images {images} are shards: reading images from shards needs data.streaming: true "
                "(or give an image folder)."
            )
        if image_codes:
            raise ValueError(
                "image_codes are the codes of an image folder; with images from shards, let the visual "
                "tokenizer compute the targets (set image_codes to null)."
            )
        sources["image"] = Shards(expand_shards(images))
    elif images:
        paths = list_images(images)
        sources["image"] = (
            image_codes_source(images, paths, image_codes)
            if image_codes and paths
            else Dataset.from_dict({"path": [str(p) for p in paths]})
        )
    if texts and streaming:
        missing = [str(f) for f in texts if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"text file(s) not found: {', '.join(missing[:3])}; check data.sources.texts.")
        sources["text"] = TextFiles(str(f) for f in texts)
    elif texts:
        sources["text"] = _text_files([str(f) for f in texts]).filter(_has_text)
    if pairs:
        shards = [str(f) for f in pairs if is_shard_pattern(f)]
        files = [str(f) for f in pairs if not is_shard_pattern(f)]
        if streaming and files:
            raise ValueError(
                f"With data.streaming: true the pairs must be webdataset shards, but {files[:2]} are not; "
                "convert them with tasks/make_shards.py, or turn streaming off."
            )
        if streaming:
            sources["pair"] = Shards(expand_shards(shards))
        elif any("{" in f or is_url(f) for f in shards):
            raise ValueError(
                f"The pair shards {shards[:2]} are a pattern or URL, which only streaming reads: set data.streaming: true."
            )
        else:
            from datasets import concatenate_datasets

            parts = ([_jsonl_pairs(files)] if files else []) + ([_webdataset_pairs(shards)] if shards else [])
            sources["pair"] = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    for kind, dataset in sources.items():
        if isinstance(dataset, Shards):
            missing = [url for url in dataset if not is_url(url) and not os.path.isfile(url)]
            if len(missing) == len(dataset):
                raise ValueError(
                    f"None of the {len(dataset)} {kind} shards exists (e.g. {missing[0]}); check the path or pattern."
                )
            if missing:
                logger.warning(
                    f"{len(missing)} of the {len(dataset)} {kind} shards do not exist (e.g. {missing[0]}); they are "
                    "skipped and counted as unreadable shards when their turn comes."
                )
        if len(dataset) == 0:
            raise ValueError(
                f"The {kind} source is empty: check the paths in the config (images: {images}, texts: {texts}, pairs: {pairs})."
            )
    if not sources:
        raise ValueError("No pretraining data: give at least one of images, texts, pairs.")
    return sources


def image_codes_source(images: str, paths: list[Path], image_codes: str) -> Dataset:
    """Image rows ``{"path", "codes"}``: each image below ``images`` with its row of ``image_codes`` (matched by
    the path relative to ``images``, as ``index.jsonl`` has it).

    An image with no row there that can be read is an error (the codes are stale or of another folder).
    One that cannot be read is kept, with codes of -1: ``tokenizers/encode_images.py`` skips unreadable
    files, and the batches replace it by the next image when it comes up, as without codes.
    """
    info = read_codes_info(image_codes)
    codes, index = read_codes(image_codes)
    if info["codebook_size"] is not None and len(codes) and int(codes.max()) >= info["codebook_size"]:
        raise ValueError(
            f"{image_codes} holds code {int(codes.max())} but says its codebook has {info['codebook_size']} codes; "
            "encode the images again with tokenizers/encode_images.py."
        )
    row_of = {entry["path"]: int(entry["row"]) for entry in index}
    folder = Path(images)
    rows = [row_of.get(p.relative_to(folder).as_posix(), -1) for p in paths]
    missing = [i for i, row in enumerate(rows) if row < 0]
    for i in missing:
        try:
            load_rgb(paths[i])
        except (OSError, ValueError):
            continue  # unreadable: encode_images.py skipped it, and so will the batches
        raise ValueError(
            f"{len(missing)} of the {len(paths)} images below {images} have no codes in {image_codes}/index.jsonl, "
            f"e.g. {paths[i].relative_to(folder).as_posix()}; the codes are of another folder or older than these "
            f"images. Run tokenizers/encode_images.py --images {images} --output {image_codes} again "
            "(with the same tokenizer)."
        )
    if missing:
        logger.warning(
            f"{len(missing)} unreadable images below {images} have no codes (encode_images.py skipped them); "
            "each is replaced by the next image when it comes up."
        )
    dtype = np.int16 if info["codebook_size"] is not None and info["codebook_size"] <= 2**15 else np.int32
    table = np.full((len(paths), codes.shape[1]), -1, dtype=dtype)
    found = np.array([i for i, row in enumerate(rows) if row >= 0], dtype=np.int64)
    table[found] = codes[[rows[i] for i in found]].numpy().astype(dtype)
    # Arrow, one fixed-size list per image: 2 bytes a code, and no Python list per image on the way in.
    column = pa.FixedSizeListArray.from_arrays(pa.array(table.ravel()), codes.shape[1])
    return Dataset(pa.table({"path": pa.array([str(p) for p in paths]), "codes": column}))


_PAIR_FEATURES = Features({"path": Value("string"), "text": Value("string"), "image_bytes": Value("binary")})


def _cached_rows(rows, features: Features, files: list[str]) -> Dataset:
    """``rows(files, stamps)``'s dicts in an Arrow file of the ``datasets`` cache, written once and memory-mapped:
    a corpus larger than RAM is read from disk. The cache is keyed on the arguments, and the files' size and mtime
    make an edited file a new key instead of a stale hit."""
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found; check data.sources.")
    stamps = [(stat.st_size, stat.st_mtime_ns) for stat in map(os.stat, files)]
    try:
        return Dataset.from_generator(rows, features=features, gen_kwargs={"files": files, "stamps": stamps})
    except ValueError as error:
        if "no data" not in str(error):
            raise
        return Dataset.from_dict(
            {name: [] for name in features}, features=features
        )  # no good line: load_sources says so


def _jsonl_pairs(files: list[str]) -> Dataset:
    """Pairs from jsonl lines ``{"image": path, "text": caption}``, paths relative to their file (``pair_lines``);
    a bad line is skipped with a warning when the cache is written."""

    def rows(files: list[str], stamps: list[tuple[int, int]]):
        for path, text in pair_lines(files):
            yield {"path": str(path), "text": text, "image_bytes": None}

    return _cached_rows(rows, _PAIR_FEATURES, [str(Path(f).resolve()) for f in files])


_NAMED_BAD_LINES = 5  # per file; the rest are counted


def _text_files(files: list[str]) -> Dataset:
    """Texts from ``.txt`` lines and ``.jsonl`` lines' ``text`` field, read as the streamed texts are
    (``text_samples``): a line that is not UTF-8, or a jsonl line without a string ``text``, is skipped with a
    warning naming its file and byte (the first few of a file; then how many in all)."""

    def rows(files: list[str], stamps: list[tuple[int, int]]):
        for file, (size, _) in zip(files, stamps):
            bad = 0
            for sample in text_samples((file, 0, size), on_error=_reraise):
                if sample["text"] is not None:
                    yield {"text": sample["text"]}
                    continue
                bad += 1
                if bad <= _NAMED_BAD_LINES:
                    logger.warning(
                        f"{file} at {sample['__key__']} is not a text line (not UTF-8, or a jsonl line without a "
                        "string text); skipped"
                    )
            if bad > _NAMED_BAD_LINES:
                logger.warning(f"{file}: {bad} lines skipped in all")

    return _cached_rows(rows, Features({"text": Value("string")}), [str(Path(f).resolve()) for f in files])


def _reraise(path: str, error: Exception):
    raise error  # a text file that cannot be opened while the cache is written: an error, not a skip


def saved_dataset_source(spec: dict, kind: str) -> Dataset:
    """The rows of one kind from a user's ``datasets`` dataset written by ``save_to_disk`` (memory-mapped, not copied).

    ``spec``: ``{"dataset": folder, "image": column (default "image"), "text": column (default "text"), "split": name}``;
    the split is needed only for a saved ``DatasetDict`` (default "train"). The image column is an ``Image()`` feature
    (as ``load_dataset("imagefolder")`` gives; its bytes or path are read, decoded here) or a column of file paths.
    Rows come out as image ``{"path", "image_bytes"}``, text ``{"text"}``, pair ``{"path", "image_bytes", "text"}``.
    """
    from datasets import DatasetDict, load_from_disk
    from datasets import Image as ImageFeature

    unknown = set(spec) - {"dataset", "image", "text", "split"}
    if "dataset" not in spec or unknown:
        raise ValueError(
            f"A saved-dataset {kind} source is {{dataset: <save_to_disk folder>, image: <column>, text: <column>, "
            f"split: <name>}}; got {spec}."
        )
    folder = str(spec["dataset"])
    try:
        data = load_from_disk(folder)
    except FileNotFoundError as error:
        raise ValueError(f"No dataset saved with save_to_disk at {folder} ({error}).") from error
    if isinstance(data, DatasetDict):
        split = spec.get("split", "train")
        if split not in data:
            raise ValueError(f"{folder} holds the splits {sorted(data)}, not {split!r}; set split: to one of them.")
        data = data[split]
    roles = {"image": ["image"], "text": ["text"], "pair": ["image", "text"]}[kind]
    columns = {role: spec.get(role, role) for role in roles}
    data = undecoded_columns(
        data,
        list(columns.values()),
        folder,
        purpose=f" for the {kind} source",
        hint="Name yours with image: and text:.",
    )
    out = {}
    if "image" in columns:
        column, feature = columns["image"], data.features[columns["image"]]
        if isinstance(feature, ImageFeature):
            data = data.flatten()  # a view of the undecoded image's bytes and path columns
            out.update({f"{column}.path": "path", f"{column}.bytes": "image_bytes"})
        elif getattr(feature, "dtype", None) == "string":
            out[column] = "path"
        else:
            raise ValueError(
                f"The image column {column!r} of {folder} is {feature}; it must be an Image() feature or file paths."
            )
    if "text" in columns:
        out[columns["text"]] = "text"
    data = data.select_columns(list(out)).rename_columns(out)
    # In memory: a filter of a memory-mapped dataset would otherwise write its index into the user's folder.
    return data.filter(_has_text, keep_in_memory=True) if "text" in columns else data


def _webdataset_pairs(shards: list[str]) -> Dataset:
    """Image-text pairs from webdataset tar shards: one image (``IMAGE_EXTENSIONS``) and one ``txt`` per key.

    ``datasets`` writes the shards to Arrow files in its cache; the rows here are a memory-mapped view of them.
    """
    from datasets import Image as ImageFeature

    raw = load_dataset("webdataset", data_files=shards, split="train")
    image_column = next((c for c in IMAGE_EXTENSIONS if c in raw.column_names), None)
    if image_column is None or "txt" not in raw.column_names:
        raise ValueError(
            f"The webdataset shards {shards[:2]} need an image ({'/'.join(IMAGE_EXTENSIONS)}) and a txt file per sample; "
            f"they have {raw.column_names}."
        )
    raw = raw.cast_column(
        image_column, ImageFeature(decode=False)
    )  # keep the bytes; decode (and skip if corrupt) ourselves
    where = shards[0] if len(shards) == 1 else "the shards"
    return raw.map(
        lambda batch: {
            "path": [f"{key} in {where}" for key in batch["__key__"]],
            "text": batch["txt"],
            "image_bytes": [item["bytes"] for item in batch[image_column]],
        },
        batched=True,
        remove_columns=raw.column_names,
        features=_PAIR_FEATURES,
    ).filter(_has_text)


class PretrainingBatches(torch.utils.data.Dataset):
    """Item ``i`` is this rank's batch for step ``start_step + i``: a dict per kind, plus skip counts.

    Args:
        sources: from ``load_sources``.
        batch_sizes: samples per kind per rank and step, e.g. ``{"image": 32, "text": 32, "pair": 32}``.
        tokenizer: the text tokenizer (with a mask token); None for image-only batches.
        image_size, patch_size: the model's image; the tokenizer view has ``tokenizer_image_size``.
        text_mask_prob, pair_mask_prob: MLM rates for texts and for the text of pairs (paper: 0.15, 0.5).
        num_masked_patches: patches per image to mask (default: BEiT's 75/196 of the grid).
        color_jitter: strength of the image kind's color jitter, 0 to turn off.
        pair_crop_scale, pair_hflip: the pairs' random resized crop (area range) and flip probability. A flip
            contradicts a caption that says "on the left", and a tight crop can cut out what it names: turn
            them down when the captions describe positions and every object.
        itm_negatives: image-text matching (for a model with ``config.itm_weight > 0``): this fraction of each
            pair batch also goes, with its text unmasked, into an ``itm`` batch, once with its own image and once
            with a hard negative: the image of another caption of the same batch, drawn with weights that grow with
            the tokens it shares with its own (exp(Jaccard over token ids / 0.1)), never the same text nor one that
            has all of its tokens (it may describe the same thing). 0: no ``itm`` batch (the paper).
        itm_text_swaps: this share of the matching negatives keep their own image and change their text instead, one
            token swapped for the token another caption of the batch has at that position (one this caption does not
            hold): "a big red circle" -> "a big blue circle". Such a negative differs from its image in one attribute,
            so it can only be told from its match by checking each word against the image. A text with no such token
            keeps the image negative. 0: image negatives only.
    Batch:
        image: pixel_values (B, 3, S, S), tokenizer_pixel_values (B, 3, s, s) in [0, 1], bool_masked_pos (B, patches);
            when the image source has ``codes`` (``load_sources(image_codes=...)``): pixel_values of the fixed
            center crop the codes were computed from, bool_masked_pos and image_labels (B, patches), no tokenizer view
        text: input_ids, attention_mask, labels (B, T)
        pair: pixel_values, input_ids, attention_mask, labels
        itm (with itm_negatives): pixel_values (2K, ...), input_ids, attention_mask (2K, T) unmasked, itm_labels (2K,):
            K matched pairs (1), then the same K texts with their hard-negative images (0), the first
            round(itm_text_swaps * K) of those instead with their own image and a text one token off (0)
        counts: ``{"skipped_<kind>": n}``, corrupt images (and streamed samples without image or caption) replaced in
            this batch, for the ``Engine``'s counters
    """

    def __init__(
        self,
        sources: dict[str, Dataset],
        batch_sizes: dict[str, int],
        tokenizer,
        image_size: int,
        patch_size: int,
        max_text_length: int = MAX_TEXT_LENGTH,
        tokenizer_image_size: int | None = None,
        text_mask_prob: float = TEXT_MASK_PROB,
        pair_mask_prob: float = PAIR_TEXT_MASK_PROB,
        num_masked_patches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_steps: int = 10**9,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        color_jitter: float = 0.4,
        pair_crop_scale: tuple[float, float] = PAIR_CROP_SCALE,
        pair_hflip: float = PAIR_HFLIP,
        itm_negatives: float = 0.0,
        itm_text_swaps: float = 0.0,
    ):
        if not 0.0 <= itm_negatives <= 1.0:
            raise ValueError(
                f"itm_negatives {itm_negatives} must be a fraction of the pair batch in [0, 1] (0: no image-text matching)."
            )
        self.sources = sources
        self.streams = None  # {kind: ShardStream} of a StreamingPretrainingBatches worker
        self._prefetched: dict[str, tuple[int, list[dict]]] = {}  # kind -> (step, its slots' records)
        if any(isinstance(source, Shards) for source in sources.values()) and not isinstance(
            self, StreamingPretrainingBatches
        ):
            raise TypeError(
                "Some kinds are streamed from shards (load_sources(streaming=True)): use StreamingPretrainingBatches."
            )
        self.batch_sizes = {
            kind: batch_sizes.get(kind, 0) for kind in KINDS if kind in sources and batch_sizes.get(kind, 0) > 0
        }
        if not self.batch_sizes:
            raise ValueError(
                f"No kind has both a source and a batch size: sources {sorted(sources)}, batch sizes {batch_sizes}."
            )
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.grid = image_size // patch_size
        self.num_masked_patches = num_masked_patches
        # Precomputed codes fix the crop: the model sees what encode_images.py gave the tokenizer (see CenterView).
        self.codes = (
            "image" in self.batch_sizes
            and not isinstance(sources["image"], Shards)
            and "codes" in sources["image"].column_names
        )
        if self.codes and sources["image"].features["codes"].length != self.grid**2:
            raise ValueError(
                f"The image codes have {sources['image'].features['codes'].length} codes per image but the model's "
                f"{image_size} px images have {self.grid}x{self.grid} patches of {patch_size} px."
            )
        self.views = (
            CenterView(image_size, color_jitter=color_jitter)
            if self.codes
            else TwoViewTransform(
                model_size=image_size,
                tokenizer_size=tokenizer_image_size or image_size,
                scale=crop_scale,
                color_jitter=color_jitter,
            )
        )
        self.pair_view = TwoViewTransform(
            model_size=image_size,
            tokenizer_size=tokenizer_image_size or image_size,
            scale=tuple(pair_crop_scale),
            color_jitter=0.0,
            hflip=pair_hflip,
        )
        self.maskers = {
            kind: text_masker(tokenizer, prob, seed=seed)
            for kind, prob in (("text", text_mask_prob), ("pair", pair_mask_prob))
            if kind in self.batch_sizes
        }
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_step, self.num_steps = start_step, num_steps
        if itm_negatives and self.batch_sizes.get("pair", 0) < 2:
            raise ValueError(
                "itm_negatives needs pair batches of 2 or more: a hard negative is another pair of the same batch."
            )
        self.itm_pairs = max(1, round(itm_negatives * self.batch_sizes["pair"])) if itm_negatives else 0
        if not 0.0 <= itm_text_swaps <= 1.0:
            raise ValueError(f"itm_text_swaps {itm_text_swaps} must be a share of the matching negatives in [0, 1].")
        self.itm_text_swaps = round(itm_text_swaps * self.itm_pairs)

    def __len__(self) -> int:
        return self.num_steps

    @lru_cache(maxsize=8)
    def _permutation(self, kind: str, epoch: int) -> np.ndarray:
        order = np.random.default_rng(mixed_seed(self.seed, KINDS.index(kind), epoch)).permutation(
            len(self.sources[kind])
        )
        return (
            order.astype(np.int32) if len(order) < 2**31 else order
        )  # 4 bytes a sample: the order of a big corpus stays small

    def _global_position(self, kind: str, step: int, slot: int, shift: int = 0) -> int:
        """The slot's place in the kind's global order; ``shift`` walks on to replace corrupt images."""
        batch = self.batch_sizes[kind]
        return (step * self.world_size + self.rank) * batch + slot + shift * batch * self.world_size

    def _position(self, kind: str, step: int, slot: int, shift: int = 0) -> tuple[int, int]:
        """(dataset row, global position) of a sample slot."""
        position = self._global_position(kind, step, slot, shift)
        epoch, offset = divmod(position, len(self.sources[kind]))
        return int(self._permutation(kind, epoch)[offset]), position

    def _record(self, kind: str, step: int, slot: int, shift: int) -> tuple[dict | None, int]:
        """(record, global position) of a sample slot; the record is None for a streamed sample without its image or text."""
        if not self.streams or kind not in self.streams:
            row, position = self._position(kind, step, slot, shift)
            if shift == 0 and self._prefetched.get(kind, (None,))[0] == step:
                return self._prefetched[kind][1][slot], position
            return self.sources[kind][row], position
        position = self._global_position(kind, step, slot, shift)
        sample = next(self.streams[kind])
        image, text = pair_of(sample)
        if image is None or (kind == "pair" and (text is None or not _has_text({"text": text}))):
            logger.warning(
                f"{sample['__key__']} in {sample['__url__']} has no {'image' if image is None else 'caption'} "
                "(skipped: the next sample of the stream takes its place)"
            )
            return None, position
        return {"path": f"{sample['__key__']} in {sample['__url__']}", "image_bytes": image, "text": text}, position

    def _prefetch(self, kind: str, step: int) -> None:
        """Reads the rows of a step's slots in one call: a row at a time, Arrow costs more than the crop."""
        if self.streams and kind in self.streams:
            return
        columns = self.sources[kind][[self._position(kind, step, slot)[0] for slot in range(self.batch_sizes[kind])]]
        self._prefetched[kind] = (step, [dict(zip(columns, values)) for values in zip(*columns.values())])

    def _image_sample(self, kind: str, step: int, slot: int, view):
        """Loads one image, replacing an unreadable one by the next sample of the same stream.

        Returns (view(image), record, replaced, position); the record (path, text, codes) is the image's that was used.
        """
        for shift in range(MAX_REPLACEMENTS):
            record, position = self._record(kind, step, slot, shift)
            if record is None:
                continue
            try:
                image = load_rgb(record["path"], record.get("image_bytes"))
            except (OSError, ValueError) as error:
                logger.warning(f"{error} (skipped: the next image of the stream takes its place)")
                continue
            if "codes" in record and record["codes"][0] < 0:
                raise RuntimeError(
                    f"{record['path']} has no precomputed codes (it could not be read when training started) but "
                    "reads now; run tokenizers/encode_images.py on the image folder again."
                )
            return (
                view(image, rng=random.Random(mixed_seed(self.seed, KINDS.index(kind), position))),
                record,
                shift,
                position,
            )
        raise RuntimeError(
            f"{MAX_REPLACEMENTS} images in a row could not be read from the {kind} source; check the data."
        )

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt")
        )  # to the longest

    def _masked_text(self, kind: str, encoded: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        masker = self.maskers[kind]
        masker.generator.manual_seed(mixed_seed(self.seed, KINDS.index(kind), step, self.rank))
        input_ids, labels = mask_text_tokens(masker, encoded["input_ids"], encoded["attention_mask"])
        return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"], "labels": labels}

    def _matching_batch(
        self, images: torch.Tensor, texts: list[str], encoded: dict[str, torch.Tensor], step: int
    ) -> dict:
        """The ``itm`` batch of step ``step`` from its pair batch (see the class docstring)."""
        ids = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -1)
        sets = torch.zeros(len(texts), int(ids.max()) + 1, dtype=torch.bool)  # row i: the token ids text i holds
        for row, tokens in enumerate(ids):
            sets[row, tokens[tokens >= 0]] = True
        overlap = (sets[:, None] & sets[None]).sum(-1).float() / (sets[:, None] | sets[None]).sum(-1).clamp(
            min=1
        ).float()
        # Never the same text (the diagonal too), nor a caption with every token of this one: it may well describe
        # the same thing ("a red circle" and "a big red circle on the left").
        not_negative = torch.tensor([[a == b for b in texts] for a in texts]) | ~(sets[:, None] & ~sets[None]).any(-1)
        k = self.itm_pairs
        # Sampled, as ALBEF and VLMo sample theirs by similarity: mostly the nearest captions, now and then a far one.
        # Always the nearest was too hard to start from (matching stayed at chance for 760 demo steps).
        weights = torch.exp((overlap[:k] - 1.0) / HARD_NEGATIVE_TEMPERATURE).masked_fill(not_negative[:k], 0.0)
        usable = weights.sum(-1) > 0  # a batch of one repeated caption has no negative
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, len(KINDS), step, self.rank))
        negatives = torch.multinomial(weights.masked_fill(~usable[:, None], 1.0), 1, generator=generator).squeeze(1)
        negatives = torch.where(usable, negatives, torch.arange(k))
        negative_ids = encoded["input_ids"][:k].clone()
        if self.itm_text_swaps:  # the positions a swap may touch: no special token, no padding
            ordinary = encoded["attention_mask"].bool() & ~torch.isin(
                encoded["input_ids"], torch.tensor(self.tokenizer.all_special_ids)
            )
        for row in range(self.itm_text_swaps):
            swapped = self._swap_one_token(encoded["input_ids"], ordinary, sets, row, generator)
            if swapped is not None:  # this row's negative: its own image, its text one token off
                negative_ids[row], negatives[row], usable[row] = swapped, row, True
        labels = torch.cat([torch.ones(k, dtype=torch.long), (~usable).long()])
        return {
            "pixel_values": torch.cat([images[:k], images[negatives]]),
            "input_ids": torch.cat([encoded["input_ids"][:k], negative_ids]),
            "attention_mask": encoded["attention_mask"][:k].repeat(2, 1),
            "itm_labels": labels,
        }

    @staticmethod
    def _swap_one_token(
        ids: torch.Tensor, ordinary: torch.Tensor, sets: torch.Tensor, row: int, generator: torch.Generator
    ) -> torch.Tensor | None:
        """Text ``row``'s ids (B, T) with one token replaced by the token another text has at that position and this
        text holds nowhere, both positions ``ordinary`` (B, T); None when no such token exists."""
        # (padding may have an id past sets' width; the clamp only keeps the lookup in range, ordinary drops it)
        candidates = ordinary & ordinary[row] & ~sets[row][ids.clamp(max=sets.shape[1] - 1)]
        candidates[row] = False
        found = candidates.nonzero()  # (other text, position) pairs
        if len(found) == 0:
            return None
        other, position = found[int(torch.randint(len(found), (1,), generator=generator))].tolist()
        swapped = ids[row].clone()
        swapped[position] = ids[other, position]
        return swapped

    def __getitem__(self, index: int) -> dict:
        if self.streams is not None:
            raise TypeError("Batches with streamed kinds are read in order: iterate StreamingPretrainingBatches.")
        return self._batch(self.start_step + index)

    def _batch(self, step: int) -> dict:
        batch, skipped = {}, torch.zeros(len(KINDS), dtype=torch.long)
        if "image" in self.batch_sizes:
            model_views, tokenizer_views, labels, masks = [], [], [], []
            self._prefetch("image", step)
            for slot in range(self.batch_sizes["image"]):
                views, record, shift, position = self._image_sample(
                    "image", step, slot, self.views if self.codes else self.views.crops
                )
                skipped[0] += shift
                if self.codes:  # the codes of the image actually used, a replacement's included
                    model_views.append(views)
                    labels.append(torch.tensor(record["codes"], dtype=torch.long))
                else:
                    model_views.append(views[0])
                    tokenizer_views.append(views[1])
                masks.append(
                    BlockMaskGenerator(self.grid, self.num_masked_patches, seed=mixed_seed(self.seed, 7, position))()
                )
            if self.codes:
                batch["image"] = {"pixel_values": torch.stack(model_views), "image_labels": torch.stack(labels)}
            else:  # uint8 crops, converted and normalized for the whole batch at once
                pixels, tokenizer_pixels = self.views.finish(torch.stack(model_views), torch.stack(tokenizer_views))
                batch["image"] = {"pixel_values": pixels, "tokenizer_pixel_values": tokenizer_pixels}
            batch["image"]["bool_masked_pos"] = torch.stack(masks)
        if "text" in self.batch_sizes:
            if self.streams and "text" in self.streams:
                texts = []
                while len(texts) < self.batch_sizes["text"]:
                    sample = next(self.streams["text"])
                    if sample["text"] is not None and _has_text(sample):
                        texts.append(sample["text"])
                    elif sample["text"] is None:  # (empty lines are left out silently, as without streaming)
                        skipped[1] += 1
                        logger.warning(
                            f"{sample['__url__']} at {sample['__key__']} is not a text line (not UTF-8, or a jsonl line "
                            "without a string text); skipped"
                        )
            else:
                self._prefetch("text", step)
                texts = [record["text"] for record in self._prefetched["text"][1]]
            batch["text"] = self._masked_text("text", self._tokenize(texts), step)
        if "pair" in self.batch_sizes:
            images, texts = [], []
            self._prefetch("pair", step)
            for slot in range(self.batch_sizes["pair"]):
                (model_view, _), record, shift, _ = self._image_sample(
                    "pair", step, slot, lambda image, rng: self.pair_view.crops(image, tokenizer_view=False, rng=rng)
                )
                skipped[2] += shift
                images.append(model_view)
                texts.append(record["text"])
            encoded = self._tokenize(texts)
            batch["pair"] = {
                "pixel_values": self.pair_view.finish(torch.stack(images))[0],
                **self._masked_text("pair", encoded, step),
            }
            if self.itm_pairs:
                batch["itm"] = self._matching_batch(batch["pair"]["pixel_values"], texts, encoded, step)
        batch["counts"] = {
            f"skipped_{kind}": int(count) for kind, count in zip(KINDS, skipped) if kind in self.batch_sizes
        }
        return batch


class StreamingPretrainingBatches(PretrainingBatches, torch.utils.data.IterableDataset):
    """``PretrainingBatches`` whose ``Shards`` kinds are read as streams: iterate it (a DataLoader with ``batch_size=None``).

    Loader worker ``w`` of ``num_workers`` builds the steps ``start_step + w, start_step + w + num_workers, ...``;
    the steps with one remainder modulo ``num_workers`` always come from one stream per streamed kind, stream
    ``rank * num_workers + remainder`` of ``world_size * num_workers`` (``beit3.data.streaming``). Map-style kinds
    and every crop, mask and hard negative stay pure functions of (seed, step, rank), as in ``PretrainingBatches``.

    Each batch carries ``data_state``: ``{"workers": n, "streams": {"<kind>/<remainder>": position}}``, the position
    of its streams after it. The ``Engine`` keeps the latest of each, saves them with every checkpoint and gives
    them back as ``positions`` on resume: the resumed run reads what the interrupted one would have read. A
    position saved with another number of workers (or processes: the Engine refuses those) is an error.
    """

    def __init__(self, *args, num_workers: int = 0, positions: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_workers, self.workers = (
            num_workers,
            max(1, num_workers),
        )  # (0 workers: one stream, read in this process)
        self.positions = (positions or {}).get("streams", {})
        saved = (positions or {}).get("workers", self.workers)
        if saved != self.workers:
            raise ValueError(
                f"The checkpoint's stream positions were taken with {saved} data-loader workers per process; this "
                f"run has {self.workers}. Resume with train.num_workers={saved if saved > 1 else 0}: the streams "
                "are split by worker, so another count would read other samples."
            )
        self.streamed = [kind for kind in self.batch_sizes if isinstance(self.sources[kind], Shards)]
        # The units a stream reads whole: shards, or pieces of the text files (enough of them for every stream).
        self.units = {
            kind: text_pieces(self.sources[kind], self.world_size * self.workers)
            if kind == "text"
            else self.sources[kind]
            for kind in self.streamed
        }
        for kind in self.streamed:  # here, before training, rather than in the loader workers
            check_stream_count(
                len(self.units[kind]),
                self.world_size * self.workers,
                kind,
                f"{self.world_size} processes x {self.workers} loader workers",
            )

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.workers:
            raise ValueError(
                f"StreamingPretrainingBatches(num_workers={self.num_workers}) is read by a loader "
                f"with {info.num_workers if info else 0} workers; give both the same number."
            )
        first = self.start_step + worker
        remainder = first % self.workers
        streams = self.world_size * self.workers
        self.streams = {
            kind: ShardStream(
                self.units[kind],
                self.seed,
                KINDS.index(kind),
                self.rank * self.workers + remainder,
                streams,
                self.positions.get(f"{kind}/{remainder}"),
                read=text_samples if kind == "text" else shard_samples,
            )
            for kind in self.streamed
        }
        unreadable = 0
        for step in range(first, self.start_step + self.num_steps, self.workers):
            batch = self._batch(step)
            now = sum(stream.unreadable_shards for stream in self.streams.values())
            batch["counts"]["unreadable_shards"], unreadable = now - unreadable, now
            batch["data_state"] = {
                "workers": self.workers,
                "streams": {f"{kind}/{remainder}": dict(stream.position) for kind, stream in self.streams.items()},
            }
            yield batch
