"""VQAv2 reader: normalization, answer vocabulary, soft scores, out-of-vocabulary counts, images, the Dataset feeding the head."""

import json

import pytest
import torch
from conftest import tiny_config, train_with_transformers_trainer, word_tokenizer
from PIL import Image

from beit3 import Beit3ImageProcessor
from beit3.data.common import split_batch
from beit3.data.vqa import (
    VqaDataset,
    VqaDatasetRecords,
    answers_from_records,
    build_answer_vocabulary,
    insert_answer_slot,
    label_to_answer,
    read_answer2label,
    read_vqa,
    read_vqa_index,
    write_answer2label,
)
from beit3.data.vqa_answers import answer_score
from beit3.modeling_heads import Beit3ForVisualQuestionAnswering

WORDS = "what color is the bus how many dogs are there red two yes no cat on a table".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS, 40, model_max_length=16)


def image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (seed * 50 % 256, 80, 120)).save(path)


def annotation(question_id, image_id, multiple_choice, answers):
    return {
        "question_id": question_id,
        "image_id": image_id,
        "multiple_choice_answer": multiple_choice,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


def write_vqa(root):
    """Train: 3 questions (Q3 has no answer in the vocabulary), val: 4, test-dev: 1; every image but Q3's."""
    train_questions = [
        {"image_id": 1, "question": "What color is the bus?", "question_id": 10},
        {"image_id": 1, "question": "How many dogs are there?", "question_id": 11},
        {"image_id": 2, "question": "Is there a cat?", "question_id": 12},
    ]
    train_annotations = [
        annotation(10, 1, "Red", ["red"] * 4 + ["blue"] * 3 + ["dark red"] * 2 + ["red."]),
        annotation(11, 1, "two", ["2"] * 3 + ["yes"] + ["no"] * 6),
        annotation(12, 2, "yes", ["purple"] * 10),
    ]
    val_questions = [
        {"image_id": 3, "question": q, "question_id": i}
        for i, q in ((20, "What color?"), (21, "How many?"), (22, "Is it on a table?"), (23, "Is it red?"))
    ]
    val_annotations = [
        annotation(20, 3, "red.", ["yes"] * 2 + ["red"] * 8),
        annotation(21, 3, "2", ["2"] * 10),
        annotation(22, 3, "yes", ["yes"] * 10),
        annotation(23, 3, "no", ["no"] * 10),
    ]
    files = {
        "train_q": (
            "v2_OpenEnded_mscoco_train2014_questions.json",
            {"data_subtype": "train2014", "questions": train_questions},
        ),
        "train_a": ("v2_mscoco_train2014_annotations.json", {"annotations": train_annotations}),
        "val_q": (
            "v2_OpenEnded_mscoco_val2014_questions.json",
            {"data_subtype": "val2014", "questions": val_questions},
        ),
        "val_a": ("v2_mscoco_val2014_annotations.json", {"annotations": val_annotations}),
        "testdev_q": (
            "v2_OpenEnded_mscoco_test-dev2015_questions.json",
            {
                "data_subtype": "test-dev2015",
                "questions": [{"image_id": 7, "question": "What is on the table?", "question_id": 70}],
            },
        ),
    }
    paths = {}
    for key, (name, content) in files.items():
        paths[key] = root / name
        paths[key].write_text(json.dumps(content))
    image(root / "train2014" / "COCO_train2014_000000000001.jpg", 1)
    image(root / "val2014" / "COCO_val2014_000000000003.jpg", 3)
    image(root / "test2015" / "COCO_test2015_000000000007.jpg", 7)
    return paths


def test_vocabulary_soft_scores_and_out_of_vocabulary_counts(tmp_path):
    paths = write_vqa(tmp_path)
    # multiple-choice answers, normalized: red 2 yes | red 2 yes no -> red, 2, yes seen twice; "no" once
    vocabulary = build_answer_vocabulary([paths["train_a"], paths["val_a"]], min_count=2)
    assert vocabulary == {"red": 0, "2": 1, "yes": 2}

    train = read_vqa(paths["train_q"], tmp_path, paths["train_a"], vocabulary)
    # Q10: red x4 -> 1.0; blue x3, "dark red" x2 and the raw "red." (not normalized, as the recipe counts) are outside: 6
    # Q11: "2" x3 -> 0.9, yes x1 -> 0.3; no x6 outside: 6.  Q12: purple x10 outside, dropped with its (missing) image: 10
    assert [(r.question_id, r.labels, r.scores) for r in train.records] == [(10, [0], [1.0]), (11, [1, 2], [0.9, 0.3])]
    assert (train.out_of_vocabulary_answers, train.dropped_questions) == (22, 1)
    assert train.records[0].image_path == str(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
    assert train.records[0].question == "What color is the bus?" and len(train.records[0].answers) == 10
    kept = read_vqa(paths["train_q"], tmp_path, paths["train_a"], vocabulary, drop_unlabeled=False, check_images=False)
    assert [r.question_id for r in kept.records] == [10, 11, 12] and kept.records[2].labels == []
    assert answers_from_records(train.records)[11] == ["2"] * 3 + ["yes"] + ["no"] * 6

    write_answer2label(tmp_path / "answer2label.txt", vocabulary)
    assert json.loads((tmp_path / "answer2label.txt").read_text().splitlines()[1]) == {"answer": "2", "label": 1}
    assert read_answer2label(tmp_path / "answer2label.txt") == vocabulary and label_to_answer(vocabulary) == [
        "red",
        "2",
        "yes",
    ]
    (tmp_path / "bad.txt").write_text('{"answer": "red", "label": 0}\n{"answer": "2", "label": 5}\n')
    with pytest.raises(ValueError, match="not 0..1"):
        read_answer2label(tmp_path / "bad.txt")


def test_test_dev_questions_use_test2015_images_and_have_no_labels(tmp_path, tokenizer):
    paths = write_vqa(tmp_path)
    records = read_vqa(paths["testdev_q"], tmp_path).records
    assert (
        records[0].image_path == str(tmp_path / "test2015" / "COCO_test2015_000000000007.jpg")
        and records[0].labels == []
    )
    item = VqaDataset(records, Beit3ImageProcessor(size=32), tokenizer, num_labels=3)[0]
    assert (
        set(item) == {"pixel_values", "input_ids", "attention_mask", "question_id"} and int(item["question_id"]) == 70
    )


def test_missing_corrupt_images_and_empty_questions_are_reported(tmp_path, tokenizer):
    paths = write_vqa(tmp_path)
    vocabulary = {"red": 0, "2": 1, "yes": 2}
    missing = tmp_path / "val2014" / "COCO_val2014_000000000003.jpg"
    missing.unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"1 VQA images of v2_OpenEnded_mscoco_val2014_questions.json not found: .*"
        + "COCO_val2014_000000000003.jpg",
    ):
        read_vqa(paths["val_q"], tmp_path, paths["val_a"], vocabulary)
    missing.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    records = read_vqa(paths["val_q"], tmp_path, paths["val_a"], vocabulary).records
    with pytest.raises(ValueError, match="Cannot read the image .*COCO_val2014_000000000003.jpg"):
        VqaDataset(records, Beit3ImageProcessor(size=32), tokenizer, num_labels=3)[0]

    questions = json.loads(paths["val_q"].read_text())
    questions["questions"][1]["question"] = "  "
    paths["val_q"].write_text(json.dumps(questions))
    with pytest.raises(ValueError, match="Question 21 .* empty text"):
        read_vqa(paths["val_q"], tmp_path, paths["val_a"], vocabulary)
    with pytest.raises(ValueError, match="answer vocabulary"):
        read_vqa(paths["train_q"], tmp_path, paths["train_a"])


def test_dataset_feeds_the_vqa_head(tmp_path, tokenizer):
    paths = write_vqa(tmp_path)
    vocabulary = build_answer_vocabulary([paths["train_a"], paths["val_a"]], min_count=2)
    records = read_vqa(paths["train_q"], tmp_path, paths["train_a"], vocabulary).records
    data = VqaDataset(records, Beit3ImageProcessor(size=32), tokenizer, num_labels=len(vocabulary), max_length=16)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    inputs, metadata = split_batch(batch)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32) and inputs["input_ids"].shape == inputs[
        "attention_mask"
    ].shape == (2, 16)
    assert torch.allclose(inputs["labels"], torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.9, 0.3]]))
    assert metadata["question_id"].tolist() == [10, 11]
    assert (
        inputs["input_ids"][1].tolist()
        == tokenizer("How many dogs are there?", padding="max_length", max_length=16)["input_ids"]
    )
    model = Beit3ForVisualQuestionAnswering(tiny_config(vocab_size=len(tokenizer), num_labels=len(vocabulary)))
    out = model(**inputs)
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    out.loss.backward()


