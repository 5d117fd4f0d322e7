"""Pretraining BEiT-3: masked data modeling on images, texts and image-text pairs (the runner behind
``tasks/pretrain.py``), and its step: one forward per kind of input, one backward for their sum.

    python tasks/pretrain.py --config configs/pretrain/tiny.yaml [--set train.max_steps=100 ...]
    deepspeed --num_gpus 2 tasks/pretrain.py --config configs/pretrain/tiny.yaml      # 2 processes (CPU or GPU)

The YAML describes the whole run; --set overrides any field. A restart with the same output_dir
resumes from its newest complete checkpoint.

With data.sources.image_codes (the folder tokenizers/encode_images.py wrote for data.sources.images),
the image targets are those precomputed codes and visual_tokenizer may be null:

    python tokenizers/encode_images.py --tokenizer runs/tiny/visual-tokenizer --images runs/tiny/data/images --output runs/tiny/data/image-codes
    python tasks/pretrain.py --config configs/pretrain/tiny.yaml --set data.sources.image_codes=runs/tiny/data/image-codes --set visual_tokenizer=null
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..configuration_beit3 import Beit3Config
from ..data.images import read_codes_info
from ..data.pretraining import (
    BatchOptions,
    PretrainingBatches,
    SampleOptions,
    StreamingPretrainingBatches,
    finish_batch,
)
from ..data.sources import Shards, load_sources
from ..log import get_logger
from ..modeling_heads import Beit3ForMaskedDataModeling
from ..sections import Section, doc
from ..tokenization_beit3 import check_tokenizer_matches, load_tokenizer
from ..visual_tokenizers import VisualTokenizer
from .distributed import end_distributed
from .run_log import read_run_log
from .runner import autocast, command_line, fail, read_run_config, save_model_folder, start_engine, step_loader

logger = get_logger(__name__)


@dataclass
class PretrainingData(SampleOptions):
    """The ``data`` section of a pretraining config: where the samples come from and how many of each kind a step
    takes; how they are drawn, masked and matched are the ``SampleOptions`` the batches read, declared there."""

    sources: dict = doc(
        "images (a folder or shards), texts ([.txt, .jsonl]), pairs ([.jsonl or shards]), image_codes; or "
        "{dataset: a save_to_disk folder, ...} per kind (docs/pretraining.md)"
    )
    batch_size: dict = doc("samples of each kind per process and step: {image: N, text: N, pair: N}")
    streaming: bool = doc("read shards and text files as streams, shard by shard, never copied", False)

    def batch_options(self, model_config: Beit3Config, tokenizer_image_size: int | None) -> BatchOptions:
        """The options of this run's batches, for a model of ``model_config``."""
        return BatchOptions(
            self.batch_size,
            model_config.image_size,
            model_config.patch_size,
            tokenizer_image_size=tokenizer_image_size,
            **self.sampling(),
        )


@dataclass
class PretrainingTokenizers(Section):
    """The top level of a pretraining config: its tokenizers."""

    section: ClassVar[str] = ""
    text_tokenizer: str = doc("a tokenizer folder (tokenizers/train_text_tokenizer.py) or a SentencePiece .spm")
    visual_tokenizer: str | None = doc(
        "a visual tokenizer folder (tokenizers/train_visual_tokenizer.py) or a released VQ-KD / dVAE file; "
        "null when data.sources.image_codes gives the image targets",
        None,
    )


@dataclass
class PretrainingModel(Section):
    section: ClassVar[str] = "model"
    preset: str = doc("the architecture (beit3.list_presets()), e.g. beit3_base_paper_patch16_224: the paper's layout")
    overrides: dict | None = doc(
        "Beit3Config fields over the preset's, e.g. {image_size: 64, itm_weight: 1.0}",
        None,
        keys=Beit3Config.field_names(),
    )


# The sections of a pretraining config (the docs' configuration reference reads them too).
SECTIONS = {"top": PretrainingTokenizers, "model": PretrainingModel, "data": PretrainingData}


