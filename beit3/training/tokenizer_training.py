"""Training a visual tokenizer (VQ-KD of BEiT v2, or a BEiT v1 style dVAE) on a folder of images, with the same
engine and run shape as pretraining (``beit3.training.runner``): the runner behind ``tokenizers/train_visual_tokenizer.py``.

    python tokenizers/train_visual_tokenizer.py --kind vqkd --config configs/tokenizers/vqkd_tiny.yaml [--set train.max_steps=500]
    deepspeed --num_gpus 8 tokenizers/train_visual_tokenizer.py --kind vqkd --config configs/tokenizers/vqkd_base.yaml

Progress bar, metrics.jsonl (loss, codebook usage, perplexity), checkpoints and resume come from the
shared engine; the trained tokenizer is written to output_dir/tokenizer (VisualTokenizer.from_pretrained).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..data.common import load_rgb
from ..data.images import tokenizer_transform
from ..data.pretraining import BatchOptions, PretrainingBatches, finish_batch
from ..data.sources import load_sources
from ..log import get_logger
from ..sections import Section, doc
from ..visual_tokenizers import DVAE, VQKD, DVAEConfig, VisualTokenizer, VQKDConfig
from .distributed import end_distributed
from .run_log import read_run_log
from .runner import command_line, fail, read_run_config, start_engine, step_loader

logger = get_logger(__name__)

TOKENIZER_CLASSES = {"vqkd": (VQKD, VQKDConfig), "dvae": (DVAE, DVAEConfig)}


@dataclass
class TokenizerModel(Section):
    """The top level of a visual tokenizer config: what to build."""

    section: ClassVar[str] = ""
    preset: str = doc(
        "the tokenizer's layout: vqkd_tiny, vqkd_encoder_base_decoder_{1,3}x768x12_clip, "
        "vqkd_encoder_base_decoder_1x768x12_dino (--kind vqkd); dvae_tiny, dvae_base (--kind dvae)"
    )
    overrides: dict | None = doc("config fields over the preset's, e.g. {image_size: 48}", None)
    teacher_checkpoint: str | None = doc(
        "VQ-KD: a local weights file of the frozen timm teacher (CLIP ViT-B/16 as in BEiT v2, or DINO)", None
    )


@dataclass
class TokenizerData(Section):
    """The ``data`` section of a visual tokenizer config."""

    section: ClassVar[str] = "data"
    images: str = doc("a folder of images (searched recursively)")
    batch_size: int = doc("images per process and step")
    crop_scale: tuple[float, float] = doc("area range of the random resized crop", (0.08, 1.0))


# The sections of a visual tokenizer config (the docs' configuration reference reads them too).
SECTIONS = {"top": TokenizerModel, "data": TokenizerData}


def build_visual_tokenizer(
    kind: str, preset: str, overrides: dict | None = None, teacher_checkpoint: str | None = None
) -> VisualTokenizer:
    """A fresh tokenizer of ``kind`` from a preset (``vqkd_tiny``, ``dvae_base``, ...) and field overrides."""
    if kind not in TOKENIZER_CLASSES:
        raise ValueError(f"Unknown visual tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZER_CLASSES)}.")
    model_class, config_class = TOKENIZER_CLASSES[kind]
    fields = dict(overrides or {})
    if teacher_checkpoint:
        fields["teacher_checkpoint"] = teacher_checkpoint
    return model_class(config_class.from_preset(preset, **fields))


def visual_tokenizer_step() -> Callable:
    """A ``step_fn`` for ``Engine.fit`` over image-only ``PretrainingBatches`` (the [0, 1] tokenizer view)."""

    def step_fn(module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = module(finish_batch(batch)["image"]["tokenizer_pixel_values"])  # uint8 views -> [0, 1], on the device
        values = {
            "codebook_usage": out.codebook_usage,
            "perplexity": out.perplexity,
            "reconstruction_loss": out.reconstruction_loss,
        }
        return out.loss, {k: v.detach().float() for k, v in values.items() if v is not None}

    return step_fn


def run(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The command line of ``tokenizers/train_visual_tokenizer.py`` (or ``prog``; see the module docstring)."""
    args = command_line(
        __doc__,
        argv,
        prog=prog,
        add_arguments=lambda parser: parser.add_argument("--kind", choices=tuple(TOKENIZER_CLASSES), required=True),
    )
    config, settings, sections = read_run_config(args.config, args.set, typed=SECTIONS, show=args.print_config)
    data, spec = sections["data"], sections["top"]
    try:
        sources = load_sources(images=data.images)
    except (OSError, ValueError) as error:
        fail(error)
    torch.manual_seed(settings.seed)
    model = build_visual_tokenizer(args.kind, spec.preset, spec.overrides, spec.teacher_checkpoint)
    options = BatchOptions(
        batch_sizes={"image": data.batch_size},
        image_size=model.image_size,
        patch_size=model.patch_size,
        crop_scale=data.crop_scale,
        tokenizer_views_only=True,
    )
    engine = start_engine(model, config, settings)

    def make_loader(start_step: int, num_steps: int):
        batches = PretrainingBatches(
            sources,
            None,
            options,
            seed=settings.seed,
            rank=engine.rank,
            world_size=engine.world_size,
            start_step=start_step,
            num_steps=num_steps,
        )
        return step_loader(settings, batches, batch_size=None)

    records = engine.fit(visual_tokenizer_step(), make_loader, samples_per_step=data.batch_size)
    end_distributed()
    if engine.rank != 0:
        return
    tokenizer = engine.module.module
    tokenizer.save_pretrained(engine.output_dir / "tokenizer")
    save_pictures(tokenizer, engine.output_dir, pictured_images(sources, model))
    if not records:
        logger.warning(f"nothing to do: {engine.output_dir} already holds a run of {settings.max_steps} steps")
        return
    last = records[-1]
    logger.info(
        f"visual tokenizer done: step {last['step']}, loss {last['loss']:.4f}, codebook usage {last['codebook_usage']:.3f}, "
        f"perplexity {last['perplexity']:.1f}; saved to {engine.output_dir / 'tokenizer'}"
    )


def pictured_images(sources, model) -> torch.Tensor:
    """Eight center views (the tokenizer's [0, 1] input) of the first training images."""
    transform = tokenizer_transform(model.image_size)
    return torch.stack([transform(load_rgb(path)) for path in sources["image"]["path"][:8]])


def save_pictures(tokenizer, output_dir: Path, images: torch.Tensor) -> None:
    """code_maps.png, codebook_usage.png and, for a dVAE, reconstructions.png in output_dir."""
    from ..visualization import save_code_maps, save_codebook_usage, save_reconstructions  # (matplotlib: only here)

    tokenizer.eval()
    images = images.to(next(tokenizer.parameters()).device)
    with torch.no_grad():
        codes = tokenizer.get_codebook_indices(images)
        grid = images.shape[-1] // tokenizer.patch_size
        save_code_maps(images.cpu(), codes.cpu(), grid, output_dir / "code_maps.png", tokenizer.codebook_size)
        if tokenizer.kind == "dvae":
            save_reconstructions(images.cpu(), tokenizer.decode(codes).cpu(), output_dir / "reconstructions.png")
    records = read_run_log(output_dir / "metrics.jsonl")
    save_codebook_usage(
        [r["step"] for r in records],
        [r["codebook_usage"] for r in records],
        output_dir / "codebook_usage.png",
        [r["perplexity"] for r in records],
    )
