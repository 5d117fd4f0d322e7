"""VQ-KD, the visual tokenizer of BEiT v2: a ViT encoder, a small normalized codebook, a ViT decoder
that regresses a frozen teacher's patch features.

    image [0,1] -> x2-1 -> encoder ViT -> patch tokens -> Linear-Tanh-Linear -> l2-normalize (B, N, 32)
      -> nearest code by cosine (codebook 8192 x 32, unit vectors, EMA-updated) -> code ids (B, N)
      -> decoder ViT over the code grid (patch 1) -> Linear-Tanh-Linear -> (B, N, teacher_dim)
      -> loss = 1 - cos(reconstruction, teacher features) + commitment

Released checkpoints (``vqkd_encoder_base_decoder_{1,3}x768x12_{clip,dino}-*.pth``) load through
``VQKD.from_released`` / ``VisualTokenizer.from_pretrained``; their encoder is unilm's ViT, whose
separate ``q_bias``/``v_bias`` become timm's fused qkv bias with a zero key bias.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers.utils import ModelOutput

from ..checkpoints import load_state_dict_checked, read_checkpoint
from .base import TokenizerConfig, VisualTokenizer, usage_figures
from .codebook import NormEMACodebook, outside_autocast
from .teachers import build_teacher


@dataclass
class VQKDConfig(TokenizerConfig):
    """Sizes and training settings of a VQ-KD tokenizer. The defaults are BEiT v2's recommended
    base tokenizer (``vqkd_encoder_base_decoder_3x768x12_clip``); see ``from_preset`` for the others.

    Args:
        image_size, patch_size: the encoder's native image and patch side (other multiples of the
            patch run too, with resampled position embeddings).
        encoder_*, decoder_*: ViT width, depth and heads; the decoder reads the code grid with patch 1.
        codebook_size, code_dim: K codes of dimension D (8192 x 32).
        ema_decay: codebook EMA decay (0.99).
        kmeans_iters: cosine k-means iterations on the first training batch (0: keep the random codebook).
        commitment_weight: beta of the commitment term (1.0, as the released code).
        dead_code_steps: a code unused for this many training steps is re-seeded from the current
            batch's encoder outputs (0 turns it off; BEiT v2 had no restart).
        collapse_threshold: warn when a training batch uses fewer than this fraction of the codes it
            could reach (min(K, vectors in the batch)).
        teacher: "timm" (a frozen timm model), "hog" or "pixels" (offline targets), "none" (no
            training; tokenization only).
        teacher_model, teacher_checkpoint, teacher_kwargs: the timm model name, a LOCAL weights
            file for it, and extra ``timm.create_model`` arguments.
        teacher_head: apply the timm model's head to each patch token (CLIP's projection to 512).
        teacher_dim: width of the decoder's output, which must equal the teacher's feature width.
        hog_cell, hog_bins: HOG cell side in pixels and orientation bins.
    """

    kind = "vqkd"

    image_size: int = 224
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_dim: int = 768
    decoder_depth: int = 3
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    codebook_size: int = 8192
    code_dim: int = 32
    ema_decay: float = 0.99
    kmeans_iters: int = 10
    commitment_weight: float = 1.0
    dead_code_steps: int = 500
    collapse_threshold: float = 0.01
    teacher: str = "timm"
    teacher_model: str = "vit_base_patch16_clip_224.openai"
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_head: bool = True
    teacher_dim: int = 512
    hog_cell: int = 8
    hog_bins: int = 9

    def __post_init__(self):
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for part in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{part}_dim"), getattr(self, f"{part}_heads")
            if dim % heads:
                problems.append(f"{part}_dim {dim} is not a multiple of {part}_heads {heads}")
        if not 0 < self.ema_decay < 1:
            problems.append(f"ema_decay {self.ema_decay} must lie in (0, 1)")
        if problems:
            raise ValueError("Invalid VQKDConfig: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VQKDConfig:
        """``vqkd_tiny`` (a test-sized model with a HOG teacher) or a released layout:
        ``vqkd_encoder_base_decoder_{1,3}x768x12_clip`` (CLIP ViT-B/16 teacher, 512-d targets) and
        ``vqkd_encoder_base_decoder_1x768x12_dino`` (DINO ViT-B/16, 768-d)."""
        if name == "vqkd_tiny":
            fields = dict(
                image_size=32,
                patch_size=8,
                encoder_dim=64,
                encoder_depth=2,
                encoder_heads=2,
                decoder_dim=64,
                decoder_depth=1,
                decoder_heads=2,
                codebook_size=64,
                code_dim=8,
                teacher="hog",
                hog_cell=4,
                dead_code_steps=50,
            )
            fields = {**fields, **overrides}
            # The HOG target's width follows the patch: another patch_size brings its own unless one is given.
            fields.setdefault(
                "teacher_dim", hog_dim(fields["patch_size"], fields["hog_cell"], fields.get("hog_bins", cls.hog_bins))
            )
            return cls(**fields)
        match = re.fullmatch(r"vqkd_encoder_base_decoder_(\d)x768x12_(clip|dino)", name)
        if not match:
            raise ValueError(f"Unknown VQ-KD preset {name!r}; known: {', '.join(VQKD_PRESETS)}.")
        fields = dict(decoder_depth=int(match[1]))
        if match[2] == "dino":
            fields.update(teacher_model="vit_base_patch16_224.dino", teacher_head=False, teacher_dim=768)
        return cls(**{**fields, **overrides})


def hog_dim(patch: int, cell: int, bins: int) -> int:
    """Width of the HOG target: 3 channels x bins x cells per patch."""
    return 3 * bins * (patch // cell) ** 2


VQKD_PRESETS = (
    "vqkd_tiny",
    "vqkd_encoder_base_decoder_1x768x12_clip",
    "vqkd_encoder_base_decoder_3x768x12_clip",
    "vqkd_encoder_base_decoder_1x768x12_dino",
)


@dataclass
class VQKDOutput(ModelOutput):
    """
    Args:
        loss: reconstruction loss + commitment loss (scalar).
        reconstruction_loss: mean over patches of 1 - cos(decoder output, teacher feature).
        commitment_loss: beta * MSE(z, stopgrad(code)), z the l2-normalized encoder output.
        codebook_usage: fraction of the K codes used by this batch (all ranks together in training).
        perplexity: exp(entropy) of the batch's code histogram; K for a perfectly even use.
        indices: (B, patches) code ids.
        reconstruction: (B, patches, teacher_dim) decoder output.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    reconstruction: torch.FloatTensor | None = None