def test_official_index_files(tmp_path, tokenizer):
    write_vqa(tmp_path)
    rows = [
        {
            "image_path": "train2014/COCO_train2014_000000000001.jpg",
            "text_segment": [5, 6, 7],
            "labels": [0, 2],
            "scores": [1.0, 0.3],
            "qid": 10,
        },
        {
            "image_path": "test2015/COCO_test2015_000000000007.jpg",
            "text_segment": [8],
            "labels": [],
            "scores": [],
            "qid": 70,
        },
    ]
    (tmp_path / "vqa.train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_vqa_index(tmp_path / "vqa.train.jsonl", tmp_path)
    assert [(r.question_id, r.labels, r.scores, r.text_ids) for r in records] == [
        (10, [0, 2], [1.0, 0.3], [5, 6, 7]),
        (70, [], [], [8]),
    ]
    item = VqaDataset(records, Beit3ImageProcessor(size=32), tokenizer, num_labels=3, max_length=6)[0]
    assert item["input_ids"].tolist() == [0, 5, 6, 7, 2, 1] and item["attention_mask"].tolist() == [1, 1, 1, 1, 1, 0]
    assert item["labels"].tolist() == pytest.approx([1.0, 0.0, 0.3])
    (tmp_path / "vqa.bad.jsonl").write_text(json.dumps({**rows[0], "text_segment": []}) + "\n")
    with pytest.raises(ValueError, match="empty text_segment"):
        read_vqa_index(tmp_path / "vqa.bad.jsonl", tmp_path)


def test_transformers_trainer_trains_the_vqa_head_on_the_dataset(tmp_path, tokenizer):
    paths = write_vqa(tmp_path)
    vocabulary = build_answer_vocabulary([paths["train_a"], paths["val_a"]], min_count=2)
    records = read_vqa(paths["train_q"], tmp_path, paths["train_a"], vocabulary).records
    data = VqaDataset(records, Beit3ImageProcessor(size=32), tokenizer, num_labels=len(vocabulary), max_length=16)
    model = Beit3ForVisualQuestionAnswering(tiny_config(vocab_size=len(tokenizer), num_labels=len(vocabulary)))
    train_with_transformers_trainer(
        model, data, tmp_path / "trainer"
    )  # question_id is dropped as a column the model does not take


def test_the_answer_slot_goes_before_the_end_of_each_question_and_the_text_keeps_its_length(tmp_path, tokenizer):
    ids, mask = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 5, 6, 7, 8, 2]]), torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    slotted = insert_answer_slot(ids, mask, 99)
    assert slotted["input_ids"].tolist() == [[0, 5, 6, 99, 2, 1, 1], [0, 5, 6, 7, 8, 99, 2]]
    assert slotted["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert insert_answer_slot(ids[0], mask[0], 99)["input_ids"].tolist() == [0, 5, 6, 99, 2, 1, 1]
    with pytest.raises(ValueError, match="at least <s> and </s>"):
        insert_answer_slot(ids, torch.zeros_like(mask), 99)

    paths = write_vqa(tmp_path)
    vocabulary = build_answer_vocabulary([paths["train_a"], paths["val_a"]], min_count=2)
    records = read_vqa(paths["train_q"], tmp_path, paths["train_a"], vocabulary).records
    for length in (16, 5):  # room to spare, and a question cut short to keep its slot
        item = VqaDataset(
            records, Beit3ImageProcessor(size=32), tokenizer, len(vocabulary), max_length=length, answer_slot=True
        )[1]
        plain = tokenizer("How many dogs are there?", truncation=True, max_length=length - 1)["input_ids"]
        assert item["input_ids"].tolist()[: len(plain) + 1] == plain[:-1] + [
            tokenizer.mask_token_id,
            tokenizer.eos_token_id,
        ]
        assert item["input_ids"].shape == (length,) and int(item["attention_mask"].sum()) == len(plain) + 1
    model = Beit3ForVisualQuestionAnswering(
        tiny_config(
            vocab_size=len(tokenizer),
            num_labels=len(vocabulary),
            vqa_head="answer_slot",
            mask_token_id=tokenizer.mask_token_id,
        )
    )
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                VqaDataset(
                    records, Beit3ImageProcessor(size=32), tokenizer, len(vocabulary), max_length=16, answer_slot=True
                ),
                batch_size=2,
            )
        )
    )
    assert torch.isfinite(model(**split_batch(batch)[0]).loss)


