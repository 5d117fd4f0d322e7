"""A folder of images -> visual-token codes: listing, safe loading, the tokenizer's preprocessing, batched
encoding, and the ``codes.safetensors`` + ``index.jsonl`` pair that ``tokenizers/encode_images.py`` writes.

    paths = list_images("photos/")
    encoded = encode_images(tokenizer, paths, image_size=224, batch_size=64)
    write_codes("codes/", encoded.codes, [relative(p) for p in encoded.paths])
    codes, index = read_codes("codes/")     # (N, patches) LongTensor, [{"path": ..., "row": i}, ...]
    read_codes_info("codes/")               # {"rows", "patches", "grid", "codebook_size", "metadata"}, codes unread

An image that cannot be read (truncated, not an image) is skipped and reported, never fatal; every
readable one is converted to RGB (grayscale, RGBA, palette, CMYK, 16-bit) by ``common.load_rgb``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torchvision.transforms import v2 as T
from tqdm import tqdm

from ..io import loader_worker_init, write_bytes_atomic, write_text_atomic
from ..log import get_logger
from .common import load_rgb

logger = get_logger(__name__)

IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
)  # what an image folder holds, everywhere
CODES_NAME = "codes.safetensors"
INDEX_NAME = "index.jsonl"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every file below ``folder`` (recursively) with an image suffix (any case), sorted.

    Links that lead nowhere (dangling, or a loop) and linked folders (not followed) are left out and
    counted in a warning on stderr, with an example of each.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No image folder at {folder}.")
    images, broken, linked_folders = [], [], []
    for path in folder.rglob("*"):
        if path.is_symlink() and path.is_dir():
            linked_folders.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            (images if path.is_file() else broken if path.is_symlink() else []).append(path)
    if broken:
        logger.warning(
            f"{len(broken)} image links below {folder} lead nowhere (dangling, or a loop), e.g. {sorted(broken)[0]}; "
            "left out"
        )
    if linked_folders:
        logger.warning(
            f"{len(linked_folders)} linked folders below {folder} are not followed, e.g. {sorted(linked_folders)[0]}; "
            "link or copy their images in, or list their target folder"
        )
    return sorted(images)


def tokenizer_transform(image_size: int) -> T.Compose:
    """PIL RGB -> (3, image_size, image_size) float in [0, 1]: bicubic resize of the shorter side, center
    crop, no normalization (the visual tokenizers map pixels themselves)."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


class ImageFiles(torch.utils.data.Dataset):
    """Item ``i``: ``(i, pixel_values (3, S, S) or None, reason or None)``; an unreadable file gives None and why."""

    def __init__(self, paths: Sequence[str | os.PathLike], image_size: int):
        self.paths = list(paths)
        self.transform = tokenizer_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(load_rgb(self.paths[index])), None
        except (ValueError, FileNotFoundError) as error:  # load_rgb's; the cause without the advice for index files
            return index, None, str(error.__cause__ or error)