def _vit(
    image_size: int, patch_size: int, in_chans: int, dim: int, depth: int, heads: int, mlp_ratio: float
) -> VisionTransformer:
    """The unilm ViT of BEiT v2 as a timm model: CLS + absolute positions, qkv bias, LayerNorm eps 1e-6, no
    layer scale, no pooling. BEiT v2's ``fc_norm`` (its use_mean_pooling norm, applied per patch
    token) is timm's final ``norm``."""
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0,
        global_pool="",
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        dynamic_img_size=True,
    )


def _task_layer(dim: int, out: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out))
    for linear in (layer[0], layer[2]):
        trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
    return layer


class VQKD(VisualTokenizer):
    """BEiT v2's vector-quantized knowledge-distillation tokenizer.

    Input (``get_codebook_indices`` and ``forward``): RGB ``pixel_values`` (B, 3, H, W) in [0, 1],
    no mean/std normalization (ToTensor only; 224 x 224 for the released tokenizers); rescaled to
    [-1, 1] inside, as BEiT v2 does. H and W must be multiples of ``patch_size`` (16).

    ``teacher`` (optional) replaces the one the config names: any module mapping [0, 1] RGB to
    (B, patches, teacher_dim). The teacher is held but not owned: it follows ``.to()`` but stays
    out of ``state_dict``, ``parameters()`` and ``train()``, so checkpoints and optimizers never
    see it.

    A training loop: ``out = model(pixel_values); out.loss.backward(); optimizer.step()``; log
    ``out.codebook_usage`` and ``out.perplexity``. The codebook learns by EMA, not by the optimizer.
    """

    kind = "vqkd"
    config_class = VQKDConfig

    def __init__(self, config: VQKDConfig, teacher: nn.Module | None = None):
        super().__init__(config)
        c = config
        # The teacher first: a bad one fails before the networks are allocated.
        teacher = teacher if teacher is not None else build_teacher(config)
        self.encoder = _vit(c.image_size, c.patch_size, 3, c.encoder_dim, c.encoder_depth, c.encoder_heads, c.mlp_ratio)
        self.encode_task_layer = _task_layer(c.encoder_dim, c.code_dim)
        self.quantize = NormEMACodebook(
            c.codebook_size, c.code_dim, c.ema_decay, c.kmeans_iters, c.dead_code_steps, c.commitment_weight
        )
        grid = c.image_size // c.patch_size
        self.decoder = _vit(grid, 1, c.code_dim, c.decoder_dim, c.decoder_depth, c.decoder_heads, c.mlp_ratio)
        self.decode_task_layer = _task_layer(c.decoder_dim, c.teacher_dim)
        if teacher is not None:
            self._check_teacher(teacher)
        # Set through __dict__ so nn.Module does not register it (see the class docstring).
        self.__dict__["teacher"] = teacher

    @property
    def codebook_size(self) -> int:
        return self.quantize.size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def _check_teacher(self, teacher: nn.Module) -> None:
        side = self.config.image_size
        grid = side // self.config.patch_size
        tensors = [*teacher.parameters(), *teacher.buffers()]
        probe = torch.full((1, 3, side, side), 0.5, device=tensors[0].device if tensors else "cpu")
        with torch.no_grad():
            features = teacher(probe)
        if features.dim() != 3 or features.shape[1] != grid * grid:
            raise ValueError(
                f"The teacher must give one feature vector per {self.config.patch_size} px patch, (B, {grid * grid}, C) "
                f"for a {side} px image; it gave {tuple(features.shape)}. Pick a teacher with the same patch grid "
                "(e.g. a ViT-B/16 for 16 px patches)."
            )
        if features.shape[-1] != self.config.teacher_dim:
            raise ValueError(
                f"The teacher's features are {features.shape[-1]}-d but the decoder head outputs teacher_dim="
                f"{self.config.teacher_dim}; set teacher_dim={features.shape[-1]} in the VQKDConfig."
            )

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, H, W) -> l2-normalized code-space vectors (B, patches, code_dim), patches in raster order."""
        self.check_pixels(pixel_values)
        return self._encode(pixel_values)

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values * 2 - 1
        tokens = self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens :]
        head = self.encode_task_layer
        # BEiT v2 runs this head in full precision: the 32-d codes decide the argmax.
        with outside_autocast(x.device):
            z = head(tokens.to(head[-1].weight.dtype))
        return F.normalize(z, dim=-1)

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """[0, 1] RGB (B, 3, H, W) -> code ids (B, (H/16) * (W/16)) in raster order, values in [0, codebook_size).
        Changes no state, in train or eval mode."""
        return self.quantize.lookup(self.encode(pixel_values))

    # -- decoding ---------------------------------------------------------------------------------
    def _decode_vectors(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, code_dim) -> (B, h*w, teacher_dim): the decoder reads the codes as a code_dim-channel h x w image."""
        batch = codes.shape[0]
        image = codes.transpose(1, 2).reshape(batch, self.config.code_dim, *grid)
        tokens = self.decoder.forward_features(image)[:, self.decoder.num_prefix_tokens :]
        return self.decode_task_layer(tokens)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids (B, h, w), or (B, h*w) for a square grid -> the decoder's reconstruction of the
        teacher's patch features (B, h*w, teacher_dim). VQ-KD reconstructs features, not pixels."""
        if indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(f"{indices.shape[1]} codes are not a square grid; pass indices shaped (B, h, w).")
            indices = indices.view(-1, side, side)
        grid = tuple(indices.shape[1:])
        codes = self.quantize.codebook[indices.flatten(1)]
        return self._decode_vectors(codes, grid)

    # -- training ---------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> VQKDOutput:
        """[0, 1] RGB (B, 3, H, W) -> ``VQKDOutput`` with the loss against the teacher.

        In train mode this also updates the codebook (k-means at the first batch, then EMA and dead
        code restarts) and warns when the batch's codebook usage collapses.
        """
        if self.teacher is None:
            raise RuntimeError(
                "VQKD.forward needs a teacher to compute its loss, and this tokenizer has none (teacher='none'). "
                "For code ids call get_codebook_indices; to train, set teacher to 'timm' (with "
                "teacher_checkpoint), 'hog' or 'pixels'."
            )
        grid = self.check_pixels(pixel_values)
        target = self.teacher(pixel_values)
        if target.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"The teacher gave {target.shape[1]} patch features for a {grid[0]}x{grid[1]} code grid; "
                f"feed images of the teacher's size ({self.config.image_size} px) or a teacher with dynamic_img_size."
            )
        z = self._encode(pixel_values)
        codes, commitment, indices, counts = self.quantize(z)
        reconstruction = self._decode_vectors(codes, grid)
        reconstruction_loss = (1 - F.cosine_similarity(reconstruction.float(), target.float(), dim=-1)).mean()
        usage, perplexity = usage_figures(counts)
        if self.training:
            self._warn_on_collapse(counts)
        return VQKDOutput(
            loss=reconstruction_loss + commitment,
            reconstruction_loss=reconstruction_loss,
            commitment_loss=commitment,
            codebook_usage=usage,
            perplexity=perplexity,
            indices=indices,
            reconstruction=reconstruction,
        )

    def _warn_on_collapse(self, counts: torch.Tensor) -> None:
        used, total = int((counts > 0).sum()), int(counts.sum())
        reachable = min(self.codebook_size, total)
        if used < self.config.collapse_threshold * reachable:
            warnings.warn(
                f"VQ-KD codebook collapse: this batch used {used} of {self.codebook_size} codes "
                f"(codebook usage {used / self.codebook_size:.2%}), under {self.config.collapse_threshold:.0%} of the "
                f"{reachable} its {total} vectors could reach. Check the learning rate, the EMA decay, or turn on "
                "dead_code_steps.",
                stacklevel=2,
            )

    @classmethod
    def _loading_config(cls, config: VQKDConfig, overrides: dict[str, Any]) -> VQKDConfig:
        # A tokenizer trained here names its teacher's weights by a path on the training machine. Where
        # that file is absent, load for tokenization (which needs no teacher) rather than fail.
        if config.teacher == "timm" and "teacher_checkpoint" not in overrides:
            if not config.teacher_checkpoint or not Path(config.teacher_checkpoint).is_file():
                warnings.warn(
                    f"The teacher checkpoint {config.teacher_checkpoint!r} is not here; the tokenizer is loaded without "
                    "its teacher (get_codebook_indices and decode work; forward needs teacher_checkpoint=...).",
                    stacklevel=3,
                )
                return config.replace(teacher="none")
        return config

    # -- released checkpoints -----------------------------------------------------------------
    @classmethod
    def from_released(cls, path: str | os.PathLike, **overrides) -> VQKD:
        """Loads a BEiT v2 VQ-KD ``.pth`` (``{"model": state}``); sizes are read from the tensor shapes.

        The teacher's weights in the file (``teacher*``, ``scaling*``, ``loss*``) are dropped, and the
        tokenizer comes back with ``teacher="none"`` unless ``overrides`` name one.
        """
        state = read_released(path)
        fields = infer_released_config(state)
        model = cls(VQKDConfig.from_dict(fields, **overrides))
        load_state_dict_checked(model, released_to_vqkd(state), f"checkpoint {path}")
        return model.eval()


