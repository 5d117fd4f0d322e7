"""Pretraining sources: what ``data.sources`` names, as ``datasets.Dataset`` rows or streamed shards.

Each kind (image, text, pair) may be given in one of several forms (an image folder, shards, text files,
jsonl pairs, a saved ``datasets`` dataset). Every form is one builder registered with ``@source_form`` in
``SOURCE_FORMS``; ``load_sources`` hands each kind to the first form that accepts its value. A new form of
source is one more registered builder here.

Local files are read with Hugging Face ``datasets``, whose Arrow files are memory-mapped: a corpus larger
than RAM still gives random access, which the step-indexed batches rely on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, Value, load_dataset

from ..log import get_logger
from .common import load_rgb, pair_lines, undecoded_columns
from .images import list_images, read_codes, read_codes_info
from .streaming import IMAGE_EXTENSIONS, expand_shards, is_shard_pattern, is_url, text_samples

logger = get_logger(__name__)

KINDS = ("image", "text", "pair")  # the kinds of pretraining data, in the order every batch holds them


def has_text(row: dict) -> bool:
    """The one rule for the text of texts and pairs: a string with something besides whitespace."""
    return isinstance(row["text"], str) and bool(row["text"].strip())


class Shards(list):
    """A kind read as a stream from these webdataset shards (``beit3.data.streaming``), not copied to Arrow."""


class TextFiles(Shards):
    """The text kind read as a stream from these ``.txt`` / ``.jsonl`` files, in pieces (``streaming.text_pieces``)."""


@dataclass(frozen=True)
class SourceOptions:
    """What every form of source is told besides its own value."""

    streaming: bool = False  # read shards and text files as streams instead of copying them to Arrow
    image_codes: str | None = None  # precomputed visual tokens of an image folder (tokenizers/encode_images.py)


SourceBuilder = Callable[[str, object, SourceOptions], "Dataset | Shards"]


@dataclass(frozen=True)
class SourceForm:
    """One way to give a kind's source: ``accepts(value)`` tells it apart, ``build(kind, value, options)`` reads it."""

    description: str  # as error messages name it
    kinds: tuple[str, ...]
    accepts: Callable[[object], bool]
    build: SourceBuilder


SOURCE_FORMS: list[SourceForm] = []


def source_form(description: str, kinds: tuple[str, ...], accepts: Callable[[object], bool]):
    """Registers the decorated ``build(kind, value, options)`` as a form of source for ``kinds``; forms registered
    earlier are tried first."""

    def register(build: SourceBuilder) -> SourceBuilder:
        SOURCE_FORMS.append(SourceForm(description, tuple(kinds), accepts, build))
        return build

    return register


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple))


def _refuse_codes(kind: str, form: str, options: SourceOptions) -> None:
    if options.image_codes and kind == "image":
        raise ValueError(
            f"image_codes are the codes of an image folder; with images from {form}, let the visual "
            "tokenizer compute the targets (set image_codes to null)."
        )


@source_form("{dataset: <save_to_disk folder>, ...}", KINDS, accepts=lambda value: isinstance(value, dict))
def _saved_dataset(kind: str, spec: dict, options: SourceOptions) -> Dataset:
    _refuse_codes(kind, "a saved dataset", options)
    return saved_dataset_source(spec, kind)


@source_form(
    "webdataset shards (a list, a brace pattern or URLs)",
    ("image",),
    accepts=lambda value: _is_list(value) or (isinstance(value, (str, os.PathLike)) and is_shard_pattern(value)),
)
def _image_shards(kind: str, shards, options: SourceOptions) -> Shards:
    if not options.streaming:
        raise ValueError(
            f"images {shards} are shards: reading images from shards needs data.streaming: true "
            "(or give an image folder)."
        )
    _refuse_codes(kind, "shards", options)
    return Shards(expand_shards(shards))


@source_form("an image folder", ("image",), accepts=lambda value: isinstance(value, (str, os.PathLike)))
def _image_folder(kind: str, folder, options: SourceOptions) -> Dataset:
    paths = list_images(folder)
    if options.image_codes and paths:
        return image_codes_source(folder, paths, options.image_codes)
    return Dataset.from_dict({"path": [str(p) for p in paths]})


