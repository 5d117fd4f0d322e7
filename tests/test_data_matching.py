"""Image-text matching batches: hard negatives drawn from the batch, and negatives one token off."""

import pytest
import torch
from conftest import word_tokenizer

from beit3.data.matching import matching_batch

WORDS = ["a", "big", "small", "red", "blue", "green", "circle", "square", "on", "the", "left", "right"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("words"), WORDS, vocab_size=30)


def numbered_images(count: int) -> torch.Tensor:
    """(count, 3, 2, 2) images, image i all i: an image in a batch tells which it is."""
    return torch.arange(float(count))[:, None, None, None].expand(count, 3, 2, 2)


def test_a_caption_holding_every_token_of_another_is_never_its_negative(tokenizer):
    # The second says everything the first says, and more: it may describe the same picture.
    texts = ["a red circle", "a big red circle on the left", "a small blue square"]
    encoded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    for seed in range(5):
        batch = matching_batch(
            numbered_images(3), texts, encoded, 1, 0, tokenizer.all_special_ids, torch.Generator().manual_seed(seed)
        )
        assert batch["itm_labels"].tolist() == [1, 0]
        assert int(batch["pixel_values"][1][0, 0, 0]) == 2, "'a red circle' was paired with the big red circle's image"


def test_a_batch_of_one_repeated_caption_has_no_negative_and_says_so_in_its_labels(tokenizer):
    texts = ["a red circle"] * 3
    encoded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch = matching_batch(numbered_images(3), texts, encoded, 2, 0, tokenizer.all_special_ids, torch.Generator())
    assert batch["itm_labels"].tolist() == [1, 1, 1, 1]  # its own image again: a match, labelled as one
    assert torch.equal(batch["pixel_values"][2:], batch["pixel_values"][:2])


def test_text_swap_negatives_keep_the_image_and_change_one_token_for_another_captions(tokenizer):
    texts = ["a big red circle", "a small blue square on the left", "a green circle", "a big blue square"]
    encoded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    ids, mask = encoded["input_ids"], encoded["attention_mask"].bool()
    batch = matching_batch(numbered_images(4), texts, encoded, 4, 2, tokenizer.all_special_ids, torch.Generator())
    assert batch["itm_labels"].tolist() == [1] * 4 + [0] * 4
    for row in range(2):  # the first 2 of the 4 negatives: the own image, a text one token off
        assert int(batch["pixel_values"][4 + row][0, 0, 0]) == row
        changed = (batch["input_ids"][4 + row] != ids[row]).nonzero().flatten().tolist()
        assert len(changed) == 1 and mask[row, changed[0]]
        new = int(batch["input_ids"][4 + row, changed[0]])
        assert new not in ids[row].tolist() and new in ids[[o for o in range(4) if o != row], changed[0]].tolist()
        assert new not in tokenizer.all_special_ids
    for row in range(2, 4):  # the rest: the same text with another caption's image
        assert torch.equal(batch["input_ids"][4 + row], ids[row])
        assert int(batch["pixel_values"][4 + row][0, 0, 0]) != row
