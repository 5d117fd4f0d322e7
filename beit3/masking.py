"""What masked data modeling hides: blocks of image patches, and text tokens.

Images: BEiT's block-wise masking. Rectangles of at least ``min_block_patches`` patches, with
aspect ratios in [min_aspect, 1/min_aspect], are added until the target count is reached; the
count is then made exact, as in BEiT v2. Text: BERT-style corruption through transformers'
``DataCollatorForLanguageModeling`` (80% ``<mask>``, 10% a random id, 10% unchanged), never on
special tokens or padding. The paper's rates are 15% for text-only input and 50% for the text of
an image-text pair.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

# BEiT masks 75 of the 196 patches of a 224 px image ("about 40%"); other grids keep the fraction.
DEFAULT_MASK_FRACTION = 75 / 196
TEXT_MASK_PROB = 0.15
PAIR_TEXT_MASK_PROB = 0.5


class BlockMaskGenerator:
    """Block-wise masks over a patch grid, exactly ``num_masked`` patches each.

    Args:
        grid: patches per side, or (rows, columns).
        num_masked: patches to mask; default ``round(DEFAULT_MASK_FRACTION * patches)`` (75 of 196).
        min_block_patches: smallest block BEiT places (16).
        max_block_patches: largest block; default no limit.
        min_aspect: blocks have height/width in [min_aspect, 1 / min_aspect] (0.3).
        seed: seeds the generator's own random stream, so masks repeat under the same seed.

    ``generator()`` returns a bool tensor (rows * columns,), True = masked, in raster order.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        num_masked: int | None = None,
        min_block_patches: int = 16,
        max_block_patches: int | None = None,
        min_aspect: float = 0.3,
        seed: int | None = None,
    ):
        self.rows, self.cols = (grid, grid) if isinstance(grid, int) else grid
        patches = self.rows * self.cols
        self.num_masked = round(DEFAULT_MASK_FRACTION * patches) if num_masked is None else num_masked
        if not 0 <= self.num_masked <= patches:
            raise ValueError(
                f"Cannot mask {self.num_masked} of the {patches} patches of a {self.rows}x{self.cols} grid."
            )
        self.min_block_patches = min_block_patches
        self.max_block_patches = max_block_patches or patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.rng = np.random.default_rng(seed)

    def _add_block(self, mask: np.ndarray, budget: int) -> int:
        """Tries up to 10 times to mask one block of new patches, at most ``budget``; returns how many it added."""
        for _ in range(10):
            # When fewer than min_block_patches remain, blocks shrink to what is left (as in BEiT).
            area = self.rng.uniform(min(self.min_block_patches, budget), max(self.min_block_patches, budget))
            aspect = math.exp(self.rng.uniform(*self.log_aspect))
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < height < self.rows and 0 < width < self.cols):
                continue
            top, left = self.rng.integers(0, self.rows - height + 1), self.rng.integers(0, self.cols - width + 1)
            block = mask[top : top + height, left : left + width]
            added = int(block.size - block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __call__(self) -> torch.Tensor:
        mask = np.zeros((self.rows, self.cols), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, min(self.num_masked - count, self.max_block_patches))
            if added == 0:
                break
            count += added
        # Blocks can fall short of the target (or a grid too small for blocks stops early): top up
        # with single random patches so every mask hides exactly num_masked patches.
        flat = mask.reshape(-1)
        if count < self.num_masked:
            flat[self.rng.choice(np.flatnonzero(~flat), self.num_masked - count, replace=False)] = True
        return torch.from_numpy(flat.copy())

    def state_dict(self) -> dict:
        """The random stream's state, so that a resumed run draws the same masks."""
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


def text_masker(
    tokenizer: PreTrainedTokenizerBase, mask_prob: float = TEXT_MASK_PROB, seed: int | None = None
) -> DataCollatorForLanguageModeling:
    """transformers' MLM collator at ``mask_prob`` with 80/10/10 replacement and its own seeded stream."""
    if tokenizer.mask_token is None:
        raise ValueError(
            "The text tokenizer has no mask token; masked language modeling needs one (BEiT-3's is <mask>)."
        )
    masker = DataCollatorForLanguageModeling(
        tokenizer,
        mlm=True,
        mlm_probability=mask_prob,
        mask_replace_prob=0.8,
        random_replace_prob=0.1,
        seed=seed,
        return_tensors="pt",
    )
    if seed is not None:
        # Our own generator, seeded here: mask_text_tokens bypasses the collator's lazy seeding, which also
        # refuses any process but the main one and DataLoader workers (ranks started by torch.multiprocessing).
        masker.generator = torch.Generator().manual_seed(seed)
    return masker


def mask_text_tokens(
    masker: DataCollatorForLanguageModeling, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupts a batch of token ids for masked language modeling.

    Args:
        input_ids, attention_mask: (B, T); padding (attention_mask 0) and the tokenizer's special
            tokens are never chosen.
    Returns:
        (corrupted input_ids, labels), both (B, T); labels are -100 except at the chosen positions.
    """
    special = torch.tensor(
        [masker.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in input_ids.tolist()],
        dtype=torch.bool,
    )
    return masker.torch_mask_tokens(input_ids.clone(), special_tokens_mask=special | ~attention_mask.bool())


CAPTION_MASK_PROB = 0.6  # the official default; the COCO recipe uses 0.7


def mask_caption_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: int,
    mask_prob: float = CAPTION_MASK_PROB,
    random_ids: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupts captions for the official "causal masked LM" of captioning, with torch's global RNG.

    Of a caption's n real tokens (``<s> words </s>``), round(n * mask_prob) are chosen, at least 1 and
    at most n - 1, never the ``<s>`` (the ``</s>`` may be chosen: the model learns to stop). A chosen
    token becomes ``<mask>`` with probability 0.8, a random id from ``random_ids`` = [low, high) with
    0.1 (default [3, mask_token_id): the ordinary pieces), and stays with 0.1.

    Args:
        input_ids, attention_mask: (B, T), right-padded.
    Returns:
        (corrupted input_ids, labels), both (B, T); labels are -100 except at the chosen positions.
    """
    batch, length = input_ids.shape
    lengths = attention_mask.long().sum(dim=1)
    if (lengths < 2).any():
        raise ValueError("A caption needs at least <s> and one more token to mask; got an empty one.")
    low, high = random_ids or (3, mask_token_id)
    positions = torch.arange(length, device=input_ids.device)
    candidate = (positions >= 1) & (positions < lengths[:, None])
    counts = (lengths.float() * mask_prob).round().long().clamp(min=1)
    counts = torch.minimum(counts, lengths - 1)
    # A random priority per position; the `counts` lowest among the candidates are chosen.
    priority = torch.rand(batch, length, device=input_ids.device).masked_fill(~candidate, 2.0)
    rank = priority.argsort(dim=1).argsort(dim=1)
    chosen = (rank < counts[:, None]) & candidate
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(batch, length, device=input_ids.device)
    corrupted = input_ids.clone()
    corrupted[chosen & (action < 0.8)] = mask_token_id
    replace = chosen & (action >= 0.9)
    corrupted[replace] = torch.randint(low, high, (int(replace.sum()),), device=input_ids.device)
    return corrupted, labels