def collate_readable(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict:
    """A batch of the readable items: ``rows`` (positions in the path list), ``pixel_values`` (B, 3, S, S)
    or None if none was readable, and ``skipped`` [(position, reason)]."""
    readable = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    return {
        "rows": [i for i, _ in readable],
        "pixel_values": torch.stack([p for _, p in readable]) if readable else None,
        "skipped": [(i, reason) for i, pixels, reason in items if pixels is None],
    }


@dataclass
class EncodedImages:
    """codes (N, patches) LongTensor for the N readable images, in ``paths`` order; ``grid`` (h, w);
    ``skipped`` [(path, reason)]; ``first_images`` (n, 3, S, S) of the first encoded images, if asked for."""

    codes: torch.Tensor
    paths: list[Path]
    grid: tuple[int, int]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    first_images: torch.Tensor | None = None


@torch.inference_mode()
def encode_images(
    tokenizer,
    paths: Sequence[str | os.PathLike],
    image_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    keep_images: int = 0,
    on_skip: Callable[[Path, str], None] | None = None,
    progress: bool = True,
) -> EncodedImages:
    """Codes of every readable image in ``paths`` with ``tokenizer.get_codebook_indices``.

    Args:
        tokenizer: a ``VisualTokenizer`` (eval mode); moved to ``device``.
        image_size: the side images are cropped to (default: the tokenizer's); a multiple of its patch size.
        device: where to run (default: the tokenizer's device).
        num_workers: DataLoader processes that read and preprocess images.
        keep_images: also return the preprocessed pixels of the first this-many encoded images.
        on_skip: called with (path, reason) for each unreadable image, as it is met.
        progress: show a tqdm bar (on stderr).
    """
    image_size = image_size or tokenizer.image_size
    patch = tokenizer.patch_size
    if image_size < patch or image_size % patch:
        raise ValueError(
            f"The image size {image_size} is not a positive multiple of the tokenizer's patch size {patch}; "
            f"use e.g. {max(patch, image_size // patch * patch)} (the tokenizer was built for {tokenizer.image_size})."
        )
    paths = [Path(p) for p in paths]
    if device is not None:
        tokenizer = tokenizer.to(device)
    device = next(tokenizer.parameters()).device
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_readable,
        pin_memory=device.type == "cuda",
        worker_init_fn=loader_worker_init(num_workers),
    )
    codes, rows, skipped, kept, kept_count = [], [], [], [], 0
    with tqdm(total=len(paths), desc="encode", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            for i, reason in batch["skipped"]:
                skipped.append((paths[i], reason))
                if on_skip:
                    on_skip(paths[i], reason)
            if batch["pixel_values"] is not None:
                pixels = batch["pixel_values"]
                codes.append(tokenizer.get_codebook_indices(pixels.to(device, non_blocking=True)).cpu())
                rows.extend(batch["rows"])
                if kept_count < keep_images:
                    kept.append(pixels[: keep_images - kept_count])
                    kept_count += len(kept[-1])
            bar.update(len(batch["rows"]) + len(batch["skipped"]))
            bar.set_postfix(skipped=len(skipped))
    patches = (image_size // patch) ** 2
    return EncodedImages(
        codes=torch.cat(codes) if codes else torch.empty(0, patches, dtype=torch.long),
        paths=[paths[i] for i in rows],
        grid=(image_size // patch, image_size // patch),
        skipped=skipped,
        first_images=torch.cat(kept) if kept else None,
    )


def write_codes(
    output: str | os.PathLike, codes: torch.Tensor, paths: Sequence[str], metadata: dict[str, str] | None = None
) -> None:
    """Writes ``output/codes.safetensors`` (tensor ``codes`` (N, patches), int16 when the ids fit, else int32)
    and ``output/index.jsonl`` (``{"path": ..., "row": i}`` per line), each atomically (``beit3.io``)."""
    if codes.dim() != 2 or codes.shape[0] != len(paths):
        raise ValueError(
            f"codes must be (N, patches) with one row per path; got {tuple(codes.shape)} for {len(paths)} paths."
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.mkdir(exist_ok=True)
    dtype = torch.int16 if codes.numel() == 0 or codes.max() < 2**15 else torch.int32
    write_bytes_atomic(
        output / CODES_NAME,
        save({"codes": codes.to(dtype).contiguous()}, metadata={k: str(v) for k, v in (metadata or {}).items()}),
    )
    write_text_atomic(
        output / INDEX_NAME, "".join(json.dumps({"path": str(p), "row": row}) + "\n" for row, p in enumerate(paths))
    )


def read_codes(folder: str | os.PathLike) -> tuple[torch.Tensor, list[dict]]:
    """(codes (N, patches) LongTensor, index rows ``{"path", "row"}``) from a folder written by ``write_codes``."""
    folder = Path(folder)
    for name in (CODES_NAME, INDEX_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; write it with tokenizers/encode_images.py.")
    codes = load_file(str(folder / CODES_NAME))["codes"].long()
    index = [json.loads(line) for line in (folder / INDEX_NAME).read_text().splitlines() if line.strip()]
    if len(index) != codes.shape[0]:
        raise ValueError(
            f"{folder}: {INDEX_NAME} has {len(index)} lines but {CODES_NAME} has {codes.shape[0]} rows; "
            "the two were not written together. Encode the folder again."
        )
    return codes, index


def read_codes_info(folder: str | os.PathLike) -> dict:
    """What ``codes.safetensors`` in ``folder`` says about itself, without reading the codes: ``rows``,
    ``patches``, ``grid`` (h, w), ``codebook_size`` (None if not recorded) and the raw string ``metadata``.

    ``tokenizers/encode_images.py`` records the grid ("HxW") and codebook size; a file written without
    them gets a square grid from its patch count, or a ValueError if the count is not a square.
    """
    from safetensors import safe_open

    path = Path(folder) / CODES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CODES_NAME}; write it with tokenizers/encode_images.py.")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        rows, patches = handle.get_slice("codes").get_shape()
    if "grid" in metadata:
        height, width = (int(n) for n in metadata["grid"].lower().split("x"))
    else:
        side = round(patches**0.5)
        if side * side != patches:
            raise ValueError(
                f"{path} records no grid and its {patches} codes per image are not a square; encode the images "
                "again with tokenizers/encode_images.py, which records it."
            )
        height = width = side
    if height * width != patches:
        raise ValueError(
            f"{path} says its grid is {height}x{width} but holds {patches} codes per image; encode the images again."
        )
    codebook = metadata.get("codebook_size")
    return {
        "rows": rows,
        "patches": patches,
        "grid": (height, width),
        "codebook_size": int(codebook) if codebook else None,
        "metadata": metadata,
    }
