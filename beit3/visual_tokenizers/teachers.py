"""Regression targets for VQ-KD: a frozen timm model (BEiT v2: CLIP ViT-B/16), or offline features.

Every teacher maps RGB in [0, 1], (B, 3, H, W), to one feature vector per patch, (B, patches, C),
patches in raster order. The offline ones (HOG, normalized pixels) need no weights, so a small
tokenizer can be trained anywhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn


def patchify(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/patch) * (W/patch), patch * patch * C), each row one patch (pixels row-major, channels last)."""
    batch, channels, height, width = maps.shape
    grid_h, grid_w = height // patch, width // patch
    x = maps.reshape(batch, channels, grid_h, patch, grid_w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch * patch * channels)


class HOGTarget(nn.Module):
    """Histograms of oriented gradients per patch, as MaskFeat regresses them.

    Per color channel: central-difference gradients, unsigned orientation in [0, pi) split into
    ``bins`` bins (each pixel votes its magnitude into the two nearest bins), summed over
    ``cell`` x ``cell`` cells. Each cell's histogram (all channels) is L2-normalized, for
    invariance to local contrast; a patch's feature is its cells' histograms side by side,
    3 * bins * (patch / cell)**2 numbers.
    """

    def __init__(self, patch_size: int, cell: int = 8, bins: int = 9):
        super().__init__()
        if patch_size % cell:
            raise ValueError(
                f"The HOG cell ({cell} px) must divide the patch ({patch_size} px); set hog_cell to a divisor."
            )
        self.patch_size, self.cell, self.bins = patch_size, cell, bins
        self.out_dim = 3 * bins * (patch_size // cell) ** 2
        kernel = torch.tensor([-1.0, 0.0, 1.0])
        self.register_buffer("dx", kernel.view(1, 1, 1, 3).repeat(3, 1, 1, 1), persistent=False)
        self.register_buffer("dy", kernel.view(1, 1, 3, 1).repeat(3, 1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.float()
        batch, _, height, width = x.shape
        # Replicate padding: the border gets one-sided gradients instead of a fake edge against zeros.
        gx = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), self.dx, groups=3)
        gy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="replicate"), self.dy, groups=3)
        magnitude = torch.sqrt(gx**2 + gy**2)
        position = torch.remainder(torch.atan2(gy, gx), math.pi) / (math.pi / self.bins)
        low = position.floor().long()
        upper_share = position - low
        hist = x.new_zeros(batch, 3, self.bins, height, width)
        hist.scatter_add_(2, (low % self.bins).unsqueeze(2), (magnitude * (1 - upper_share)).unsqueeze(2))
        hist.scatter_add_(2, ((low + 1) % self.bins).unsqueeze(2), (magnitude * upper_share).unsqueeze(2))
        cells = F.avg_pool2d(hist.flatten(1, 2), self.cell) * self.cell**2  # (B, 3 * bins, H / cell, W / cell)
        cells = F.normalize(cells, dim=1)
        return patchify(cells, self.patch_size // self.cell)


class PixelTarget(nn.Module):
    """The pixels of each patch, normalized to zero mean and unit variance per patch (MAE's normalized pixels)."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.out_dim = 3 * patch_size**2

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = patchify(pixel_values.float(), self.patch_size)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()


class TimmTeacher(nn.Module):
    """A frozen timm model; its patch tokens (CLS and register tokens dropped) are the targets.

    Args:
        model: a timm model whose ``forward_features`` returns (B, prefix + patches, C) tokens (a
            ViT) or a (B, C, h, w) map (a CNN).
        use_head: apply ``model.head`` to each patch token. timm keeps CLIP's visual projection
            (768 -> 512) in ``head``, and BEiT v2 regresses projected CLIP tokens.
        mean, std: the input normalization the model was trained with.
    """

    def __init__(self, model: nn.Module, use_head: bool, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.use_head = use_head
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # the teacher stays in eval mode whatever the student does

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = (pixel_values.clamp(0, 1) - self.mean) / self.std
        tokens = self.model.forward_features(x.to(self.mean.dtype))
        if tokens.dim() == 4:
            tokens = tokens.flatten(2).transpose(1, 2)
        else:
            tokens = tokens[:, getattr(self.model, "num_prefix_tokens", 0) :]
        return self.model.head(tokens) if self.use_head else tokens


def build_teacher(config) -> nn.Module | None:
    """The teacher a ``VQKDConfig`` names, or None for ``teacher="none"`` (a tokenizer for inference only)."""
    if config.teacher == "none":
        return None
    if config.teacher == "hog":
        return HOGTarget(config.patch_size, config.hog_cell, config.hog_bins)
    if config.teacher == "pixels":
        return PixelTarget(config.patch_size)
    if config.teacher != "timm":
        raise ValueError(f"Unknown VQ-KD teacher {config.teacher!r}; use 'timm', 'hog', 'pixels' or 'none'.")
    if not config.teacher_checkpoint:
        raise ValueError(
            f"teacher='timm' needs teacher_checkpoint, a local weights file for {config.teacher_model!r} "
            "(nothing is downloaded); or pick an offline teacher, teacher='hog' or 'pixels', or teacher='none' "
            "for a tokenizer that only encodes."
        )
    path = Path(config.teacher_checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"No teacher checkpoint at {path} (teacher_model {config.teacher_model!r}).")
    # timm reads a local file named in the pretrained config with weights_only=True and runs the
    # model's own filter, which also converts OpenAI/open_clip CLIP state dicts to timm's layout.
    try:
        model = timm.create_model(
            config.teacher_model,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            **(config.teacher_kwargs or {}),
        )
    except RuntimeError as error:  # timm's load_state_dict names the keys that do not fit
        raise ValueError(
            f"The teacher checkpoint {path} does not fit the timm model {config.teacher_model!r}: {str(error)[:800]}"
        ) from error
    data_config = resolve_data_config({}, model=model)
    return TimmTeacher(model, config.teacher_head, tuple(data_config["mean"]), tuple(data_config["std"]))
