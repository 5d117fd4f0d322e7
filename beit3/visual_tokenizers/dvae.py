"""A discrete VAE in the manner of DALL-E's, the visual tokenizer of BEiT v1, small enough to train here.

    image [0,1] -> map_pixels ([0.1, 0.9]) -> conv encoder (stride 8) -> logits over K codes per cell
      -> Gumbel-softmax (temperature tau) -> soft one-hot @ codebook -> conv decoder (x8)
      -> per pixel: location mu and log-scale of a logit-Laplace distribution
      -> loss = logit-Laplace NLL of the mapped pixels + kl_weight * KL(q || uniform over K)

Code ids are the argmax of the encoder logits; ``decode`` draws the pixels from the code ids.
OpenAI's released DALL-E weights are pickled modules that cannot be loaded with
``weights_only=True``, so this kind has no released-checkpoint loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .base import TokenizerConfig, VisualTokenizer, usage_figures

LOGIT_LAPLACE_EPS = 0.1
STRIDE = 8  # three 2x poolings, DALL-E's encoder stride


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]: keeps the logit of every pixel finite (DALL-E's ``map_pixels``)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of ``map_pixels``, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


@dataclass
class DVAEConfig(TokenizerConfig):
    """Sizes of a dVAE tokenizer.

    Args:
        image_size: the side it is trained on (BEiT v1 gave the dVAE a 112 px view: 14 x 14 codes).
        codebook_size: K codes (8192 as DALL-E).
        hidden_dim: width of the first stage; the four stages have 1, 2, 4, 8 times this width.
        blocks_per_stage: residual blocks per stage.
        codebook_dim: width of a code's embedding, the decoder's input.
        temperature: Gumbel-softmax temperature (DALL-E anneals it from 1 to 1/16; pass
            ``temperature=`` to ``forward`` to anneal).
        kl_weight: weight of the per-cell KL against the per-pixel NLL. DALL-E's beta 6.6 on sums over
            an 8 x 8 x 3 pixel cell is about 6.6 / 192 = 0.034 in these means.
    """

    kind = "dvae"

    image_size: int = 112
    codebook_size: int = 8192
    hidden_dim: int = 64
    blocks_per_stage: int = 1
    codebook_dim: int = 256
    temperature: float = 1.0
    kl_weight: float = 0.034

    def __post_init__(self):
        if self.image_size % STRIDE:
            raise ValueError(
                f"Invalid DVAEConfig: image_size {self.image_size} is not a multiple of the stride {STRIDE}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DVAEConfig:
        """``dvae_tiny`` (tests: 32 codes, width 8) or ``dvae_base`` (8192 codes, width 64, 112 px)."""
        presets = {"dvae_tiny": dict(image_size=32, codebook_size=32, hidden_dim=8, codebook_dim=16), "dvae_base": {}}
        if name not in presets:
            raise ValueError(f"Unknown dVAE preset {name!r}; known: {', '.join(presets)}.")
        return cls(**{**presets[name], **overrides})


@dataclass
class DVAEOutput(ModelOutput):
    """
    Args:
        loss: reconstruction_loss + kl_weight * kl (scalar).
        reconstruction_loss: mean per-pixel logit-Laplace negative log-likelihood (without the
            Jacobian term -log(x(1-x)), which depends on the data only).
        kl: mean per-cell KL(softmax(logits) || uniform over K).
        reconstruction: (B, 3, H, W) in [0, 1], the decoder's mean image.
        codebook_usage: fraction of the K codes that win an argmax in this batch.
        perplexity: exp(entropy) of the batch's argmax code histogram.
        logits: (B, K, H/8, W/8) encoder logits.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class ResBlock(nn.Module):
    """DALL-E's block: x + a ReLU-conv bottleneck (3x3, 3x3, 1x1 at a quarter width); a 1x1 shortcut when widths differ."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        mid = max(1, out_dim // 4)
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        self.path = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_dim, mid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(mid, out_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.path(x)


def _stages(widths: list[int], blocks: int, resample: type[nn.Module], **resample_args) -> list[nn.Module]:
    layers = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [ResBlock(w_in if j == 0 else w_out, w_out) for j in range(blocks)]
        if i < len(widths) - 2:
            layers.append(resample(**resample_args))
    return layers


class DVAE(VisualTokenizer):
    """Discrete VAE tokenizer (BEiT v1 / DALL-E style), stride 8.

    Input: RGB ``pixel_values`` (B, 3, H, W) in [0, 1] (ToTensor, no mean/std), H and W multiples
    of 8; mapped inside by DALL-E's logit-Laplace map x -> (1 - 2 * 0.1) * x + 0.1.
    ``get_codebook_indices`` -> (B, (H/8) * (W/8)); ``decode`` -> (B, 3, H, W) in [0, 1].

    A training loop: ``out = model(pixel_values, temperature=tau); out.loss.backward()``.
    """

    kind = "dvae"
    config_class = DVAEConfig

    def __init__(self, config: DVAEConfig):
        super().__init__(config)
        h, blocks = config.hidden_dim, config.blocks_per_stage
        widths = [h, h, 2 * h, 4 * h, 8 * h]
        self.encoder = nn.Sequential(
            nn.Conv2d(3, h, 7, padding=3),
            *_stages(widths, blocks, nn.MaxPool2d, kernel_size=2),
            nn.ReLU(),
            nn.Conv2d(8 * h, config.codebook_size, 1),
        )
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.codebook_dim, 8 * h, 1),
            *_stages(widths[::-1], blocks, nn.Upsample, scale_factor=2, mode="nearest"),
            nn.ReLU(),
            nn.Conv2d(h, 6, 1),
        )  # 3 locations + 3 log-scales

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def patch_size(self) -> int:
        return STRIDE

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, H, W) -> encoder logits (B, K, H/8, W/8)."""
        self.check_pixels(pixel_values)
        return self.encoder(map_pixels(pixel_values))

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """[0, 1] RGB (B, 3, H, W) -> argmax code ids (B, (H/8) * (W/8)) in raster order."""
        return self.logits(pixel_values).argmax(1).flatten(1)

    def _pixels(self, embedded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, codebook_dim, h, w) -> (location mu, log-scale), each (B, 3, 8h, 8w), in logit space."""
        out = self.decoder(embedded)
        # The floor keeps 1/b finite when the decoder grows very confident.
        return out[:, :3], out[:, 3:].clamp(min=-7.0)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids (B, h, w), or (B, h*w) for a square grid -> images (B, 3, 8h, 8w) in [0, 1]."""
        if indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            if side * side != indices.shape[1]:
                raise ValueError(f"{indices.shape[1]} codes are not a square grid; pass indices shaped (B, h, w).")
            indices = indices.view(-1, side, side)
        embedded = self.codebook(indices).permute(0, 3, 1, 2)
        mu, _ = self._pixels(embedded)
        return unmap_pixels(torch.sigmoid(mu))

    def forward(self, pixel_values: torch.Tensor, temperature: float | None = None) -> DVAEOutput:
        """[0, 1] RGB (B, 3, H, W) -> ``DVAEOutput``. Train mode samples a Gumbel-softmax relaxation at
        ``temperature`` (config default); eval mode decodes the argmax codes, as tokenization does."""
        logits = self.logits(pixel_values)
        if self.training:
            soft = F.gumbel_softmax(logits, tau=temperature or self.config.temperature, dim=1)
        else:
            soft = F.one_hot(logits.argmax(1), self.codebook_size).permute(0, 3, 1, 2).to(logits.dtype)
        embedded = torch.einsum("bkhw,kd->bdhw", soft, self.codebook.weight)
        mu, log_scale = self._pixels(embedded)

        # Logit-Laplace: logit(mapped pixel) ~ Laplace(mu, b); NLL = log(2b) + |logit(x) - mu| / b.
        target = torch.logit(map_pixels(pixel_values.float()))
        nll = (math.log(2) + log_scale + (target - mu).abs() * torch.exp(-log_scale)).mean()
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.codebook_size))).sum(1).mean()

        counts = torch.bincount(logits.argmax(1).flatten(), minlength=self.codebook_size).float()
        usage, perplexity = usage_figures(counts)
        return DVAEOutput(
            loss=nll + self.config.kl_weight * kl,
            reconstruction_loss=nll,
            kl=kl,
            reconstruction=unmap_pixels(torch.sigmoid(mu)),
            codebook_usage=usage,
            perplexity=perplexity,
            logits=logits,
        )
