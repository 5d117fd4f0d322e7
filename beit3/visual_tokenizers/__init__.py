"""Visual tokenizers: images -> one discrete code per patch, the targets of masked image modeling.

    from beit3.visual_tokenizers import VisualTokenizer
    tokenizer = VisualTokenizer.from_pretrained("vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth")
    ids = tokenizer.get_codebook_indices(pixel_values)   # [0, 1] RGB (B, 3, 224, 224) -> (B, 196)

Kinds: ``vqkd`` (BEiT v2, used by BEiT-3) and ``dvae`` (BEiT v1 / DALL-E style). Both take RGB in
[0, 1] and apply their own input mapping.
"""

from .base import VisualTokenizer
from .codebook import NormEMACodebook
from .dvae import DVAE, DVAEConfig, DVAEOutput, map_pixels, unmap_pixels
from .teachers import HOGTarget, PixelTarget, TimmTeacher
from .vqkd import VQKD, VQKD_PRESETS, VQKDConfig, VQKDOutput

__all__ = [
    "DVAE",
    "DVAEConfig",
    "DVAEOutput",
    "HOGTarget",
    "NormEMACodebook",
    "PixelTarget",
    "TimmTeacher",
    "VQKD",
    "VQKDConfig",
    "VQKDOutput",
    "VQKD_PRESETS",
    "VisualTokenizer",
    "map_pixels",
    "unmap_pixels",
]
