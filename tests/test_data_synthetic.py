"""The generated task world: every file goes through the real readers, and the answers and labels agree with the scenes."""

import json
import random
import re
from collections import Counter

import pytest

from beit3.data.imagenet import read_image_folder
from beit3.data.karpathy import read_karpathy
from beit3.data.nlvr2 import read_nlvr2
from beit3.data.sources import load_sources
from beit3.data.synthetic import (
    CLASSES,
    COLORS,
    SHAPES,
    SLOTS,
    caption,
    pair_statement,
    write_shapes_world,
    write_task_world,
)
from beit3.data.vqa import build_answer_vocabulary, read_vqa
from beit3.data.vqa_answers import normalize_answer

SMALL = dict(
    pretrain_images=20,
    train_images=30,
    val_images=10,
    test_images=10,
    nlvr2_train=20,
    nlvr2_dev=10,
    classification_train=36,
    classification_val=18,
)
JSON_OUTPUTS = (
    "karpathy",
    "vqa_train_questions",
    "vqa_train_annotations",
    "vqa_val_questions",
    "vqa_val_annotations",
    "nlvr2_train",
    "nlvr2_dev",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_task_world(tmp_path_factory.mktemp("world"), seed=3, **SMALL)


def parse_caption(text):
    """The scene back from a caption: [(size, color, kind, slot word)], in caption order."""
    assert text.startswith("a ")
    shapes = []
    for part in text[2:].split(" and a "):
        size, color, kind, *slot = part.split()
        shapes.append((size, color, kind, slot[-1]))
    return shapes


def answer(question, scene):
    """An answer derived from the caption's scene, independently of the generator."""
    if m := re.fullmatch(r"what color is the shape (?:on|at) the (\w+)\?", question):
        return next(color for _, color, _, slot in scene if slot == m[1])
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (color,) = [color for _, color, kind, _ in scene if kind == m[1]]
        return color
    if m := re.fullmatch(r"what shape is (?:on|at) the (\w+)\?", question):
        return next(kind for _, _, kind, slot in scene if slot == m[1])
    if question == "how many shapes are there?":
        return str(len(scene))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(color == m[1] for _, color, _, _ in scene))
    if m := re.fullmatch(r"where is the (?:(\w+) )?(\w+) (\w+)\?", question):
        (slot,) = [
            slot for size, color, kind, slot in scene if (m[1] in (None, size)) and (color, kind) == (m[2], m[3])
        ]
        return slot
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((color, kind) == (m[1], m[2]) for _, color, kind, _ in scene) else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_karpathy_splits_and_captions(world):
    counts = {}
    for split in ("train", "val", "test"):
        images = read_karpathy(world["karpathy"], image_root=world["coco_root"], split=split)
        counts[split] = len(images)
        for image in images:
            assert len(image.captions) == 2 and image.captions[0] != image.captions[1]
            assert sorted(image.captions[0].split()) == sorted(image.captions[1].replace("there is ", "").split())
            folder = "train2014" if split == "train" else "val2014"
            assert image.image_path.endswith(f"{folder}/COCO_{folder}_{image.source_id:012d}.jpg")
    assert counts == {"train": 30, "val": 10, "test": 10}
    data = json.loads(world["karpathy"].read_text())
    assert data["dataset"] == "coco"
    assert [im["cocoid"] for im in data["images"]] == list(range(1, 51))
    assert all(s["tokens"] == s["raw"].split() for im in data["images"] for s in im["sentences"])


