from collections import deque

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from beit3.masking import BlockMaskGenerator, mask_text_tokens, text_masker
from tokenizers import Tokenizer, models, pre_tokenizers


def components(mask: torch.Tensor, side: int) -> list[int]:
    """Sizes of the 4-connected groups of masked patches."""
    grid = mask.view(side, side).tolist()
    seen, sizes = set(), []
    for start in ((r, c) for r in range(side) for c in range(side) if grid[r][c]):
        if start in seen:
            continue
        seen.add(start)
        queue, size = deque([start]), 0
        while queue:
            r, c = queue.popleft()
            size += 1
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < side and 0 <= nc < side and grid[nr][nc] and (nr, nc) not in seen:
                    seen.add((nr, nc))
                    queue.append((nr, nc))
        sizes.append(size)
    return sizes


def test_default_masks_75_of_196_patches_every_time():
    generator = BlockMaskGenerator(14, seed=0)
    for _ in range(50):
        mask = generator()
        assert mask.shape == (196,) and mask.dtype == torch.bool and int(mask.sum()) == 75


def test_masks_come_in_blocks_not_scattered_patches():
    generator = BlockMaskGenerator(14, seed=1)
    block_groups = [len(components(generator(), 14)) for _ in range(30)]
    scattered_groups = [len(components(torch.randperm(196) < 75, 14)) for _ in range(30)]
    assert sum(block_groups) / 30 < 8 < sum(scattered_groups) / 30
    assert all(max(components(generator(), 14)) >= 16 for _ in range(30))  # at least one whole block of >= 16


def test_masks_repeat_under_a_seed_and_resume_from_a_state():
    a, b = BlockMaskGenerator(14, seed=3), BlockMaskGenerator(14, seed=3)
    assert all(torch.equal(a(), b()) for _ in range(5))
    assert not torch.equal(BlockMaskGenerator(14, seed=4)(), BlockMaskGenerator(14, seed=5)())
    state = a.state_dict()
    expected = [a() for _ in range(3)]
    resumed = BlockMaskGenerator(14, seed=123)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed(), e) for e in expected)


def test_other_grids_keep_the_fraction_and_small_grids_still_get_exact_counts():
    assert int(BlockMaskGenerator((8, 8), seed=0)().sum()) == round(64 * 75 / 196)
    assert int(BlockMaskGenerator(3, num_masked=4, seed=0)().sum()) == 4  # blocks of 16 cannot fit: singles top up


def test_impossible_mask_count_is_refused():
    with pytest.raises(ValueError, match="Cannot mask 200 of the 196 patches"):
        BlockMaskGenerator(14, num_masked=200)


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(96)}, "<mask>": 100}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def text_batch(rows=400, length=40):
    ids = torch.randint(4, 100, (rows, length))
    lengths = torch.randint(10, length, (rows,))
    attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = 0
    ids[torch.arange(rows), lengths - 1] = 2
    ids[attention_mask == 0] = 1
    return ids, attention_mask


@pytest.mark.parametrize("rate", [0.15, 0.5])
def test_text_masking_rate_and_80_10_10_split(rate):
    ids, attention_mask = text_batch()
    corrupted, labels = mask_text_tokens(text_masker(word_tokenizer(), rate, seed=0), ids, attention_mask)
    chosen = labels != -100
    eligible = attention_mask.bool() & (ids != 0) & (ids != 2)
    assert not (chosen & ~eligible).any()  # never specials or padding
    assert torch.equal(corrupted[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum().item() / eligible.sum().item() - rate) < 0.02
    masked = (corrupted[chosen] == 100).float().mean().item()
    kept = (corrupted[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and 0.07 < kept < 0.15  # a random id can also land on the original


def test_text_masking_repeats_under_a_seed():
    ids, attention_mask = text_batch(rows=20)
    first = mask_text_tokens(text_masker(word_tokenizer(), seed=7), ids, attention_mask)
    second = mask_text_tokens(text_masker(word_tokenizer(), seed=7), ids, attention_mask)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_caption_masking_follows_the_official_counts_and_never_touches_bos_or_padding():
    from beit3.masking import mask_caption_tokens

    torch.manual_seed(0)
    lengths = torch.tensor([2, 3, 7, 12, 20])
    input_ids = torch.full((5, 24), 1)  # 1 = padding
    for row, n in enumerate(lengths.tolist()):
        input_ids[row, :n] = torch.arange(10, 10 + n)
        input_ids[row, 0] = 0  # <s>
    attention_mask = (torch.arange(24)[None] < lengths[:, None]).long()
    corrupted, labels = mask_caption_tokens(input_ids, attention_mask, mask_token_id=99, mask_prob=0.6)
    chosen = labels != -100
    for row, n in enumerate(lengths.tolist()):
        assert chosen[row].sum().item() == max(1, min(round(n * 0.6), n - 1))
    assert not chosen[:, 0].any() and not chosen[attention_mask == 0].any()
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(corrupted[~chosen], input_ids[~chosen])


def test_caption_masking_replaces_80_10_10():
    from beit3.masking import mask_caption_tokens

    torch.manual_seed(1)
    input_ids = torch.randint(3, 50, (400, 30))
    input_ids[:, 0] = 0
    corrupted, labels = mask_caption_tokens(
        input_ids, torch.ones_like(input_ids), mask_token_id=99, mask_prob=0.5, random_ids=(3, 50)
    )
    chosen = labels != -100
    masked = (corrupted[chosen] == 99).float().mean().item()
    kept = (corrupted[chosen] == input_ids[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / 47, abs=0.02)  # unchanged, plus random draws that hit the same id
    assert corrupted[chosen].max() <= 99 and corrupted[chosen & (corrupted != 99)].min() >= 3


def test_caption_masking_refuses_an_empty_caption():
    from beit3.masking import mask_caption_tokens

    with pytest.raises(ValueError, match="empty"):
        mask_caption_tokens(torch.tensor([[0, 1, 1]]), torch.tensor([[1, 0, 0]]), mask_token_id=99)


def _mask_in_this_process(ids, attention_mask, seed):
    return mask_text_tokens(text_masker(word_tokenizer(), seed=seed), ids, attention_mask)


def test_seeded_text_masking_works_in_a_process_that_is_not_a_dataloader_worker():
    # Ranks started by torch.multiprocessing (or any multiprocessing child) are neither the main process nor a
    # DataLoader worker: transformers' collator refuses to seed itself there.
    import multiprocessing

    ids, attention_mask = text_batch(rows=20)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        corrupted, labels = pool.apply(_mask_in_this_process, (ids, attention_mask, 7))
        pool.close()
        pool.join()  # the worker ends cleanly: a terminated one leaves its temporary folder behind
    here = _mask_in_this_process(ids, attention_mask, 7)
    assert (labels != -100).any() and torch.equal(corrupted, here[0]) and torch.equal(labels, here[1])
