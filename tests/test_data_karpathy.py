"""Karpathy splits (COCO, Flickr30k): images and raw captions per split, ids, retrieval and captioning items, errors."""

import json

import pytest
import torch
from conftest import tiny_config, word_tokenizer
from PIL import Image

from beit3 import Beit3ImageProcessor
from beit3.data.common import split_batch
from beit3.data.karpathy import (
    ImageOnlyDataset,
    ImageTextDataset,
    TextOnlyDataset,
    captioning_records,
    pair_list_records,
    read_karpathy,
    retrieval_records,
)
from beit3.modeling_heads import Beit3ForCaptioning, Beit3ForImageTextRetrieval

WORDS = "a man riding horse on the beach dog playing with ball two people street red bus".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS, 32, model_max_length=16)


def sentences(*raw):
    return [
        {"raw": text, "tokens": text.lower().strip(".").split(), "imgid": 0, "sentid": i} for i, text in enumerate(raw)
    ]


def write_coco(root):
    """Five images: train (2), restval (1), val (1), test (1), in train2014/ and val2014/."""
    entries = [
        (
            "train2014",
            "COCO_train2014_000000000009.jpg",
            "train",
            9,
            ["A man riding a horse.", "A horse on the beach."],
        ),
        ("val2014", "COCO_val2014_000000000042.jpg", "test", 42, ["A red bus.", "A bus on the street.", "Two people."]),
        ("train2014", "COCO_train2014_000000000025.jpg", "train", 25, ["A dog playing with a ball."]),
        ("val2014", "COCO_val2014_000000000073.jpg", "restval", 73, ["Two people on the beach."]),
        ("val2014", "COCO_val2014_000000000081.jpg", "val", 81, ["A dog on the street."]),
    ]
    images = []
    for number, (folder, name, split, cocoid, raw) in enumerate(entries):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), (number * 50, 100, 30)).save(root / folder / name)
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "split": split,
                "cocoid": cocoid,
                "imgid": number,
                "sentids": [],
                "sentences": sentences(*raw),
            }
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root / "dataset_coco.json"


def test_coco_splits_captions_and_ids(tmp_path):
    path = write_coco(tmp_path)
    train = read_karpathy(path, tmp_path, "train")
    assert [(im.index, im.source_id) for im in train] == [
        (0, 9),
        (1, 25),
        (2, 73),
    ]  # restval joins train, in file order
    assert train[0].image_path == str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    assert train[0].captions == ["A man riding a horse.", "A horse on the beach."]  # raw text, not Karpathy's tokens
    assert [im.source_id for im in read_karpathy(path, tmp_path, "train", include_restval=False)] == [9, 25]
    test = read_karpathy(path, tmp_path, "test")
    assert [(im.index, im.source_id) for im in test] == [(0, 42)]

    retrieval = retrieval_records(train)
    assert [(r.image_id, r.caption) for r in retrieval] == [
        (0, "A man riding a horse."),
        (0, "A horse on the beach."),
        (1, "A dog playing with a ball."),
        (2, "Two people on the beach."),
    ]
    assert [(r.image_id, r.caption) for r in captioning_records(train, train=True)][:2] == [
        (9, "A man riding a horse."),
        (9, "A horse on the beach."),
    ]
    evaluation = captioning_records(test, train=False)
    assert len(evaluation) == 1 and evaluation[0].image_id == 42 and evaluation[0].caption is None
    assert evaluation[0].references == ["A red bus.", "A bus on the street.", "Two people."]
    with pytest.raises(ValueError, match="split must be one of"):
        read_karpathy(path, tmp_path, "restval")


def test_flickr30k_images_sit_in_one_folder(tmp_path):
    folder = tmp_path / "flickr30k-images"
    folder.mkdir()
    images = []
    for number, split in enumerate(["train", "test", "test", "val"]):
        Image.new("RGB", (30, 30), (number * 60, 0, 0)).save(folder / f"{1000 + number}.jpg")
        images.append(
            {
                "filename": f"{1000 + number}.jpg",
                "split": split,
                "imgid": number,
                "sentences": sentences(f"caption {number}"),
            }
        )
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    test = read_karpathy(tmp_path / "dataset_flickr30k.json", folder, "test")
    assert [(im.index, im.source_id, im.image_path) for im in test] == [
        (0, 1, str(folder / "1001.jpg")),
        (1, 2, str(folder / "1002.jpg")),
    ]


def test_retrieval_items_feed_the_dual_encoder(tmp_path, tokenizer):
    path = write_coco(tmp_path)
    train = read_karpathy(path, tmp_path, "train")
    processor = Beit3ImageProcessor(size=32)
    pairs = ImageTextDataset(retrieval_records(train), processor, tokenizer, max_length=16)
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=4)))
    inputs, metadata = split_batch(batch)
    assert inputs["pixel_values"].shape == (4, 3, 32, 32) and inputs["input_ids"].shape == (4, 16)
    assert metadata["image_id"].tolist() == [0, 0, 1, 2]
    model = Beit3ForImageTextRetrieval(tiny_config(vocab_size=len(tokenizer)))
    out = model(**inputs, return_loss=True)
    assert out.logits_per_image.shape == (4, 4) and torch.isfinite(out.loss)

    images = next(iter(torch.utils.data.DataLoader(ImageOnlyDataset(train, processor), batch_size=3)))
    texts = next(
        iter(torch.utils.data.DataLoader(TextOnlyDataset(retrieval_records(train), tokenizer, 16), batch_size=4))
    )
    assert images["pixel_values"].shape == (3, 3, 32, 32) and images["image_id"].tolist() == [0, 1, 2]
    assert texts["image_id"].tolist() == [0, 0, 1, 2] and set(texts) == {"input_ids", "attention_mask", "image_id"}
    assert model.get_image_features(images["pixel_values"]).pooler_output.shape == (3, 32)
    assert torch.equal(texts["input_ids"], inputs["input_ids"])