def test_a_users_datasets_dataset_feeds_vqa_with_soft_scores_from_its_answers(tokenizer):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    answers = [
        [{"answer": "red"}] * 7 + [{"answer": "Red."}, {"answer": "blue"}, {"answer": "blue"}],  # VQAv2's layout
        [{"answer": "3"}] * 3 + [{"answer": "three"}] * 3 + [{"answer": "2"}] * 4,
        [{"answer": "cat"}] * 10,
    ]
    data = Dataset.from_dict(
        {
            "image": [Image.new("RGB", (40, 30), (80 * i, 90, 30)) for i in range(3)],
            "question": ["what color is it?", "how many dogs?", "what animal?"],
            "answers": answers,
            "qid": [7, 8, 9],
        }
    ).cast_column("image", ImageFeature())
    records = VqaDatasetRecords(data, {"red": 0, "blue": 1, "2": 2, "3": 3}, question_id="qid")
    assert len(records) == 2 and records.dropped_questions == 1  # "cat" is outside the vocabulary
    first = records[0]
    assert first.question_id == 7 and sorted(zip(first.labels, first.scores)) == [(0, 1.0), (1, answer_score(2))]
    # Counted as written, as read_vqa and the official recipe count them: "three" is not "3" here.
    assert sorted(zip(records[1].labels, records[1].scores)) == [(2, 1.0), (3, answer_score(3))]
    single = VqaDatasetRecords(
        data.map(lambda row: {"answers": row["answers"][0]["answer"]}, remove_columns=["answers"])
    )
    assert len(single) == 3 and single.answer2label == {"red": 0, "3": 1, "cat": 2} and single[2].scores == [1.0]
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                VqaDataset(records, Beit3ImageProcessor(size=32), tokenizer, 4, max_length=16), batch_size=2
            )
        )
    )
    inputs, metadata = split_batch(batch)
    assert metadata["question_id"].tolist() == [7, 8] and inputs["labels"][0].tolist() == pytest.approx(
        [1.0, answer_score(2), 0.0, 0.0]
    )
    out = Beit3ForVisualQuestionAnswering(tiny_config(vocab_size=len(tokenizer), num_labels=4))(**inputs)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"no column 'answer'.*its columns are"):
        VqaDatasetRecords(data, answers="answer")
