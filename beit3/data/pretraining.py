"""Pretraining batches: images, texts and image-text pairs, mixed so that every step sees all three kinds.

The sources (``beit3.data.sources``) are image folders, text files, jsonl pairs, webdataset shards or saved
``datasets`` datasets; ``BatchOptions`` says how their samples become a batch.

Every batch is a pure function of (seed, step, rank): the order of each kind comes from a seeded
permutation per epoch, and each sample's crop, flip, color jitter and mask are seeded from its
global position (the streams of ``beit3.data.sampling.Stream``). A resumed run therefore sees exactly
the batches the interrupted run would have seen, with no data-loader state to save. A corrupt image is
replaced by the next sample of the same permutation and counted.

With ``image_codes`` (the folder ``tokenizers/encode_images.py`` wrote for the image folder), each
image carries its precomputed visual tokens as ``image_labels`` and the model sees the same fixed
center crop they were computed from (``beit3.views.CenterView``) instead of a random crop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset

from ..log import get_logger
from ..masking import (
    DEFAULT_MASK_FRACTION,
    PAIR_TEXT_MASK_PROB,
    TEXT_MASK_PROB,
    BlockMaskGenerator,
    mask_text_tokens,
    text_masker,
)
from ..sections import Section, doc
from ..views import CenterView, TwoViewTransform
from .common import MAX_REPLACEMENTS, load_rgb
from .matching import matching_batch
from .sampling import Stream, mixed_seed
from .sources import KINDS, Shards, has_text
from .streaming import ShardStream, check_stream_count, pair_of, shard_samples, text_pieces, text_samples

logger = get_logger(__name__)

MAX_TEXT_LENGTH = 64  # tokens per text, <s> and </s> included
# The pairs' crop and flip by default: mild, since a caption may name what a tight crop cuts out.
PAIR_CROP_SCALE = (0.5, 1.0)
PAIR_HFLIP = 0.5


@dataclass(kw_only=True)
class SampleOptions(Section):
    """How samples are drawn, masked and matched: the options a pretraining config sets in its ``data`` section
    (``beit3.training.pretraining.PretrainingData`` adds where the samples come from), each declared here once with
    its doc and limits, checked when the options are built."""

    section: ClassVar[str] = "data"
    max_text_length: int = doc("tokens per text, <s> and </s> included", MAX_TEXT_LENGTH, low=3)
    text_mask_prob: float = doc("masked share of a text's tokens (the paper: 0.15)", TEXT_MASK_PROB, above=0, high=1)
    pair_mask_prob: float = doc("masked share of a pair's text (the paper: 0.5)", PAIR_TEXT_MASK_PROB, above=0, high=1)
    image_mask_ratio: float = doc(
        "masked share of an image's patches, in blocks, rounded to whole patches (BEiT: 75/196)",
        DEFAULT_MASK_FRACTION,
        low=0,
        high=1,
    )
    itm_negatives: float = doc(
        "image-text matching on this share of each pair batch, against hard negatives (0: the paper); with "
        "model.overrides.itm_weight. The matched pairs go, text unmasked, into an itm batch, once with their own "
        "image and once with a hard negative (beit3.data.matching)",
        0.0,
        low=0,
        high=1,
    )
    itm_text_swaps: float = doc(
        "share of the matching negatives that keep their image and swap one caption token for the one another "
        "caption of the batch has there: negatives one attribute off (0: image negatives only)",
        0.0,
        low=0,
        high=1,
    )
    group_by_length: int = doc(
        "group texts and pairs by token length within windows of this many steps, so that most batches need no "
        "padding mask (SDPA's flash kernel on a GPU takes none); 0: off, the paper's batches. Map-style sources only",
        0,
        low=0,
    )
    pair_crop_scale: tuple[float, float] = doc(
        "area range of the pairs' random resized crop (tight crops can cut out what a caption names)", PAIR_CROP_SCALE
    )
    pair_hflip: float = doc(
        "the pairs' flip probability (0 when captions say left and right)", PAIR_HFLIP, low=0, high=1
    )

    def __post_init__(self):
        super().__post_init__()
        self.pair_crop_scale = tuple(self.pair_crop_scale)

    def sampling(self) -> dict:
        """The values of these options alone (of a subclass's too), to build another holder of them."""
        return {f.name: getattr(self, f.name) for f in fields(SampleOptions)}


@dataclass
class BatchOptions(SampleOptions):
    """How samples become a pretraining batch: everything but where the batch sits (seed, rank, step).

    Args:
        batch_sizes: samples per kind per rank and step, e.g. ``{"image": 32, "text": 32, "pair": 32}``.
        image_size, patch_size: the model's image; the tokenizer view has ``tokenizer_image_size`` (default: the same).
        crop_scale, color_jitter: the image kind's random resized crop (area range) and color jitter (0: none).
        tokenizer_views_only: image batches hold only ``tokenizer_pixel_values``, no model view and no masks
            (what a visual tokenizer trains on).
        and, by keyword, the ``SampleOptions``. With ``group_by_length`` a window of steps holds the samples its steps
        would hold without grouping, sorted by length (ties in random order) and cut into batches, which its steps
        take in random order.
    """

    batch_sizes: dict
    image_size: int
    patch_size: int
    tokenizer_image_size: int | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    color_jitter: float = 0.4
    tokenizer_views_only: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.crop_scale = tuple(self.crop_scale)
        unknown = set(self.batch_sizes) - set(KINDS)
        if unknown:
            raise ValueError(f"batch sizes for {sorted(unknown)}: the kinds are {', '.join(KINDS)}.")
        if self.itm_negatives and self.batch_sizes.get("pair", 0) < 2:
            raise ValueError(
                "itm_negatives needs pair batches of 2 or more (data.batch_size.pair): a hard negative is another "
                "pair of the same batch."
            )

    @property
    def grid(self) -> int:
        """Patches per side of the model's image."""
        return self.image_size // self.patch_size

    @property
    def matched_pairs(self) -> int:
        """K, the pairs of each pair batch that also go into the ``itm`` batch (0: none)."""
        return max(1, round(self.itm_negatives * self.batch_sizes["pair"])) if self.itm_negatives else 0

    @property
    def masked_patches(self) -> int:
        """Patches per image to mask."""
        return round(self.image_mask_ratio * self.grid**2)


# What finish_batch converts with: the views' default mean and std, which every view of PretrainingBatches uses.
PIXELS = TwoViewTransform()


def finish_batch(batch: dict) -> dict:
    """A batch of ``PretrainingBatches`` as the model and the visual tokenizer take it, on whatever device it is: the
    uint8 model views normalized (mean = std = 0.5, as ``TwoViewTransform``), the tokenizer views in [0, 1]. Views
    that are floats already (the fixed crops of precomputed codes) stay as they are. Changes ``batch`` in place."""
    keys = ("pixel_values", "tokenizer_pixel_values")
    for part in batch.values():
        if isinstance(part, dict):
            views = [part[k] if k in part and part[k].dtype == torch.uint8 else None for k in keys]
            for key, finished in zip(keys, PIXELS.finish(*views)):
                if finished is not None:
                    part[key] = finished
    return batch


class PretrainingBatches(torch.utils.data.Dataset):
    """Item ``i`` is this rank's batch for step ``start_step + i``: a dict per kind, plus skip counts.

    Args:
        sources: from ``load_sources`` (map-style kinds only; ``StreamingPretrainingBatches`` streams ``Shards``).
        tokenizer: the text tokenizer (with a mask token); None for image-only batches.
        options: how samples become a batch (``BatchOptions``: sizes, views, masks, matching).
        seed, rank, world_size, start_step, num_steps: where the batches sit in the run.
    Batch (the views as uint8 crops, a quarter of float32's bytes through the loader's queue and the copy to a GPU:
    ``finish_batch`` makes them model and tokenizer inputs where the step runs):
        image: pixel_values (B, 3, S, S), tokenizer_pixel_values (B, 3, s, s), bool_masked_pos (B, patches),
            num_masked_patches (an int: the True in bool_masked_pos);
            when the image source has ``codes`` (``load_sources(image_codes=...)``): pixel_values of the fixed
            center crop the codes were computed from, bool_masked_pos and image_labels (B, patches), no tokenizer
            view; with ``options.tokenizer_views_only``: tokenizer_pixel_values alone
        text: input_ids, attention_mask, labels (B, T), num_masked_text_tokens (an int: the labels not -100)
        pair: pixel_values, input_ids, attention_mask, labels, num_masked_text_tokens
        itm (with itm_negatives): pixel_values (2K, ...), input_ids, attention_mask (2K, T) unmasked, itm_labels (2K,)
            (``beit3.data.matching.matching_batch``); a text, pair or itm part without padding has no attention_mask
        counts: ``{"skipped_<kind>": n}``, corrupt images (and streamed samples without image or caption) replaced in
            this batch, for the ``Engine``'s counters
    """

    streams_shards = False  # whether this class reads Shards kinds (as streams)

    def __init__(
        self,
        sources: dict[str, Dataset | Shards],
        tokenizer,
        options: BatchOptions,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_steps: int = 10**9,
    ):
        if any(isinstance(source, Shards) for source in sources.values()) and not self.streams_shards:
            raise TypeError(
                "Some kinds are streamed from shards (load_sources(streaming=True)): use StreamingPretrainingBatches."
            )
        self.sources, self.tokenizer, self.options = sources, tokenizer, options
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_step, self.num_steps = start_step, num_steps
        self.streams = None  # {kind: ShardStream} of a StreamingPretrainingBatches worker
        self._prefetched: dict[str, tuple[int, list[dict]]] = {}  # kind -> (step, its slots' records)
        wanted = options.batch_sizes
        self.batch_sizes = {kind: wanted[kind] for kind in KINDS if kind in sources and wanted.get(kind, 0) > 0}
        if not self.batch_sizes:
            raise ValueError(
                f"No kind has both a source and a batch size: sources {sorted(sources)}, "
                f"batch sizes {options.batch_sizes}."
            )
        self.grid = options.grid
        grouped = [kind for kind in ("text", "pair") if kind in self.batch_sizes] if options.group_by_length else []
        streamed = [kind for kind in grouped if isinstance(sources[kind], Shards)]
        if streamed:
            raise ValueError(
                f"group_by_length sorts the samples of a window of steps, which needs random access; the {streamed} "
                "kinds are streamed. Set data.group_by_length to 0, or data.streaming to false."
            )
        self.length_grouped = frozenset(grouped)
        # Precomputed codes fix the crop: the model sees what encode_images.py gave the tokenizer (see CenterView).
        self.codes = (
            "image" in self.batch_sizes
            and not isinstance(sources["image"], Shards)
            and "codes" in sources["image"].column_names
        )
        if self.codes and sources["image"].features["codes"].length != self.grid**2:
            raise ValueError(
                f"The image codes have {sources['image'].features['codes'].length} codes per image but the model's "
                f"{options.image_size} px images have {self.grid}x{self.grid} patches of {options.patch_size} px."
            )
        self.views = (
            CenterView(options.image_size, color_jitter=options.color_jitter)
            if self.codes
            else TwoViewTransform(
                model_size=options.image_size,
                tokenizer_size=options.tokenizer_image_size or options.image_size,
                scale=options.crop_scale,
                color_jitter=options.color_jitter,
            )
        )
        self.pair_view = TwoViewTransform(
            model_size=options.image_size,
            tokenizer_size=options.tokenizer_image_size or options.image_size,
            scale=options.pair_crop_scale,
            color_jitter=0.0,
            hflip=options.pair_hflip,
        )
        self.maskers = {
            kind: text_masker(tokenizer, prob, seed=seed)
            for kind, prob in (("text", options.text_mask_prob), ("pair", options.pair_mask_prob))
            if kind in self.batch_sizes
        }
        if self.codes and options.tokenizer_views_only:
            raise ValueError("Images with precomputed codes have no tokenizer view; load them without image_codes.")
        self.itm_pairs = options.matched_pairs
        self.itm_text_swaps = round(options.itm_text_swaps * self.itm_pairs)

    def __len__(self) -> int:
        return self.num_steps

    @lru_cache(maxsize=8)
    def _permutation(self, kind: str, epoch: int) -> np.ndarray:
        order = np.random.default_rng(mixed_seed(self.seed, Stream.of_kind(kind), epoch)).permutation(
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
        if kind in self.length_grouped:
            window, within = divmod(step, self.options.group_by_length)
            step, slot = self._length_groups(kind, window)[within][slot]
        position = self._global_position(kind, step, slot, shift)
        return self._row(kind, position), position

    def _row(self, kind: str, position: int) -> int:
        """The dataset row at a place in the kind's global order (an epoch is a permutation)."""
        epoch, offset = divmod(position, len(self.sources[kind]))
        return int(self._permutation(kind, epoch)[offset])

    @lru_cache(maxsize=4)
    def _length_groups(self, kind: str, window: int) -> list[list[tuple[int, int]]]:
        """The (step, slot) each slot of each step of a window takes its sample from, under ``group_by_length``:
        the window's samples sorted by token length, cut into batches, the batches in a seeded order."""
        size, batch = self.options.group_by_length, self.batch_sizes[kind]
        slots = [(window * size + step, slot) for step in range(size) for slot in range(batch)]
        rows = [self._row(kind, self._global_position(kind, step, slot)) for step, slot in slots]
        texts = self.sources[kind].select_columns(["text"])[rows]["text"]
        encoded = self.tokenizer(
            [text if isinstance(text, str) else "" for text in texts],
            truncation=True,
            max_length=self.options.max_text_length,
        )["input_ids"]
        rng = np.random.default_rng(
            mixed_seed(self.seed, Stream.LENGTH_GROUPS, Stream.of_kind(kind), window, self.rank)
        )
        order = np.lexsort((rng.permutation(len(slots)), [len(ids) for ids in encoded]))  # by length, ties at random
        groups = [[slots[i] for i in order[k * batch : (k + 1) * batch]] for k in range(size)]
        return [groups[k] for k in rng.permutation(size)]

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
        if image is None or (kind == "pair" and (text is None or not has_text({"text": text}))):
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
                view(image, rng=random.Random(mixed_seed(self.seed, Stream.of_kind(kind), position))),
                record,
                shift,
                position,
            )
        raise RuntimeError(
            f"{MAX_REPLACEMENTS} images in a row could not be read from the {kind} source; check the data."
        )

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.options.max_text_length, return_tensors="pt"
            )
        )  # to the longest

    def _masked_text(self, kind: str, encoded: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        masker = self.maskers[kind]
        masker.generator.manual_seed(mixed_seed(self.seed, Stream.of_kind(kind), step, self.rank))
        input_ids, labels = mask_text_tokens(masker, encoded["input_ids"], encoded["attention_mask"])
        return {
            "input_ids": input_ids,
            "attention_mask": encoded["attention_mask"],
            "labels": labels,
            # Counted here, on the loader's CPU tensors, so that the model gathers the masked positions without
            # reading their number back from a GPU in the middle of the step
            "num_masked_text_tokens": int((labels != -100).sum()),
        }

    def __getitem__(self, index: int) -> dict:
        if self.streams is not None:
            raise TypeError("Batches with streamed kinds are read in order: iterate StreamingPretrainingBatches.")
        return self._batch(self.start_step + index)

    def _image_batch(self, step: int, skipped: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image kind's part of step ``step``'s batch (see the class docstring); adds its replacements to ``skipped``."""
        views_only = self.options.tokenizer_views_only
        if self.codes:
            view = self.views
        elif views_only:
            view = lambda image, rng: self.views.crops(image, model_view=False, rng=rng)  # noqa: E731
        else:
            view = self.views.crops
        model_views, tokenizer_views, labels, masks = [], [], [], []
        self._prefetch("image", step)
        for slot in range(self.batch_sizes["image"]):
            views, record, shift, position = self._image_sample("image", step, slot, view)
            skipped[KINDS.index("image")] += shift
            if self.codes:  # the codes of the image actually used, a replacement's included
                model_views.append(views)
                labels.append(torch.tensor(record["codes"], dtype=torch.long))
            else:
                model_views.append(views[0])
                tokenizer_views.append(views[1])
            if not views_only:
                seed = mixed_seed(self.seed, Stream.IMAGE_MASK, position)
                masks.append(BlockMaskGenerator(self.grid, self.options.masked_patches, seed=seed)())
        if self.codes:
            out = {"pixel_values": torch.stack(model_views), "image_labels": torch.stack(labels)}
        elif views_only:
            out = {"tokenizer_pixel_values": torch.stack(tokenizer_views)}
        else:  # uint8 crops: finish_batch converts and normalizes them where the step runs
            out = {"pixel_values": torch.stack(model_views), "tokenizer_pixel_values": torch.stack(tokenizer_views)}
        if masks:
            out["bool_masked_pos"] = torch.stack(masks)
            out["num_masked_patches"] = int(out["bool_masked_pos"].sum())  # see _masked_text
        return out

    def _batch(self, step: int) -> dict:
        batch, skipped = {}, torch.zeros(len(KINDS), dtype=torch.long)
        if "image" in self.batch_sizes:
            batch["image"] = self._image_batch(step, skipped)
        if "text" in self.batch_sizes:
            if self.streams and "text" in self.streams:
                texts = []
                while len(texts) < self.batch_sizes["text"]:
                    sample = next(self.streams["text"])
                    if sample["text"] is not None and has_text(sample):
                        texts.append(sample["text"])
                    elif sample["text"] is None:  # (empty lines are left out silently, as without streaming)
                        skipped[KINDS.index("text")] += 1
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
                skipped[KINDS.index("pair")] += shift
                images.append(model_view)
                texts.append(record["text"])
            encoded = self._tokenize(texts)
            batch["pair"] = {
                "pixel_values": torch.stack(images),  # uint8, as the image kind's
                **self._masked_text("pair", encoded, step),
            }
            if self.itm_pairs:
                batch["itm"] = matching_batch(
                    batch["pair"]["pixel_values"],
                    texts,
                    encoded,
                    self.itm_pairs,
                    self.itm_text_swaps,
                    self.tokenizer.all_special_ids,
                    torch.Generator().manual_seed(mixed_seed(self.seed, Stream.MATCHING, step, self.rank)),
                )
        for kind in ("text", "pair", "itm"):
            # A batch without padding goes without a mask, so that attention may take its fastest kernel (SDPA's flash
            # kernel on a GPU takes no mask); read here, on the loader's CPU tensors, where that costs no host sync
            if kind in batch and bool(batch[kind]["attention_mask"].all()):
                del batch[kind]["attention_mask"]
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

    streams_shards = True

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
                Stream.of_kind(kind),
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