@source_form("a list of .txt / .jsonl files", ("text",), accepts=_is_list)
def _text_file_list(kind: str, files, options: SourceOptions) -> Dataset | Shards:
    if not options.streaming:
        return _text_files([str(f) for f in files]).filter(has_text)
    missing = [str(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"text file(s) not found: {', '.join(missing[:3])}; check data.sources.texts.")
    return TextFiles(str(f) for f in files)


@source_form("a list of .jsonl files and webdataset shards", ("pair",), accepts=_is_list)
def _pair_file_list(kind: str, pairs, options: SourceOptions) -> Dataset | Shards:
    shards = [str(f) for f in pairs if is_shard_pattern(f)]
    files = [str(f) for f in pairs if not is_shard_pattern(f)]
    if options.streaming:
        if files:
            raise ValueError(
                f"With data.streaming: true the pairs must be webdataset shards, but {files[:2]} are not; "
                "convert them with tasks/make_shards.py, or turn streaming off."
            )
        return Shards(expand_shards(shards))
    if any("{" in f or is_url(f) for f in shards):
        raise ValueError(
            f"The pair shards {shards[:2]} are a pattern or URL, which only streaming reads: set data.streaming: true."
        )
    from datasets import concatenate_datasets

    parts = ([_jsonl_pairs(files)] if files else []) + ([_webdataset_pairs(shards)] if shards else [])
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def load_sources(
    images: str | list[str] | dict | None = None,
    texts: list[str] | dict | None = None,
    pairs: list[str] | dict | None = None,
    image_codes: str | None = None,
    streaming: bool = False,
) -> dict[str, Dataset | Shards]:
    """The kinds given, each read by the first of ``SOURCE_FORMS`` that accepts its value.

    Rows: image ``{"path"}`` (and ``"codes"``, that image's visual tokens, with ``image_codes``; see
    ``image_codes_source``), text ``{"text"}``, pair ``{"path", "text"}``; rows from bytes (shards, saved datasets)
    also hold ``"image_bytes"``. With ``streaming``, shards and text files become ``Shards`` / ``TextFiles``, read
    shard by shard (piece by piece) by ``StreamingPretrainingBatches``; without it, they are copied into the
    ``datasets`` cache. A kind without a source is left out; a source that yields nothing is an error.
    """
    options = SourceOptions(streaming=streaming, image_codes=str(image_codes) if image_codes else None)
    given = {kind: value for kind, value in zip(KINDS, (images, texts, pairs)) if value}
    if image_codes and "image" not in given:
        raise ValueError(
            f"image_codes ({image_codes}) are the codes of an image folder, but no images source is given; "
            "set images to the folder they were encoded from."
        )
    if not given:
        raise ValueError("No pretraining data: give at least one of images, texts, pairs.")
    sources = {}
    for kind, value in given.items():
        forms = [form for form in SOURCE_FORMS if kind in form.kinds]
        form = next((form for form in forms if form.accepts(value)), None)
        if form is None:
            raise ValueError(
                f"data.sources: the {kind} source {value!r} is none of the forms it may take: "
                f"{'; '.join(f.description for f in forms)}."
            )
        sources[kind] = form.build(kind, value, options)
    for kind, dataset in sources.items():
        if isinstance(dataset, Shards):
            _check_shards_exist(kind, dataset)
        if len(dataset) == 0:
            raise ValueError(
                f"The {kind} source is empty: check the paths in the config (images: {images}, texts: {texts}, pairs: {pairs})."
            )
    return sources


def _check_shards_exist(kind: str, shards: Shards) -> None:
    """All missing: an error; some: a warning (they are counted as unreadable when their turn comes)."""
    missing = [url for url in shards if not is_url(url) and not os.path.isfile(url)]
    if len(missing) == len(shards):
        raise ValueError(
            f"None of the {len(shards)} {kind} shards exists (e.g. {missing[0]}); check the path or pattern."
        )
    if missing:
        logger.warning(
            f"{len(missing)} of the {len(shards)} {kind} shards do not exist (e.g. {missing[0]}); they are "
            "skipped and counted as unreadable shards when their turn comes."
        )


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
    return data.filter(has_text, keep_in_memory=True) if "text" in columns else data


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
    ).filter(has_text)
