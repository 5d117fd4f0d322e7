"""Shared data helpers: the collate that cuts text padding."""

import torch
from conftest import tiny_config

from beit3.data.common import collate_trimmed
from beit3.modeling_heads import Beit3ForVisualQuestionAnswering


def vqa_items(lengths: list[int], max_length: int = 20, left_padded: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for n in lengths:
        ids, mask = torch.ones(max_length, dtype=torch.long), torch.zeros(max_length, dtype=torch.long)
        real = slice(max_length - n, None) if left_padded else slice(0, n)
        ids[real] = torch.randint(3, 100, (n,), generator=generator)
        mask[real] = 1
        items.append(
            {
                "pixel_values": torch.randn(3, 32, 32, generator=generator),
                "input_ids": ids,
                "attention_mask": mask,
                "labels": torch.rand(5, generator=generator),
                "question_id": torch.tensor(len(items)),
            }
        )
    return items


def test_text_tensors_are_cut_to_the_longest_text_and_nothing_else_changes():
    items = vqa_items([4, 7, 5])
    batch = collate_trimmed(items)
    full = torch.utils.data.default_collate(items)
    assert batch["input_ids"].shape == (3, 7) and batch["attention_mask"].shape == (3, 7)
    assert torch.equal(batch["input_ids"], full["input_ids"][:, :7])
    for key in ("pixel_values", "labels", "question_id"):  # (3, 5) labels are not text: another shape than the mask
        assert torch.equal(batch[key], full[key])


def test_cutting_the_padding_leaves_the_model_output_as_it_was():
    torch.manual_seed(0)
    model = Beit3ForVisualQuestionAnswering(tiny_config(num_labels=5)).eval()
    items = vqa_items([3, 9, 6])
    with torch.no_grad():
        full = model(**{k: v for k, v in torch.utils.data.default_collate(items).items() if k != "question_id"})
        trimmed = model(**{k: v for k, v in collate_trimmed(items).items() if k != "question_id"})
    assert torch.allclose(full.logits, trimmed.logits, atol=1e-5)
    assert torch.allclose(full.loss, trimmed.loss, atol=1e-5)


def test_left_padded_text_is_left_whole():
    items = vqa_items([4, 7], left_padded=True)
    assert collate_trimmed(items)["input_ids"].shape == (2, 20)


def test_a_blind_control_gives_every_item_another_items_image_and_keeps_the_rest():
    import pytest

    from beit3.data.common import ImagesOfOthers

    items = [
        {"pixel_values": torch.full((3, 2, 2), float(i)), "input_ids": torch.tensor([i]), "index": i} for i in range(7)
    ]
    blind = ImagesOfOthers(items, seed=1)
    sources = [int(blind[i]["pixel_values"][0, 0, 0]) for i in range(7)]
    assert sorted(sources) == list(range(7)) and all(source != i for i, source in enumerate(sources))  # a derangement
    assert all(blind[i]["input_ids"].item() == i and blind[i]["index"] == i for i in range(7))
    assert sources == [int(ImagesOfOthers(items, seed=1)[i]["pixel_values"][0, 0, 0]) for i in range(7)]  # seeded
    assert "pixel_values" not in ImagesOfOthers([{"input_ids": 1}, {"input_ids": 2}])[0]  # texts alone pass through
    with pytest.raises(ValueError, match="at least 2"):
        ImagesOfOthers(items[:1])


def test_a_decompression_bomb_is_a_clear_error_naming_the_file(tmp_path, monkeypatch):
    import pytest
    from PIL import Image

    from beit3.data.common import load_rgb

    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 1000
    )  # 10,000 pixels: over twice the limit, as a 30000 x 30000 PNG is at PIL's
    with pytest.raises(ValueError, match=r"bomb\.png.*decompression bombs"):
        load_rgb(path)
    with pytest.raises(ValueError, match="decompression bombs"):
        load_rgb("in a shard", path.read_bytes())


def test_unreadable_training_images_are_replaced_by_the_next_example_and_counted(tmp_path, capsys):
    import pytest
    import torch
    from PIL import Image

    from beit3.data.common import ReplaceUnreadable, collate_trimmed, counted, load_rgb

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), (i * 60, 0, 0)).save(paths[-1])
    paths[1].write_bytes(b"")  # empty
    paths[2].write_bytes(b"\x89PNG\r\n")  # truncated

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, index):
            return {"pixel_values": torch.tensor(list(load_rgb(paths[index]).getpixel((0, 0)))), "index": index}

    items = ReplaceUnreadable(Items())
    assert [items[i]["index"] for i in range(4)] == [0, 3, 3, 3] and [items[i]["skipped_images"] for i in range(4)] == [
        0,
        2,
        1,
        0,
    ]
    err = capsys.readouterr().err
    assert f"Cannot read the image {paths[1]}" in err and f"Cannot read the image {paths[2]}" in err
    batch = counted(collate_trimmed)([items[i] for i in range(4)])
    assert (
        batch["counts"] == {"skipped_images": 3}
        and batch["pixel_values"].shape == (4, 3)
        and "skipped_images" not in batch
    )
    for path in paths:
        path.write_bytes(b"")
    with pytest.raises(RuntimeError, match="16 examples in a row"):
        ReplaceUnreadable(Items())[0]