def masked_data_modeling_step(visual_tokenizer=None, precision: str = "fp32") -> Callable:
    """A ``step_fn`` for ``Engine.fit`` over ``PretrainingBatches``. Visual targets are the batch's
    ``image_labels`` when it has them (codes precomputed by ``tokenizers/encode_images.py``), else they come
    from ``visual_tokenizer`` on the fly (no grad) from each image's tokenizer view; it may be None when
    every batch brings its labels.

    The tokenizer runs under the training's autocast (``precision`` bf16/fp16), as BEiT v2's pretraining runs its
    VQ-KD under fp16 autocast: in fp32 a base VQ-KD costs about a tenth of the step's FLOPs at several times their
    time, and bf16 changes few codes (docs/results/findings.md, "The visual tokenizer under bf16").

    Returns (loss, values) with the loss and masked-token accuracy of each kind (image, text, pair), and the
    image-text matching loss and accuracy when the batch has an ``itm`` part (``itm_negatives``).
    """

    def step_fn(module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        finish_batch(batch)  # the uint8 views, converted on the step's device
        losses, values = [], {}
        if "image" in batch:
            image = batch["image"]
            if "image_labels" in image:
                codes = image["image_labels"]
            elif visual_tokenizer is None:
                raise ValueError(
                    "The image batch has no image_labels (precomputed codes) and there is no visual tokenizer to "
                    "compute them; give one, or batches from load_sources(image_codes=...)."
                )
            else:
                views = image["tokenizer_pixel_values"]
                with torch.no_grad(), autocast(precision, views.device):
                    codes = visual_tokenizer.get_codebook_indices(views)
            out = module(
                pixel_values=image["pixel_values"],
                bool_masked_pos=image["bool_masked_pos"],
                image_labels=codes,
                num_masked_patches=image.get("num_masked_patches"),
            )
            losses.append(out.loss)
            values.update(image_loss=out.image_loss, image_accuracy=out.image_accuracy)
        for kind in ("text", "pair"):
            if kind in batch:
                out = module(**batch[kind])
                losses.append(out.loss)
                values.update({f"{kind}_loss": out.text_loss, f"{kind}_accuracy": out.text_accuracy})
        if "itm" in batch:
            out = module(**batch["itm"])
            losses.append(out.loss)
            values.update(itm_loss=out.itm_loss, itm_accuracy=out.itm_accuracy)
        return sum(losses), values

    return step_fn


@dataclass
class VisualTargets:
    """What masked image modeling predicts: the codes of ``tokenizer`` run on the fly (None when precomputed codes
    are read), ``codebook_size`` of them, one per cell of a ``grid``; ``described`` names the source in errors and
    ``remedy`` says what to do when the grid does not fit the model."""

    tokenizer: VisualTokenizer | None
    codebook_size: int
    grid: tuple[int, int]
    described: str
    remedy: str


def visual_targets(data: PretrainingData, tokenizers: PretrainingTokenizers) -> VisualTargets:
    """Precomputed codes (data.sources.image_codes) when given, else the visual tokenizer, checked before any step."""
    codes_dir = data.sources.get("image_codes")
    if codes_dir and tokenizers.visual_tokenizer and os.environ.get("RANK", "0") == "0":
        logger.warning(
            f"data.sources.image_codes is set, so the image targets are the codes in {codes_dir}; "
            f"the visual_tokenizer {tokenizers.visual_tokenizer} is not used."
        )
    if not codes_dir and not tokenizers.visual_tokenizer:
        fail(
            "no visual targets: visual_tokenizer is not set and neither is data.sources.image_codes. Give a visual "
            "tokenizer, or encode the images once with tokenizers/encode_images.py and set data.sources.image_codes."
        )
    if codes_dir:
        try:
            info = read_codes_info(codes_dir)
        except (OSError, ValueError) as error:
            fail(f"data.sources.image_codes: {error}")
        if info["codebook_size"] is None:
            fail(
                f"{codes_dir}/codes.safetensors does not record its codebook_size, so the model's visual head cannot "
                "be sized; write the codes with tokenizers/encode_images.py, which records it."
            )
        remedy = (
            "Encode the images again (tokenizers/encode_images.py) with a tokenizer and --image-size that give one code per "
            "model patch, or change model.overrides (image_size, patch_size) to fit the codes."
        )
        return VisualTargets(None, info["codebook_size"], tuple(info["grid"]), f"image_codes {codes_dir}", remedy)
    path = Path(tokenizers.visual_tokenizer)
    require_path("visual_tokenizer", path)
    tokenizer = VisualTokenizer.from_pretrained(path).eval()
    grid = (tokenizer.image_size // tokenizer.patch_size,) * 2
    remedy = "Use a visual tokenizer whose grid fits, or change model.overrides (image_size, patch_size)."
    return VisualTargets(tokenizer, tokenizer.codebook_size, grid, f"visual_tokenizer {path}", remedy)


def require_path(what: str, path: Path) -> None:
    if not path.exists():
        fail(
            f"{what} {path} does not exist. Train one (tokenizers/train_text_tokenizer.py, "
            "tokenizers/train_visual_tokenizer.py) or point the config at yours."
        )


def pretraining_model_config(model: PretrainingModel, data: PretrainingData, tokenizer, targets: VisualTargets):
    """The model's config: the preset and its overrides, its heads sized to the text tokenizer and the visual
    targets, checked against both and against the matching settings."""
    overrides = model.overrides or {}
    config = Beit3Config.from_preset(model.preset, **overrides)
    if config.visual_vocab_size != targets.codebook_size:
        if "visual_vocab_size" in overrides:
            fail(
                f"the model predicts {config.visual_vocab_size} visual tokens but the codebook of {targets.described} "
                f"has {targets.codebook_size} codes. Drop visual_vocab_size from model.overrides (it is then set from "
                "the codebook) or set it to the codebook size."
            )
        config.visual_vocab_size = targets.codebook_size
    if "vocab_size" not in overrides:  # a vocabulary of our own: size the text head to it
        config.vocab_size = len(tokenizer)
    config.mask_token_id = tokenizer.mask_token_id
    check_tokenizer_matches(tokenizer, config)
    if bool(data.itm_negatives) != bool(config.itm_weight):
        fail(
            f"image-text matching needs both data.itm_negatives (a fraction of the pair batch, now {data.itm_negatives}) "
            f"and model.overrides.itm_weight (the loss weight, now {config.itm_weight}) above 0, or both 0 (the "
            "paper's pure masked data modeling)."
        )
    patch_grid = (config.image_size // config.patch_size,) * 2
    if tuple(targets.grid) != patch_grid:
        fail(
            f"{targets.described}: {targets.grid[0]}x{targets.grid[1]} codes per image, but the model has a "
            f"{patch_grid[0]}x{patch_grid[1]} patch grid; masked image modeling needs one code per patch. {targets.remedy}"
        )
    return config


def run(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The command line of ``tasks/pretrain.py`` (or ``prog``; see the module docstring)."""
    args = command_line(__doc__, argv, prog=prog)
    config, settings, sections = read_run_config(args.config, args.set, typed=SECTIONS, show=args.print_config)
    data, tokenizers = sections["data"], sections["top"]
    # Everything that can be wrong with the inputs is checked before the first step.
    targets = visual_targets(data, tokenizers)
    require_path("text_tokenizer", Path(tokenizers.text_tokenizer))
    try:
        tokenizer = load_tokenizer(tokenizers.text_tokenizer)
    except (OSError, ValueError) as error:
        fail(f"text_tokenizer: {error}")
    model_config = pretraining_model_config(sections["model"], data, tokenizer, targets)
    try:
        options = data.batch_options(model_config, targets.tokenizer.image_size if targets.tokenizer else None)
        sources = load_sources(**data.sources, streaming=data.streaming)
    except (OSError, ValueError) as error:
        fail(error)

    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    engine = start_engine(Beit3ForMaskedDataModeling(model_config), config, settings)
    if targets.tokenizer is not None:
        targets.tokenizer.to(engine.device)
    save_model_folder(engine, model_config, tokenizer)
    records = engine.fit(
        masked_data_modeling_step(targets.tokenizer, settings.precision),
        loader_maker(engine, settings, sources, tokenizer, options),
        samples_per_step=sum(data.batch_size.values()),
    )
    end_distributed()
    if engine.rank == 0 and records:
        report(engine, records, bool(data.itm_negatives))


def loader_maker(engine, settings, sources: dict, tokenizer, options: BatchOptions) -> Callable:
    """``Engine.fit``'s ``make_loader(start_step, num_steps)``: streamed kinds resume from the positions the
    checkpoint saved (``engine.data_state``); the rest is step-indexed."""
    streamed = any(isinstance(source, Shards) for source in sources.values())

    def make_loader(start_step: int, num_steps: int):
        kind, stream_options = (
            (StreamingPretrainingBatches, {"num_workers": settings.num_workers, "positions": engine.data_state})
            if streamed
            else (PretrainingBatches, {})
        )
        try:
            batches = kind(
                sources,
                tokenizer,
                options,
                seed=settings.seed,
                rank=engine.rank,
                world_size=engine.world_size,
                start_step=start_step,
                num_steps=num_steps,
                **stream_options,
            )
        except ValueError as error:  # e.g. stream positions saved with another number of loader workers
            fail(error)
        return step_loader(settings, batches, batch_size=None)

    return make_loader


def report(engine, records: list[dict], matching: bool) -> None:
    """``loss_curves.png`` (when matplotlib is there) and the closing line: the last step's losses and accuracies."""
    try:
        from beit3.visualization import save_loss_curves
    except ImportError:
        pass
    else:
        kinds = ["image", "text", "pair"] + (["itm"] if matching else [])
        save_loss_curves(
            read_run_log(engine.output_dir / "metrics.jsonl"),
            engine.output_dir / "loss_curves.png",
            title=f"pretraining: {engine.output_dir.name}",
            panels={
                "loss": ["loss"] + [f"{kind}_loss" for kind in kinds],
                "accuracy": [f"{kind}_accuracy" for kind in kinds],
                "learning rate": ["lr"],
            },
        )
    last = records[-1]
    accuracies = ("image_accuracy", "text_accuracy", "pair_accuracy", "itm_accuracy")
    logger.info(
        "pretraining done: step {step}, loss {loss:.3f}, ".format(**last)
        + ", ".join(f"{k} {last[k]:.3f}" for k in accuracies if k in last)
        + f", {last['samples_per_s']:.1f} samples/s; checkpoints in {engine.checkpoint_dir}"
    )
