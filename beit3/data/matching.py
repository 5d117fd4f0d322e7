"""Image-text matching batches with hard negatives, built from a pair batch (``data.itm_negatives``).

A negative is the image of another caption of the same batch, drawn with weights that grow with the tokens
the two captions share, or (``data.itm_text_swaps``) the caption's own image with one of its tokens swapped
for the token another caption has at that position.
"""

from __future__ import annotations

import torch

# Hard negatives are drawn with weights exp(token overlap / this): at 0.1 a caption sharing 0.1 more of its tokens
# is e times as likely.
HARD_NEGATIVE_TEMPERATURE = 0.1


def matching_batch(
    images: torch.Tensor,
    texts: list[str],
    encoded: dict[str, torch.Tensor],
    pairs: int,
    text_swaps: int,
    special_ids: list[int],
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The ``itm`` batch of a pair batch: its first ``pairs`` (K) pairs matched, then the same K texts mismatched.

    Args:
        images: the pair batch's model views (B, 3, S, S); texts: its B captions; encoded: their unmasked
            ``input_ids`` and ``attention_mask`` (B, T).
        text_swaps: how many of the K negatives (the first ones) keep their image and get a text one token off.
        special_ids: token ids a swap never touches.
    Returns:
        pixel_values (2K, 3, S, S), input_ids and attention_mask (2K, T), itm_labels (2K,): 1 for the K matched
        pairs, 0 for the negatives (1 again for a caption with no possible negative, which is then its own pair).
    """
    ids = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -1)
    sets = torch.zeros(len(texts), int(ids.max()) + 1, dtype=torch.bool)  # row i: the token ids text i holds
    for row, tokens in enumerate(ids):
        sets[row, tokens[tokens >= 0]] = True
    overlap = (sets[:, None] & sets[None]).sum(-1).float() / (sets[:, None] | sets[None]).sum(-1).clamp(min=1).float()
    # Never the same text (the diagonal too), nor a caption with every token of this one: it may well describe
    # the same thing ("a red circle" and "a big red circle on the left").
    not_negative = torch.tensor([[a == b for b in texts] for a in texts]) | ~(sets[:, None] & ~sets[None]).any(-1)
    k = pairs
    # Sampled, as ALBEF and VLMo sample theirs by similarity: mostly the nearest captions, now and then a far one.
    # Always the nearest was too hard to start from (matching stayed at chance for 760 demo steps).
    weights = torch.exp((overlap[:k] - 1.0) / HARD_NEGATIVE_TEMPERATURE).masked_fill(not_negative[:k], 0.0)
    usable = weights.sum(-1) > 0  # a batch of one repeated caption has no negative
    negatives = torch.multinomial(weights.masked_fill(~usable[:, None], 1.0), 1, generator=generator).squeeze(1)
    negatives = torch.where(usable, negatives, torch.arange(k))
    negative_ids = encoded["input_ids"][:k].clone()
    if text_swaps:  # the positions a swap may touch: no special token, no padding
        ordinary = encoded["attention_mask"].bool() & ~torch.isin(encoded["input_ids"], torch.tensor(special_ids))
    for row in range(text_swaps):
        swapped = swap_one_token(encoded["input_ids"], ordinary, sets, row, generator)
        if swapped is not None:  # this row's negative: its own image, its text one token off
            negative_ids[row], negatives[row], usable[row] = swapped, row, True
    labels = torch.cat([torch.ones(k, dtype=torch.long), (~usable).long()])
    return {
        "pixel_values": torch.cat([images[:k], images[negatives]]),
        "input_ids": torch.cat([encoded["input_ids"][:k], negative_ids]),
        "attention_mask": encoded["attention_mask"][:k].repeat(2, 1),
        "itm_labels": labels,
    }


def swap_one_token(
    ids: torch.Tensor, ordinary: torch.Tensor, sets: torch.Tensor, row: int, generator: torch.Generator
) -> torch.Tensor | None:
    """Text ``row``'s ids (B, T) with one token replaced by the token another text has at that position and this
    text holds nowhere, both positions ``ordinary`` (B, T); None when no such token exists."""
    # (padding may have an id past sets' width; the clamp only keeps the lookup in range, ordinary drops it)
    candidates = ordinary & ordinary[row] & ~sets[row][ids.clamp(max=sets.shape[1] - 1)]
    candidates[row] = False
    found = candidates.nonzero()  # (other text, position) pairs
    if len(found) == 0:
        return None
    other, position = found[int(torch.randint(len(found), (1,), generator=generator))].tolist()
    swapped = ids[row].clone()
    swapped[position] = ids[other, position]
    return swapped
