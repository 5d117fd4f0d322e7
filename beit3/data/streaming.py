"""Webdataset shards read as a stream, shard by shard, never copied; with a position that resumes exactly.

A web corpus is tens of thousands of ``.tar`` shards (``<key>.jpg|jpeg|png|webp`` with ``<key>.txt``, or
``<key>.json`` holding a ``caption`` or ``text`` field). The ``webdataset`` library expands brace patterns
(``pairs-{000000..009999}.tar``) and iterates the tar members; shards open from local paths, ``file:`` and
``pipe:`` URLs (webdataset's ``gopen``) or any fsspec URL (``s3://``, ``gs://``, ... with its fsspec package).

Streams: each (rank, loader worker) reads its own stream, one of ``world_size * workers``. In epoch ``e`` the
shards are put in the seeded order ``permutation(seed, kind, e)`` and stream ``j`` of ``S`` reads shards
``j, j + S, j + 2S, ...`` of it, one after another, from first sample to last. Nothing is dropped: when the
shards do not divide evenly, a stream with one shard fewer starts its next epoch one shard earlier, so across
the streams at most one shard's worth per stream is read again before every shard was read once.
There is no sample-level shuffle buffer (whose contents a resume would have to rebuild): shuffle when writing
shards (``tasks/make_shards.py`` does) and the epochs shuffle the shard order.

Position: ``{"epoch", "shard", "offset"}`` (the shard's place in this stream's list of the epoch and the
samples already taken from it). Resuming opens that shard and skips ``offset`` samples: at most one shard
is read again per stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..log import get_logger
from .images import IMAGE_SUFFIXES
from .sampling import mixed_seed

logger = get_logger(__name__)

IMAGE_EXTENSIONS = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)  # a shard's image member: <key>.<extension>


def expand_shards(patterns: list[str] | str) -> list[str]:
    """Shard paths or URLs from brace patterns (``data/pairs-{000000..000099}.tar``), in order."""
    from webdataset.shardlists import expand_urls

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return [url for pattern in patterns for url in expand_urls(str(pattern))]


def is_shard_pattern(path) -> bool:
    """A ``.tar`` path, brace pattern or URL (what ``expand_shards`` takes), as opposed to a folder or a jsonl."""
    name = str(path)
    return name.endswith(".tar") or (name.endswith("}") and ".tar" in name)


def is_url(shard: str) -> bool:
    """A ``scheme://`` or ``pipe:`` URL, as opposed to a path on this machine."""
    return "://" in shard or shard.startswith("pipe:")


def check_stream_count(
    units: int, streams: int, kind: str = "", split: str = "processes x data-loader workers"
) -> None:
    """Every stream reads whole shards: ``units`` shards (or text pieces) must feed ``streams`` streams (``split``)."""
    if units < streams:
        raise ValueError(
            f"{units} {kind + ' ' if kind else ''}shards cannot feed {streams} streams ({split}): every stream "
            "reads whole shards. Write more, smaller shards (tasks/make_shards.py --shard-size), or use fewer "
            "processes or train.num_workers."
        )


def open_shard(url: str):
    """A binary stream of one shard: webdataset's ``gopen`` for paths, ``file:`` and ``pipe:``; fsspec for other URLs."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("", "file") or url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError as error:
        raise OSError(
            f"{url}: reading {scheme}:// URLs needs fsspec and its {scheme} package (e.g. s3fs, gcsfs)"
        ) from error
    return fsspec.open(url, "rb").open()


def shard_samples(url: str, on_error) -> Iterator[dict]:
    """The samples of one shard as webdataset gives them (``__key__``, ``__url__`` and one bytes value per
    extension). A shard that cannot be opened, or breaks off (truncated), calls ``on_error(url, error)`` and ends."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(error: Exception) -> bool:
        on_error(url, error)
        return False  # end this shard; the stream goes on with the next

    try:
        stream = open_shard(url)
    except Exception as error:  # noqa: BLE001 - every opener (fsspec, pipes) has its own errors; all mean "skip this shard"
        on_error(url, error)
        return
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler), handler=handler)
    finally:
        stream.close()


def pair_of(sample: dict) -> tuple[bytes | None, str | None]:
    """(image bytes, caption) of a webdataset sample, None where it has none or the caption is not UTF-8 text."""
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    text = None
    try:
        if "txt" in sample:
            text = sample["txt"].decode("utf-8")
        elif "json" in sample:
            record = json.loads(sample["json"])
            text = record.get("caption", record.get("text")) if isinstance(record, dict) else None
    except (UnicodeDecodeError, ValueError):
        text = None
    return image, text if isinstance(text, str) else None


# Big text files are streamed in pieces of about this many bytes (fewer bytes when the streams need more pieces).
TEXT_PIECE_BYTES = 64 * 2**20


