"""The interface every visual tokenizer keeps: images in, one code id per patch out.

A tokenizer folder written by ``save_pretrained`` holds ``config.json`` (``{"kind": ..., <sizes>}``)
and ``model.safetensors``. ``VisualTokenizer.from_pretrained`` reads such a folder, whatever its
kind, or a released checkpoint file of a kind that knows one (VQ-KD: BEiT v2's ``.pth`` files).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints import load_state_dict_checked
from ..io import atomic_folder
from ..modeling_beit3 import values_checkable

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin")


class TokenizerConfig:
    """Mixin for the dataclass configs: a JSON-able dict with the kind, and back with a check of the keys."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, fields: dict[str, Any], **overrides):
        fields = {**fields, **overrides}
        kind = fields.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"This config describes a {kind!r} tokenizer, not {cls.kind!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}.")
        return cls(**fields)

    def replace(self, **overrides):
        return self.from_dict(self.to_dict(), **overrides)


class VisualTokenizer(nn.Module):
    """Maps images to a grid of discrete codes: ``get_codebook_indices(pixel_values) -> (B, patches)``.

    Subclasses set ``kind`` and ``config_class`` and implement ``get_codebook_indices``,
    ``codebook_size``, ``patch_size`` (pixels per code along a side) and, where the kind allows,
    ``decode``. Each one documents the pixel range it takes; both built-in kinds take RGB in [0, 1]
    and apply their own mapping inside.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type] = TokenizerConfig
    _kinds: ClassVar[dict[str, type[VisualTokenizer]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            VisualTokenizer._kinds[cls.kind] = cls

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config

    # -- what every kind provides ---------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        """The side the tokenizer was built (and trained) for; other multiples of ``patch_size`` run too."""
        return self.config.image_size

    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        raise NotImplementedError

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"A {self.kind} tokenizer cannot decode code ids.")

    def check_pixels(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """Checks a (B, 3, H, W) batch in [0, 1] and returns its code grid (H / patch, W / patch)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__} takes RGB images of shape (B, 3, H, W); got {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        patch = self.patch_size
        if height < patch or width < patch:
            raise ValueError(
                f"The image ({height}x{width} px) is smaller than one {patch}x{patch} patch of this {self.kind} tokenizer; "
                f"resize it to at least {patch} px per side ({self.image_size} px is what the tokenizer was built for)."
            )
        if height % patch or width % patch:
            raise ValueError(
                f"The image side ({height}x{width} px) is not a multiple of the patch size {patch}; resize or crop it "
                f"(e.g. to {self.image_size}x{self.image_size})."
            )
        # A value check where reading values is free (on a GPU it would stall every pretraining step)
        if pixel_values.numel() and values_checkable(pixel_values):
            low, high = torch.aminmax(pixel_values.detach())
            # Bicubic resizing of a tensor may overshoot a little; a normalized or 0-255 image is far outside.
            if low < -0.1 or high > 1.1:
                raise ValueError(
                    f"{type(self).__name__} takes RGB in [0, 1], but the values range over [{low.item():.3g}, {high.item():.3g}]. "
                    "Pass un-normalized pixels (ToTensor without Normalize, e.g. the tokenizer view of "
                    "beit3.views.TwoViewTransform)."
                )
        return height // patch, width // patch

    # -- saving and loading ---------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` into a temporary sibling folder, then moves it into place."""
        with atomic_folder(save_directory) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "kind": self.kind})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> VisualTokenizer:
        """Loads a folder written by ``save_pretrained`` or a released checkpoint file; returns it in eval mode.

        ``overrides`` replace config fields, e.g. a teacher to continue training a VQ-KD:
        ``from_pretrained(path, teacher="timm", teacher_checkpoint="clip_b16.safetensors")``.
        """
        path = Path(path)
        if path.is_dir():
            config_file = path / CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(
                    f"{path} has no {CONFIG_NAME}; a tokenizer folder is written by save_pretrained."
                )
            fields = json.loads(config_file.read_text())
            kind = fields.get("kind")
            target = cls._resolve_kind(kind, f"the folder {path}")
            config = target._loading_config(target.config_class.from_dict(fields, **overrides), overrides)
            model = target(config)
            load_state_dict_checked(model, load_file(str(path / WEIGHTS_NAME)), f"tokenizer folder {path}")
            return model.eval()
        if path.is_file() and path.suffix in _CHECKPOINT_SUFFIXES:
            # Only VQ-KD has a released file format that can be read safely (BEiT v1's DALL-E dVAE ships pickled modules).
            target = cls._resolve_kind("vqkd", f"the checkpoint {path}")
            return target.from_released(path, **overrides).eval()
        if path.exists():
            raise ValueError(
                f"{path} is neither a tokenizer folder nor a checkpoint file ({', '.join(_CHECKPOINT_SUFFIXES)})."
            )
        raise FileNotFoundError(f"No tokenizer folder or checkpoint at {path}.")

    @classmethod
    def _loading_config(cls, config: TokenizerConfig, overrides: dict[str, Any]) -> TokenizerConfig:
        """The config ``from_pretrained`` builds the model with; a kind may relax what only training needs."""
        return config

    @classmethod
    def _resolve_kind(cls, kind: str | None, what: str) -> type[VisualTokenizer]:
        if kind not in VisualTokenizer._kinds:
            raise ValueError(
                f"{what} holds a tokenizer of unknown kind {kind!r}; known kinds: {sorted(VisualTokenizer._kinds)}."
            )
        target = VisualTokenizer._kinds[kind]
        if not issubclass(target, cls):
            raise ValueError(
                f"{what} holds a {kind} tokenizer, not a {cls.kind or cls.__name__}; load it with "
                f"VisualTokenizer.from_pretrained or {target.__name__}.from_pretrained."
            )
        return target


def usage_figures(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used, perplexity = exp(entropy) of the code histogram) for a (K,) count vector."""
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return (counts > 0).float().mean(), entropy.exp()