def test_vqa_answers_agree_with_the_scene(world):
    scenes = {
        im["cocoid"]: parse_caption(im["sentences"][0]["raw"])
        for im in json.loads(world["karpathy"].read_text())["images"]
    }
    vocabulary = build_answer_vocabulary([world["vqa_train_annotations"], world["vqa_val_annotations"]], min_count=1)
    kinds = Counter()
    for split, images in (("train", 30), ("val", 10)):
        data = read_vqa(
            world[f"vqa_{split}_questions"], world["coco_root"], world[f"vqa_{split}_annotations"], vocabulary
        )
        assert len(data.records) == 3 * images and data.dropped_questions == 0
        assert len({(r.image_id, r.question) for r in data.records}) == len(
            data.records
        )  # different questions per image
        for record in data.records:
            assert record.question.endswith("?") and record.question == record.question.lower()
            assert len(set(record.answers)) == 1 and len(record.answers) == 10 and record.scores == [1.0]
            assert normalize_answer(record.answers[0]) == record.answers[0]
            assert record.answers[0] == answer(record.question, scenes[record.image_id]), record.question
            kinds[
                record.question.split()[0] + (" " + record.answers[0] if record.answers[0] in ("yes", "no") else "")
            ] += 1
    assert set(kinds) == {"what", "how", "where", "is yes", "is no"}
    assert abs(kinds["is yes"] - kinds["is no"]) <= 2


def test_vqa_annotation_fields(world):
    data = json.loads(world["vqa_train_annotations"].read_text())
    questions = json.loads(world["vqa_train_questions"].read_text())
    assert questions["data_subtype"] == "train2014" and data["data_subtype"] == "train2014"
    assert [q["question_id"] for q in questions["questions"]] == [a["question_id"] for a in data["annotations"]]
    for a in data["annotations"]:
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert {x["answer_confidence"] for x in a["answers"]} == {"yes"}
        assert a["answer_type"] in ("yes/no", "number", "other")


def test_every_default_train_answer_is_kept_by_the_vocabulary(tmp_path):
    # The default number of training images; everything else tiny.
    paths = write_task_world(
        tmp_path,
        pretrain_images=1,
        val_images=1,
        test_images=1,
        nlvr2_train=2,
        nlvr2_dev=2,
        classification_train=1,
        classification_val=1,
    )
    annotations = json.loads(paths["vqa_train_annotations"].read_text())["annotations"]
    counts = Counter(a["multiple_choice_answer"] for a in annotations)
    assert len(annotations) == 4500 and min(counts.values()) >= 9
    assert set(build_answer_vocabulary([paths["vqa_train_annotations"]])) == set(counts)
    assert set(counts) == {"yes", "no", "0", "1", "2", "3", "left", "right", "top", "bottom", *COLORS, *SHAPES}


def test_nlvr2_labels_and_images(world):
    for split, count in (("train", 20), ("dev", 10)):
        records = read_nlvr2(world[f"nlvr2_{split}"], world[f"nlvr2_{split}_images"])
        assert len(records) == count
        assert sum(r.label for r in records) == count // 2
        assert all(r.sentence == r.sentence.lower() and r.sentence.replace(" ", "").isalpha() for r in records)
    rows = [json.loads(line) for line in world["nlvr2_train"].read_text().splitlines()]
    assert [row["identifier"] for row in rows] == [f"train-{n}-0-0" for n in range(20)]
    assert all(row["directory"] == n % 10 and row["label"] in ("True", "False") for n, row in enumerate(rows))
    assert "directory" not in json.loads(world["nlvr2_dev"].read_text().splitlines()[0])


def truth(sentence, left, right):
    """A statement's truth, from the two scenes, independently of the generator."""

    def has(scene, thing):
        words = thing.split()
        if words[-1] == "shape":
            return any(s["color"] == words[0] for s in scene)
        return any(s["kind"] == words[-1] and (len(words) == 1 or s["color"] == words[0]) for s in scene)

    if m := re.fullmatch(r"the (left|right) image has a ([\w ]+)", sentence):
        return has(left if m[1] == "left" else right, m[2])
    if m := re.fullmatch(r"both images have a ([\w ]+)", sentence):
        return has(left, m[1]) and has(right, m[1])
    if m := re.fullmatch(r"neither image has a ([\w ]+)", sentence):
        return not has(left, m[1]) and not has(right, m[1])
    if m := re.fullmatch(r"there are more shapes in the (left|right) image than in the (left|right) image", sentence):
        assert len(left) != len(right)
        return len(left) > len(right) if m[1] == "left" else len(right) > len(left)
    raise AssertionError(f"unknown statement {sentence!r}")


