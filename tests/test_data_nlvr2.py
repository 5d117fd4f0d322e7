"""NLVR2 reader: lil-lab JSON Lines and the official index, image pairs, errors, the Dataset feeding the head."""

import json
import random

import pytest
import torch
from conftest import tiny_config, word_tokenizer
from PIL import Image

from beit3 import Beit3ImageProcessor
from beit3.data.common import split_batch
from beit3.data.nlvr2 import Nlvr2Dataset, Nlvr2DatasetRecords, pair_image_names, read_nlvr2, read_nlvr2_index
from beit3.modeling_heads import Beit3ForVisualReasoning

WORDS = "the left image contains two dogs one cat and right has exactly at least a bird".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS, 32, model_max_length=16)


def line(identifier, sentence, label, **extra):
    # The lil-lab files carry more fields, with worker ids as keys that differ from line to line.
    return json.dumps(
        {
            "validation": {f"worker{random.randint(0, 99)}": "True"},
            "sentence": sentence,
            "label": label,
            "identifier": identifier,
            "synset": "dog",
            "query": "dogs",
            **extra,
        }
    )


def write_split(root, name, rows, directory=None):
    """Writes ``<name>.json`` and the image pair of each row (in ``<root>/<name>/<directory>/`` when given)."""
    for number, row in enumerate(rows):
        identifier = json.loads(row)["identifier"]
        folder = root / name / str(directory) if directory is not None else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for side, filename in enumerate(pair_image_names(identifier)):
            Image.new("RGB", (36 + side * 8, 30), (number * 40, side * 200, 90)).save(folder / filename)
    (root / f"{name}.json").write_text("\n".join(rows) + "\n")
    return root / f"{name}.json"


def test_identifiers_give_the_pair_of_images():
    assert pair_image_names("train-10171-0-0") == ("train-10171-0-img0.png", "train-10171-0-img1.png")
    assert pair_image_names("dev-850-0-3") == ("dev-850-0-img0.png", "dev-850-0-img1.png")


def test_reads_lil_lab_files_with_train_subfolders(tmp_path):
    rows = [
        line("train-1-0-0", "The left image contains two dogs.", "True", directory=3),
        line("train-1-0-1", "The right image has exactly one cat.", "False", directory=3),
    ]
    records = read_nlvr2(write_split(tmp_path, "train", rows, directory=3), tmp_path / "train")
    assert [(r.identifier, r.label) for r in records] == [("train-1-0-0", 1), ("train-1-0-1", 0)]
    assert records[0].image_paths == (
        str(tmp_path / "train" / "3" / "train-1-0-img0.png"),
        str(tmp_path / "train" / "3" / "train-1-0-img1.png"),
    )
    assert (
        records[1].image_paths == records[0].image_paths and records[0].sentence == "The left image contains two dogs."
    )


def test_dataset_gives_an_image_pair_and_feeds_the_head(tmp_path, tokenizer):
    rows = [
        line("dev-5-1-0", "There are two dogs.", "True"),
        line("dev-6-0-0", "A bird on the right.", "False"),
        line("dev-6-0-1", "at least one cat", "True"),
    ]
    records = read_nlvr2(write_split(tmp_path, "dev", rows), tmp_path / "dev")
    data = Nlvr2Dataset(records, Beit3ImageProcessor(size=32), tokenizer, max_length=16)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=3)))
    inputs, metadata = split_batch(batch)
    assert inputs["pixel_values"].shape == (3, 2, 3, 32, 32) and inputs["input_ids"].shape == (3, 16)
    assert inputs["labels"].tolist() == [1, 0, 1] and metadata["identifier"] == ["dev-5-1-0", "dev-6-0-0", "dev-6-0-1"]
    assert not torch.equal(inputs["pixel_values"][0, 0], inputs["pixel_values"][0, 1])  # two different images, in order
    model = Beit3ForVisualReasoning(tiny_config(vocab_size=len(tokenizer), num_labels=2))
    out = model(**inputs)
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)