def text_pieces(files: list[str], min_pieces: int) -> list[tuple[str, int, int]]:
    """(file, first byte, end byte) pieces of ``.txt`` / ``.jsonl`` files, at least ``min_pieces`` where the bytes allow.

    A line belongs to the piece its first byte is in, so every line is in exactly one piece.
    """
    sizes = [os.path.getsize(f) for f in files]
    step = max(1, min(TEXT_PIECE_BYTES, sum(sizes) // max(1, min_pieces)))
    return [(f, start, min(start + step, size)) for f, size in zip(files, sizes) for start in range(0, size, step)]


def text_samples(piece: tuple[str, int, int], on_error) -> Iterator[dict]:
    """The texts of the lines starting in ``piece``: ``{"text", "__key__", "__url__"}``, the text None for a line
    that is not UTF-8 (or, in ``.jsonl``, not an object with a string ``text``)."""
    path, start, end = piece
    try:
        handle = open(path, "rb")
    except OSError as error:
        on_error(path, error)
        return
    with handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the line holding byte start - 1 is the previous piece's
        structured = path.endswith((".jsonl", ".json"))
        while (where := handle.tell()) < end:
            line = handle.readline()
            if not line:
                break
            try:
                text = line.decode("utf-8").rstrip("\r\n")
                if structured:
                    record = json.loads(text) if text.strip() else {"text": ""}  # (a blank line: left out, not bad)
                    text = record.get("text") if isinstance(record, dict) else None
            except (UnicodeDecodeError, ValueError):
                text = None
            yield {"text": text if isinstance(text, str) else None, "__key__": f"byte {where}", "__url__": path}


class ShardStream:
    """Stream ``stream`` of ``streams`` over ``shards`` (see the module docstring): ``next()`` gives the next raw
    sample, epoch after epoch, and ``position`` is what resumes it (``ShardStream(..., position=...)``).

    ``read(shard, on_error)`` gives a shard's samples: ``shard_samples`` for tar shards, ``text_samples`` for
    pieces of text files. Unreadable shards are skipped, named on stderr and counted in ``unreadable_shards``.
    """

    def __init__(
        self,
        shards: list,
        seed: int,
        kind: int,
        stream: int,
        streams: int,
        position: dict | None = None,
        read=shard_samples,
    ):
        check_stream_count(len(shards), streams)
        self.shards, self.seed, self.kind, self.stream, self.streams, self.read = (
            shards,
            seed,
            kind,
            stream,
            streams,
            read,
        )
        self.position = dict(position or {"epoch": 0, "shard": 0, "offset": 0})
        self.unreadable_shards = 0
        self._samples: Iterator[dict] | None = None

    @lru_cache(maxsize=2)  # asked for every sample: a permutation of every shard is not free at 100k shards
    def _mine(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng(mixed_seed(self.seed, self.kind, epoch)).permutation(len(self.shards))
        return order[self.stream :: self.streams]

    def _on_error(self, url: str, error: Exception) -> None:
        self.unreadable_shards += 1
        logger.warning(
            f"shard {url} could not be read to the end ({type(error).__name__}: {error}); skipped, the stream "
            "goes on with its next shard"
        )

    def __next__(self) -> dict:
        for _ in range(2 * len(self._mine(self.position["epoch"])) + 2):  # two whole passes without a sample: give up
            if self._samples is None:
                url = self.shards[self._mine(self.position["epoch"])[self.position["shard"]]]
                self._samples = self.read(url, self._on_error)
                for _ in range(self.position["offset"]):  # a resumed position: skip what was taken before
                    if next(self._samples, None) is None:
                        break
            sample = next(self._samples, None)
            if sample is not None:
                self.position["offset"] += 1
                return sample
            self._samples = None
            epoch, shard = self.position["epoch"], self.position["shard"] + 1
            if shard == len(self._mine(epoch)):
                epoch, shard = epoch + 1, 0
            self.position = {"epoch": epoch, "shard": shard, "offset": 0}
        raise RuntimeError(
            f"stream {self.stream} of {self.streams} read no sample from its shards in two passes "
            f"(e.g. {self.shards[self._mine(self.position['epoch'])[0]]}); check that the shards exist and hold samples."
        )

    def __iter__(self) -> ShardStream:
        return self


def write_shards(samples, pattern: str, shard_size: int) -> list[str]:
    """Writes ``samples`` (dicts ``{"__key__", "<ext>": bytes or str}``) to shards named by ``pattern``
    (``out/pairs-%06d.tar``), ``shard_size`` samples each, with webdataset's ``TarWriter``; returns the paths.

    Each shard is written under a temporary name and renamed when whole, so a killed conversion leaves
    complete shards only.
    """
    from webdataset import TarWriter

    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    writer, count = None, 0
    try:
        for sample in samples:
            if writer is not None and count == shard_size:
                writer.close()
                writer = None
                os.replace(f"{written[-1]}.tmp", written[-1])
            if writer is None:
                written.append(pattern % len(written))
                writer, count = TarWriter(f"{written[-1]}.tmp"), 0
            writer.write(sample)
            count += 1
        if writer is not None:
            writer.close()
            writer = None
            os.replace(f"{written[-1]}.tmp", written[-1])
    finally:
        if writer is not None:  # stopped mid-shard: drop the half-written one
            writer.close()
            Path(f"{written.pop()}.tmp").unlink(missing_ok=True)
    return written