def test_nlvr2_statements_are_true_or_false_as_asked():
    rng = random.Random(0)
    kinds = Counter()
    for n in range(600):
        label = n % 2 == 0
        left, right, sentence = pair_statement(rng, label)
        assert truth(sentence, left, right) == label, sentence
        kinds[sentence.split()[0], label] += 1
    # every kind, true and false; half of them about one named image (STATEMENT_WEIGHTS)
    assert all(kinds[start, label] >= 30 for start in ("the", "both", "there", "neither") for label in (True, False))
    assert all(0.4 < kinds["the", label] / 300 < 0.6 for label in (True, False)), kinds


def test_classification_folders(world):
    train = read_image_folder(world["imagenet_train"])
    val = read_image_folder(world["imagenet_val"], classes=train.classes)
    assert train.classes == sorted(CLASSES) and len(train.classes) == 18
    assert (len(train.records), len(val.records)) == (36, 18)
    for split in (train, val):
        assert all(train.classes[r.label] == r.image_path.split("/")[-2] for r in split.records)
        assert set(Counter(r.label for r in split.records).values()) == {len(split.records) // 18}


def test_pretrain_part_is_the_shapes_world(world, tmp_path):
    assert len(world["pretrain_pairs"].read_text().splitlines()) == 20
    sources = load_sources(
        images=str(world["pretrain_images"]), texts=[str(world["pretrain_texts"])], pairs=[str(world["pretrain_pairs"])]
    )
    assert {kind: len(d) for kind, d in sources.items()} == {"image": 20, "text": 20, "pair": 20}
    alone = write_shapes_world(tmp_path / "alone", 20, seed=3)
    assert alone["pairs"].read_text() == world["pretrain_pairs"].read_text()
    assert alone["texts"].read_text() == world["pretrain_texts"].read_text()
    record = json.loads((world["coco_root"].parent / "world.json").read_text())
    assert record["seed"] == 3 and record["counts"]["train_images"] == 30


def test_shapes_world_unchanged(tmp_path):
    paths = write_shapes_world(tmp_path, 7, seed=0)
    lines = [json.loads(line) for line in paths["pairs"].read_text().splitlines()]
    assert len(lines) == 7 and len(list(paths["images"].glob("*.png"))) == 7
    assert [row["image"] for row in lines] == [f"images/{i:05d}.png" for i in range(7)]
    assert paths["texts"].read_text().splitlines() == [row["text"] for row in lines]
    assert all(
        row["text"]
        == caption(
            [
                {"size": z, "color": c, "kind": k, "slot": next(x for x in SLOTS if x.endswith(w))}
                for z, c, k, w in parse_caption(row["text"])
            ]
        )
        for row in lines
    )


def test_same_seed_same_bytes(world, tmp_path):
    again = write_task_world(tmp_path / "again", seed=3, **SMALL)
    other = write_task_world(tmp_path / "other", seed=4, **SMALL)
    for key in JSON_OUTPUTS:
        assert again[key].read_bytes() == world[key].read_bytes(), key
        assert other[key].read_bytes() != world[key].read_bytes(), key
    first = sorted(world["coco_root"].glob("*2014/*.jpg"))
    assert [p.read_bytes() for p in first] == [
        again["coco_root"].joinpath(p.relative_to(world["coco_root"])).read_bytes() for p in first
    ]


def test_shapes_named_reads_each_full_shape_of_a_caption():
    from beit3.data.synthetic import random_scene, second_caption, shapes_named

    rng = random.Random(0)
    for _ in range(50):
        scene = random_scene(rng)
        expected = sorted((s["color"], s["kind"]) for s in scene)
        assert shapes_named(caption(scene)) == expected == shapes_named(second_caption(scene))
    assert shapes_named("a big red") == [] and shapes_named("a small blue square and a red circle") == [
        ("blue", "square")
    ]