def test_missing_and_corrupt_images_empty_sentences_and_bad_labels(tmp_path, tokenizer):
    rows = [line("dev-5-1-0", "There are two dogs.", "True"), line("dev-6-0-0", "A bird on the right.", "False")]
    path = write_split(tmp_path, "dev", rows)
    (tmp_path / "dev" / "dev-6-0-img1.png").unlink()
    (tmp_path / "dev" / "dev-5-1-img0.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"2 NLVR2 images of dev.json not found: .*dev-5-1-img0.png, .*dev-6-0-img1.png"
    ):
        read_nlvr2(path, tmp_path / "dev")
    path = write_split(tmp_path, "dev", rows)
    (tmp_path / "dev" / "dev-6-0-img1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data = Nlvr2Dataset(read_nlvr2(path, tmp_path / "dev"), Beit3ImageProcessor(size=32), tokenizer)
    assert data[0]["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="Cannot read the image .*dev-6-0-img1.png"):
        data[1]
    with pytest.raises(ValueError, match=r"dev.json:2 \(dev-6-0-0\) has an empty text"):
        read_nlvr2(write_split(tmp_path, "dev", [rows[0], line("dev-6-0-0", "", "False")]), tmp_path / "dev")
    with pytest.raises(ValueError, match="label 'maybe'"):
        read_nlvr2(write_split(tmp_path, "dev", [line("dev-6-0-0", "a cat", "maybe")]), tmp_path / "dev")


def test_official_index(tmp_path, tokenizer):
    write_split(tmp_path, "dev", [line("dev-5-1-0", "x", "True")])
    row = {
        "image_path": "dev/dev-5-1-img0.png",
        "image2_path": "dev/dev-5-1-img1.png",
        "text_segment": [4, 5],
        "label": 1,
        "identifier": "dev-5-1-0",
    }
    (tmp_path / "nlvr2.dev.index.jsonl").write_text(json.dumps(row) + "\n")
    records = read_nlvr2_index(tmp_path / "nlvr2.dev.index.jsonl", tmp_path)
    assert records[0].image_paths == (str(tmp_path / "dev/dev-5-1-img0.png"), str(tmp_path / "dev/dev-5-1-img1.png"))
    item = Nlvr2Dataset(records, Beit3ImageProcessor(size=32), tokenizer, max_length=5)[0]
    assert item["input_ids"].tolist() == [0, 4, 5, 2, 1] and int(item["labels"]) == 1
    (tmp_path / "nlvr2.bad.index.jsonl").write_text(
        json.dumps({k: v for k, v in row.items() if k != "image2_path"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"no field\(s\) \['image2_path'\]"):
        read_nlvr2_index(tmp_path / "nlvr2.bad.index.jsonl", tmp_path)


def test_a_users_datasets_dataset_of_image_pairs_feeds_the_head(tokenizer):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    data = Dataset.from_dict(
        {
            "left_image": [Image.new("RGB", (40, 30), (80 * i, 90, 30)) for i in range(3)],
            "right_image": [Image.new("RGB", (30, 40), (30, 80 * i, 90)) for i in range(3)],
            "sentence": ["there are two dogs", "one cat", "no birds"],
            "label": [True, False, True],
        }
    )
    data = data.cast_column("left_image", ImageFeature()).cast_column("right_image", ImageFeature())
    records = Nlvr2DatasetRecords(data)
    assert [(r.identifier, r.label) for r in records] == [("0", 1), ("1", 0), ("2", 1)]
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                Nlvr2Dataset(records, Beit3ImageProcessor(size=32), tokenizer, max_length=16), batch_size=3
            )
        )
    )
    inputs, metadata = split_batch(batch)
    assert inputs["pixel_values"].shape == (3, 2, 3, 32, 32) and inputs["labels"].tolist() == [1, 0, 1]
    assert not torch.equal(
        inputs["pixel_values"][1, 0], inputs["pixel_values"][1, 1]
    )  # left and right are their own images
    assert torch.isfinite(Beit3ForVisualReasoning(tiny_config(vocab_size=len(tokenizer)))(**inputs).loss)
    with pytest.raises(ValueError, match=r"Row 1 has label 'maybe'"):
        Nlvr2DatasetRecords(
            data.map(lambda row, i: {"label": "maybe" if i == 1 else str(row["label"])}, with_indices=True)
        )[1]
