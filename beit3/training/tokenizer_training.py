"""Training a visual tokenizer (VQ-KD or dVAE) with the same engine as pretraining."""

from __future__ import annotations

from typing import Callable

import torch

from ..visual_tokenizers import DVAE, VQKD, DVAEConfig, VQKDConfig, VisualTokenizer

KINDS = {"vqkd": (VQKD, VQKDConfig), "dvae": (DVAE, DVAEConfig)}


def build_visual_tokenizer(kind: str, preset: str, overrides: dict | None = None, teacher_checkpoint: str | None = None) -> VisualTokenizer:
    """A fresh tokenizer of ``kind`` from a preset (``vqkd_tiny``, ``dvae_base``, ...) and field overrides."""
    if kind not in KINDS:
        raise ValueError(f"Unknown visual tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}.")
    model_class, config_class = KINDS[kind]
    fields = dict(overrides or {})
    if teacher_checkpoint:
        fields["teacher_checkpoint"] = teacher_checkpoint
    return model_class(config_class.from_preset(preset, **fields))


def visual_tokenizer_step() -> Callable:
    """A ``step_fn`` for ``Engine.fit`` over image-only ``PretrainingBatches`` (the [0, 1] tokenizer view)."""

    def step(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = module(batch["image"]["tokenizer_pixel_values"])
        values = {"codebook_usage": out.codebook_usage, "perplexity": out.perplexity, "reconstruction_loss": out.reconstruction_loss}
        return out.loss, {k: v.detach().float() for k, v in values.items() if v is not None}

    return step
