"""The pretraining mixture: every kind in every batch, determinism by step, corrupt images, webdataset shards."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from beit3 import train_sentencepiece
from beit3.data.pretraining import PretrainingBatches, load_sources
from beit3.data.synthetic import write_shapes_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture")
    paths = write_shapes_world(folder, 24)
    tokenizer = train_sentencepiece(folder / "tok", vocab_size=36, files=[paths["texts"]], model_max_length=32, quiet=True)
    return paths, tokenizer


def batches(sources, tokenizer, **kwargs):
    return PretrainingBatches(sources, {"image": 3, "text": 3, "pair": 3}, tokenizer, image_size=64, patch_size=8, max_text_length=32,
                              **kwargs)


def test_every_batch_has_all_kinds_with_masks(world):
    paths, tokenizer = world
    batch = batches(load_sources(paths["images"], [paths["texts"]], [paths["pairs"]]), tokenizer)[0]
    assert batch["image"]["pixel_values"].shape == (3, 3, 64, 64) and batch["image"]["bool_masked_pos"].shape == (3, 64)
    assert (batch["image"]["bool_masked_pos"].sum(-1) == round(64 * 75 / 196)).all()
    assert 0 <= batch["image"]["tokenizer_pixel_values"].min() and batch["image"]["tokenizer_pixel_values"].max() <= 1
    for kind in ("text", "pair"):
        chosen = batch[kind]["labels"] != -100
        assert chosen.any() and batch[kind]["input_ids"].shape == (3, 32)
    pair_rate = (batch["pair"]["labels"] != -100).sum() / (batch["pair"]["attention_mask"].sum() - 6)
    text_rate = (batch["text"]["labels"] != -100).sum() / (batch["text"]["attention_mask"].sum() - 6)
    assert pair_rate > text_rate  # 50% of pair text against 15% of plain text


def test_batches_depend_only_on_seed_step_and_rank(world):
    paths, tokenizer = world
    sources = load_sources(paths["images"], [paths["texts"]], [paths["pairs"]])
    a = batches(sources, tokenizer, seed=1)[5]
    b = batches(sources, tokenizer, seed=1, start_step=5)[0]  # a resumed run starting at step 5
    for kind in ("image", "text", "pair"):
        for key, value in a[kind].items():
            assert torch.equal(value, b[kind][key]), (kind, key)
    other_rank = batches(sources, tokenizer, seed=1, rank=1, world_size=2)[5]
    assert not torch.equal(other_rank["image"]["pixel_values"], a["image"]["pixel_values"])


def test_corrupt_images_are_replaced_and_counted(world, tmp_path):
    paths, tokenizer = world
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 60, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    sources = load_sources(folder)
    data = PretrainingBatches(sources, {"image": 5}, tokenizer, image_size=64, patch_size=8)
    total = sum(int(data[step]["skipped"][0]) for step in range(4))
    assert total == 4  # the broken file comes up once per pass over 5 images


def test_webdataset_shards_give_pairs(world, tmp_path):
    paths, tokenizer = world
    shard = tmp_path / "pairs-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            buffer = io.BytesIO()
            Image.new("RGB", (48, 48), (0, 80 * i, 0)).save(buffer, format="JPEG")
            for name, data in ((f"s{i}.jpg", buffer.getvalue()), (f"s{i}.txt", f"a big green square number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sources = load_sources(pairs=[str(shard), str(paths["pairs"])])
    assert len(sources["pair"]) == 3 + 24
    data = PretrainingBatches(sources, {"pair": 27}, tokenizer, image_size=64, patch_size=8)
    assert data[0]["pair"]["pixel_values"].shape == (27, 3, 64, 64) and int(data[0]["skipped"][2]) == 0


def test_empty_or_missing_sources_are_refused(world, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="image source is empty"):
        load_sources(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="No image folder"):
        load_sources(tmp_path / "missing")
    with pytest.raises(ValueError, match="No pretraining data"):
        load_sources()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png"}) + "\nnot json\n")
    with pytest.raises(ValueError, match="pair source is empty"):
        load_sources(pairs=[str(bad)])