# ---------------------------------------------------------------------------------------------------
# BEiT v2's released file layout
# ---------------------------------------------------------------------------------------------------
_DROPPED_PREFIXES = ("teacher", "scaling", "loss")
# Statistics of BEiT v2's EmbeddingEMA that its norm-EMA update never reads.
_UNUSED_KEYS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")
_SIGNATURE = ("quantize.embedding.weight", "encoder.patch_embed.proj.weight")


def read_released(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a released VQ-KD file (read safely by ``read_checkpoint``), teacher and loss keys dropped."""
    state = read_checkpoint(path)
    missing = [k for k in _SIGNATURE if k not in state]
    if missing:
        raise ValueError(
            f"{path} is not a BEiT v2 VQ-KD checkpoint: it has no {missing} key (first keys: "
            f"{', '.join(list(state)[:6])}). Pass a vqkd_encoder_base_decoder_*.pth file or a folder written by "
            "save_pretrained."
        )
    return {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"{prefix}\.blocks\.(\d+)\.")
    return 1 + max((int(m[1]) for k in state if (m := pattern.match(k))), default=-1)


def infer_released_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """VQKDConfig fields read from a released state dict's shapes (heads = width / 64, as every released ViT)."""
    needed = [k for k in ("encoder.cls_token", "encoder.pos_embed") if k not in state]
    if needed:
        raise ValueError(f"The VQ-KD checkpoint lacks {needed}, so its sizes cannot be read.")
    encoder_dim = state["encoder.cls_token"].shape[-1]
    patch = state["encoder.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["encoder.pos_embed"].shape[1] - 1)
    codebook_size, code_dim = state["quantize.embedding.weight"].shape
    decoder_dim = state["decoder.cls_token"].shape[-1] if "decoder.cls_token" in state else encoder_dim
    fields = dict(
        image_size=grid * patch,
        patch_size=patch,
        encoder_dim=encoder_dim,
        encoder_depth=_depth(state, "encoder"),
        encoder_heads=max(1, encoder_dim // 64),
        decoder_dim=decoder_dim,
        decoder_depth=_depth(state, "decoder"),
        decoder_heads=max(1, decoder_dim // 64),
        codebook_size=codebook_size,
        code_dim=code_dim,
        teacher="none",
    )
    if "encoder.blocks.0.mlp.fc1.weight" in state:
        fields["mlp_ratio"] = state["encoder.blocks.0.mlp.fc1.weight"].shape[0] / encoder_dim
    if "decode_task_layer.2.weight" in state:
        fields["teacher_dim"] = state["decode_task_layer.2.weight"].shape[0]
    return fields


def released_to_vqkd(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released state dict (teacher keys already dropped) -> our ``VQKD`` keys.

    Keys this function does not know pass through unchanged, so a loader names them as unexpected.
    """
    out = {}
    for key, value in state.items():
        if key in _UNUSED_KEYS or key.endswith(".attn.v_bias"):
            continue
        if key.endswith(".attn.q_bias"):
            v_key = key[: -len("q_bias")] + "v_bias"
            if v_key not in state:
                out[key] = value
                continue
            # unilm adds no key bias; timm holds one fused bias, so its k part is zero.
            out[key[: -len("q_bias")] + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), state[v_key]])
            continue
        key = re.sub(r"^(encoder|decoder)\.fc_norm\.", r"\1.norm.", key)
        key = {
            "quantize.embedding.weight": "quantize.codebook",
            "quantize.embedding.initted": "quantize.initted",
            "quantize.cluster_size": "quantize.usage",
        }.get(key, key)
        out[key] = value
    if "quantize.initted" in out:
        out["quantize.initted"] = out["quantize.initted"].reshape(()).bool()
    if "quantize.codebook" in out:
        out.setdefault("quantize.unused_steps", torch.zeros(out["quantize.codebook"].shape[0], dtype=torch.long))
    return out