def test_captioning_items_feed_the_captioning_head(tmp_path, tokenizer):
    path = write_coco(tmp_path)
    train = captioning_records(read_karpathy(path, tmp_path, "train"), train=True)
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                ImageTextDataset(train, Beit3ImageProcessor(size=32), tokenizer, 16), batch_size=2
            )
        )
    )
    inputs, metadata = split_batch(batch)
    assert metadata["image_id"].tolist() == [9, 9]
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 2] = inputs["input_ids"][:, 2]  # the masking collator's job; here one position by hand
    model = Beit3ForCaptioning(tiny_config(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id))
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (2, 16, len(tokenizer)) and torch.isfinite(out.loss)
    test = captioning_records(read_karpathy(path, tmp_path, "test"), train=False)
    item = ImageOnlyDataset(test, Beit3ImageProcessor(size=32))[0]
    assert int(item["image_id"]) == 42 and item["pixel_values"].shape == (3, 32, 32)


def test_missing_and_corrupt_images_and_empty_captions(tmp_path, tokenizer):
    path = write_coco(tmp_path)
    (tmp_path / "train2014" / "COCO_train2014_000000000025.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match="1 train images of dataset_coco.json not found: .*COCO_train2014_000000000025.jpg"
    ):
        read_karpathy(path, tmp_path, "train")
    assert len(read_karpathy(path, tmp_path, "train", check_images=False)) == 3
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"GIF89a truncated")
    data = ImageOnlyDataset(read_karpathy(path, tmp_path, "test"), Beit3ImageProcessor(size=32))
    with pytest.raises(ValueError, match="Cannot read the image .*COCO_val2014_000000000042.jpg"):
        data[0]
    content = json.loads(path.read_text())
    content["images"][4]["sentences"][0]["raw"] = " "
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="A caption of COCO_val2014_000000000081.jpg .* empty text"):
        read_karpathy(path, tmp_path, "val")


def test_pair_lists_give_contrastive_records_with_one_id_per_image(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / "images" / name)
    lines = [
        {"image": "images/a.png", "text": "a red circle"},
        {"image": "images/b.png", "text": "a blue square"},
        {"image": "images/a.png", "text": "there is a red circle"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = pair_list_records([tmp_path / "pairs.jsonl"])
    assert [(r.image_id, r.image_path, r.caption) for r in records] == [
        (0, str(tmp_path / "images" / "a.png"), "a red circle"),
        (1, str(tmp_path / "images" / "b.png"), "a blue square"),
        (0, str(tmp_path / "images" / "a.png"), "there is a red circle"),
    ]
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 images of the pair lists"):
        pair_list_records([tmp_path / "pairs.jsonl"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "images/a.png", "caption": "wrong field"}) + "\n")
    with pytest.raises(ValueError, match="hold no usable pairs"):
        pair_list_records([tmp_path / "bad.jsonl"])
    # One rule with pretraining's pair kind: a bad line among good ones is skipped and named, not fatal.
    (tmp_path / "mixed.jsonl").write_text(
        json.dumps(lines[0]) + "\n" + json.dumps({"image": "images/a.png", "text": " "}) + "\n"
    )
    assert [r.caption for r in pair_list_records([tmp_path / "mixed.jsonl"])] == ["a red circle"]
    assert "mixed.jsonl:2" in capsys.readouterr().err


def test_a_users_datasets_dataset_of_images_and_captions_feeds_retrieval(tokenizer):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    data = Dataset.from_dict(
        {
            "image": [Image.new("RGB", (40, 30), (60 * i, 90, 30)) for i in range(3)],
            "text": ["a dog on a table", "two cats", "a red bus"],
        }
    ).cast_column("image", ImageFeature())
    pairs = ImageTextDataset(data, Beit3ImageProcessor(size=32), tokenizer, max_length=16, text_column="text")
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=3)))
    inputs, metadata = split_batch(batch)
    assert inputs["pixel_values"].shape == (3, 3, 32, 32) and metadata["image_id"].tolist() == [0, 1, 2]
    assert inputs["input_ids"][2].tolist() == tokenizer("a red bus", padding="max_length", max_length=16)["input_ids"]
    out = Beit3ForImageTextRetrieval(tiny_config(vocab_size=len(tokenizer)))(**inputs, return_loss=True)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="The record of image 1 has an empty text"):
        ImageTextDataset(
            data.map(lambda row, i: {"text": " " if i == 1 else row["text"]}, with_indices=True),
            Beit3ImageProcessor(size=32),
            tokenizer,
            text_column="text",
        )
