"""A small generated world of colored shapes with captions, for tests and the embedded demo.

Images have one to three shapes (circle, square, triangle) of six colors and two sizes, in four
slots; the caption names every shape ("a big red circle on the left and a small blue square at
the top"). Everything is a function of the seed.

``write_shapes_world`` writes unlabeled pretraining data: ``images/*.png``, ``captions.txt`` and
``pairs.jsonl``. ``write_task_world`` writes a whole multimodal world in the standard formats that
the readers of this package read (so that a demo goes through the real readers):

    pretrain/                 write_shapes_world's images, captions.txt and pairs.jsonl
    coco/train2014/, val2014/ COCO_<folder>_<image_id:012d>.jpg (val and test images both in val2014/)
    coco/dataset_coco.json    Karpathy's split file, two captions per image (read_karpathy)
    vqa/                      v2_OpenEnded_mscoco_{train,val}2014_questions.json and
                              v2_mscoco_{train,val}2014_annotations.json (read_vqa, build_answer_vocabulary)
    nlvr2/                    train.json and dev.json (lil-lab JSON Lines), images/train/<directory>/ and images/dev/ (read_nlvr2)
    imagenet/                 train/<color>_<kind>/N.png and val/<color>_<kind>/N.png, one shape per image (read_image_folder)
    world.json                the seed, the image size and the counts

The words are those of the captions plus a few of the questions and statements, all lowercase.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 50, 50),
    "green": (60, 180, 75),
    "blue": (50, 90, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 70, 190),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")  # the shapes drawn (a shape dict names its own "kind")
SLOTS = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
}
SIZES = {"small": 0.12, "big": 0.2}
CLASSES = tuple(f"{color}_{kind}" for color in COLORS for kind in SHAPES)  # the 18 classification classes


def random_scene(rng: random.Random) -> list[dict]:
    """One to three shapes in distinct slots: [{"kind", "color", "size", "slot"}]."""
    slots = rng.sample(list(SLOTS), rng.randint(1, 3))
    return [
        {"kind": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": rng.choice(list(SIZES)), "slot": slot}
        for slot in slots
    ]


def draw_scene(scene: list[dict], size: int = 64, rng: random.Random | None = None) -> Image.Image:
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), rng.choice([(20, 22, 30), (35, 35, 45)]))
    draw = ImageDraw.Draw(image)
    for shape in scene:
        cx, cy = SLOTS[shape["slot"]]
        cx, cy = cx * size + rng.uniform(-2, 2), cy * size + rng.uniform(-2, 2)
        r = SIZES[shape["size"]] * size
        color = COLORS[shape["color"]]
        if shape["kind"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif shape["kind"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return image


def caption(scene: list[dict]) -> str:
    return "a " + " and a ".join(f"{s['size']} {s['color']} {s['kind']} {s['slot']}" for s in scene)


def shapes_named(text: str) -> list[tuple[str, str]]:
    """The (color, kind) of every shape a caption names in full ("a big red circle ..." -> [("red", "circle")]),
    sorted: two captions describe the same shapes when these lists are equal."""
    pattern = rf"\b(?:{'|'.join(SIZES)})\s+({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})\b"
    return sorted(re.findall(pattern, text))


def second_caption(scene: list[dict]) -> str:
    """Another caption with the same words: the shapes in reverse order, or "there is a ..." for a single shape."""
    return "there is " + caption(scene) if len(scene) == 1 else caption(scene[::-1])


def write_shapes_world(folder: str | Path, num_images: int, seed: int = 0, size: int = 64) -> dict[str, Path]:
    """Writes ``images/*.png``, ``captions.txt`` (one caption per line) and ``pairs.jsonl``
    (``{"image": "images/N.png", "text": caption}``) into ``folder``; returns their paths."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, pairs = [], []
    for i in range(num_images):
        scene = random_scene(rng)
        draw_scene(scene, size, rng).save(folder / "images" / f"{i:05d}.png")
        captions.append(caption(scene))
        pairs.append(json.dumps({"image": f"images/{i:05d}.png", "text": captions[-1]}))
    (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    (folder / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    return {"images": folder / "images", "texts": folder / "captions.txt", "pairs": folder / "pairs.jsonl"}


# --- VQA questions: each is (question, answer), answerable from the image alone; answers are in VQA's normalized form.


def _slot_word(slot: str) -> str:
    return slot.split()[-1]  # "on the left" -> "left"


def _color_question(scene, rng, want_yes):
    """ "what color is the circle?" (exactly one circle) or "what color is the shape on the left?"."""
    options = [(f"what color is the shape {s['slot']}?", s["color"]) for s in scene]
    for kind in SHAPES:
        shapes = [s for s in scene if s["kind"] == kind]
        if len(shapes) == 1:
            options.append((f"what color is the {kind}?", shapes[0]["color"]))
    return rng.choice(options)


def _kind_question(scene, rng, want_yes):
    """ "what shape is on the left?"."""
    shape = rng.choice(scene)
    return f"what shape is {shape['slot']}?", shape["kind"]


def _count_question(scene, rng, want_yes):
    """ "how many shapes are there?" (1-3) or "how many red shapes are there?" (0-3; half the time a color that is there)."""
    if rng.random() < 0.5:
        return "how many shapes are there?", str(len(scene))
    color = rng.choice(scene)["color"] if rng.random() < 0.5 else rng.choice(list(COLORS))
    return f"how many {color} shapes are there?", str(sum(s["color"] == color for s in scene))


def _position_question(scene, rng, want_yes):
    """ "where is the big red circle?" or "where is the red circle?" -> left/right/top/bottom, when that names one shape."""

    def name(s, full):
        return f"{s['size']} {s['color']} {s['kind']}" if full else f"{s['color']} {s['kind']}"

    full = rng.random() < 0.5
    unique = [s for s in scene if sum(name(t, full) == name(s, full) for t in scene) == 1]
    if not unique:
        return None
    shape = rng.choice(unique)
    return f"where is the {name(shape, full)}?", _slot_word(shape["slot"])


def _yes_no_question(scene, rng, want_yes):
    """ "is there a blue square?": a color and kind that is there (yes) or is not (no)."""
    present = sorted({(s["color"], s["kind"]) for s in scene})
    if want_yes:
        color, kind = rng.choice(present)
    else:
        color, kind = rng.choice([(c, k) for c in COLORS for k in SHAPES if (c, k) not in present])
    return f"is there a {color} {kind}?", "yes" if want_yes else "no"


# kind -> (maker, VQA question_type, VQA answer_type)
QUESTION_KINDS = {
    "color": (_color_question, "what color is the", "other"),
    "kind": (_kind_question, "what shape is", "other"),
    "count": (_count_question, "how many", "number"),
    "position": (_position_question, "where is the", "other"),
    "yes/no": (_yes_no_question, "is there a", "yes/no"),
}


def scene_questions(scene: list[dict], rng: random.Random, count: int, yes_no_state: list[bool]) -> list[dict]:
    """``count`` different questions about ``scene``: {"question", "answer", "question_type", "answer_type"}, of
    kinds chosen at random. ``yes_no_state`` ([bool], shared over a split) alternates the yes/no answers."""
    questions, seen = [], set()
    for _ in range(100 * count):
        if len(questions) == count:
            break
        kind = rng.choice(list(QUESTION_KINDS))
        maker, question_type, answer_type = QUESTION_KINDS[kind]
        made = maker(scene, rng, yes_no_state[0])
        if made is None or made[0] in seen:
            continue
        if kind == "yes/no":
            yes_no_state[0] = not yes_no_state[0]
        seen.add(made[0])
        questions.append(
            {"question": made[0], "answer": made[1], "question_type": question_type, "answer_type": answer_type}
        )
    if len(questions) < count:
        raise ValueError(f"Could not ask {count} different questions about the scene {scene}.")
    return questions


# --- NLVR2 statements about a pair of scenes, made true or false as asked (None: the pair does not allow it; draw another).


def _attributes(scene, level: str) -> set[str]:
    """What "has a ..." can name: "red circle" (full), "red shape" (color) or "circle" (kind)."""
    if level == "full":
        return {f"{s['color']} {s['kind']}" for s in scene}
    return {f"{s['color']} shape" for s in scene} if level == "color" else {s["kind"] for s in scene}


_EVERY_SHAPE = [{"color": c, "kind": k} for c in COLORS for k in SHAPES]
_ALL_ATTRIBUTES = {level: _attributes(_EVERY_SHAPE, level) for level in ("full", "color", "kind")}


def _pick(rng, options):
    return rng.choice(sorted(options)) if options else None


def _side_statement(left, right, rng, label):
    """ "the left image has a red circle" / "the right image has a blue shape"."""
    level, side = rng.choice(list(_ALL_ATTRIBUTES)), rng.choice(["left", "right"])
    present = _attributes(left if side == "left" else right, level)
    attribute = _pick(rng, present if label else _ALL_ATTRIBUTES[level] - present)
    return attribute and f"the {side} image has a {attribute}"


def _both_statement(left, right, rng, label):
    """ "both images have a square"; when false, mostly one image has it."""
    level = rng.choice(list(_ALL_ATTRIBUTES))
    a, b = _attributes(left, level), _attributes(right, level)
    attribute = _pick(rng, a & b) if label else _pick(rng, a ^ b) or _pick(rng, _ALL_ATTRIBUTES[level] - (a | b))
    return attribute and f"both images have a {attribute}"


def _more_statement(left, right, rng, label):
    """ "there are more shapes in the left image than in the right image" (the counts differ)."""
    if len(left) == len(right):
        return None
    more, fewer = ("left", "right") if len(left) > len(right) else ("right", "left")
    first, second = (more, fewer) if label else (fewer, more)
    return f"there are more shapes in the {first} image than in the {second} image"


def _neither_statement(left, right, rng, label):
    """ "neither image has a green triangle"."""
    level = rng.choice(list(_ALL_ATTRIBUTES))
    present = _attributes(left, level) | _attributes(right, level)
    attribute = _pick(rng, _ALL_ATTRIBUTES[level] - present if label else present)
    return attribute and f"neither image has a {attribute}"


STATEMENT_KINDS = {
    "side": _side_statement,
    "both": _both_statement,
    "more": _more_statement,
    "neither": _neither_statement,
}
# Half the statements are about one named image: grounding that a short fine-tuning can learn; the other half
# ask to relate both images (both, more, neither), as NLVR2 does.
STATEMENT_WEIGHTS = {"side": 3, "both": 1, "more": 1, "neither": 1}


def pair_statement(rng: random.Random, label: bool) -> tuple[list[dict], list[dict], str]:
    """Two scenes and a statement about them that is ``label`` (True or False): (left, right, sentence)."""
    maker = STATEMENT_KINDS[rng.choices(list(STATEMENT_WEIGHTS), weights=list(STATEMENT_WEIGHTS.values()))[0]]
    while True:
        left, right = random_scene(rng), random_scene(rng)
        sentence = maker(left, right, rng, label)
        if sentence:
            return left, right, sentence


def _balanced_labels(rng: random.Random, count: int) -> list[bool]:
    labels = [i % 2 == 0 for i in range(count)]
    rng.shuffle(labels)
    return labels


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) + "\n")


def _write_coco_and_vqa(folder: Path, seed: int, size: int, counts: dict[str, int], questions_per_image: int) -> None:
    coco, vqa = folder / "coco", folder / "vqa"
    karpathy, sentence_id, image_id = [], 0, 0
    for split in ("train", "val", "test"):
        image_folder = "train2014" if split == "train" else "val2014"
        (coco / image_folder).mkdir(parents=True, exist_ok=True)
        scene_rng, question_rng = random.Random(f"{seed}:coco:{split}"), random.Random(f"{seed}:vqa:{split}")
        questions, annotations, yes_no_state = [], [], [True]
        for _ in range(counts[f"{split}_images"]):
            image_id += 1
            scene = random_scene(scene_rng)
            filename = f"COCO_{image_folder}_{image_id:012d}.jpg"
            draw_scene(scene, size, scene_rng).save(coco / image_folder / filename, quality=95)
            imgid = len(karpathy)
            sentences = []
            for raw in (caption(scene), second_caption(scene)):
                sentences.append({"tokens": raw.split(), "raw": raw, "imgid": imgid, "sentid": sentence_id})
                sentence_id += 1
            karpathy.append(
                {
                    "filepath": image_folder,
                    "sentids": [s["sentid"] for s in sentences],
                    "filename": filename,
                    "imgid": imgid,
                    "split": split,
                    "sentences": sentences,
                    "cocoid": image_id,
                }
            )
            if split == "test":
                continue  # VQA questions only on the train and val images
            for k, q in enumerate(scene_questions(scene, question_rng, questions_per_image, yes_no_state)):
                question_id = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": q["question"], "question_id": question_id})
                annotations.append(
                    {
                        "question_type": q["question_type"],
                        "multiple_choice_answer": q["answer"],
                        "answers": [
                            {"answer": q["answer"], "answer_confidence": "yes", "answer_id": n} for n in range(1, 11)
                        ],
                        "image_id": image_id,
                        "answer_type": q["answer_type"],
                        "question_id": question_id,
                    }
                )
        if split != "test":
            subtype = f"{split}2014"
            _write_json(
                vqa / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype, "questions": questions},
            )
            _write_json(
                vqa / f"v2_mscoco_{subtype}_annotations.json",
                {"data_type": "mscoco", "data_subtype": subtype, "annotations": annotations},
            )
    _write_json(coco / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})


def _write_nlvr2(folder: Path, seed: int, size: int, split: str, count: int) -> None:
    rng = random.Random(f"{seed}:nlvr2:{split}")
    lines = []
    for n, label in enumerate(_balanced_labels(rng, count)):
        left, right, sentence = pair_statement(rng, label)
        row = {"identifier": f"{split}-{n}-0-0", "sentence": sentence, "label": str(label)}
        images = folder / "images" / split
        if split == "train":
            row["directory"] = n % 10
            images = images / str(row["directory"])
        images.mkdir(parents=True, exist_ok=True)
        for side, scene in enumerate((left, right)):
            draw_scene(scene, size, rng).save(images / f"{split}-{n}-0-img{side}.png")
        lines.append(json.dumps(row))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.json").write_text("".join(line + "\n" for line in lines))


def _write_image_folder(root: Path, seed: int, size: int, split: str, count: int) -> None:
    rng = random.Random(f"{seed}:imagenet:{split}")
    for name in CLASSES:  # every class folder, even when there are fewer images than classes
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = CLASSES[i % len(CLASSES)]
        color, kind = name.split("_")
        scene = [{"kind": kind, "color": color, "size": rng.choice(list(SIZES)), "slot": rng.choice(list(SLOTS))}]
        draw_scene(scene, size, rng).save(root / name / f"{i:05d}.png")


def write_task_world(
    folder,
    seed: int = 0,
    size: int = 64,
    pretrain_images: int = 8000,
    train_images: int = 1500,
    val_images: int = 250,
    test_images: int = 250,
    nlvr2_train: int = 2000,
    nlvr2_dev: int = 250,
    classification_train: int = 1000,
    classification_val: int = 250,
    questions_per_image: int = 3,
) -> dict[str, Path]:
    """Writes the shapes world in the standard dataset formats (see the module docstring) into ``folder``.

    Each part draws from its own generator, seeded from ``seed`` and the part's name, so the same seed
    gives byte-identical files and changing one count leaves the other parts' scenes alone (COCO image
    ids run 1..N over train, val and test, so they shift with the earlier splits' counts).

    VQA questions (``questions_per_image`` different ones per train and val image, all 10 annotator answers
    the true one): color ("what color is the circle?", "what color is the shape on the left?"), kind
    ("what shape is on the left?"), count ("how many shapes are there?", "how many red shapes are there?"),
    position ("where is the big red circle?" -> left/right/top/bottom) and yes/no ("is there a blue square?",
    alternately yes and no). NLVR2 statements (half true, by construction): "the left image has a red circle",
    "both images have a square", "there are more shapes in the left image than in the right image",
    "neither image has a green shape". Classification: one shape per image, class ``<color>_<kind>`` (18 classes).

    Returns the paths, keyed:
        pretrain_images, pretrain_texts, pretrain_pairs: the pretraining folder of images, captions.txt, pairs.jsonl;
        coco_root (the image_root of read_karpathy and read_vqa), karpathy (dataset_coco.json);
        vqa_train_questions, vqa_train_annotations, vqa_val_questions, vqa_val_annotations;
        nlvr2_train, nlvr2_train_images, nlvr2_dev, nlvr2_dev_images (the JSON Lines files and their image roots);
        imagenet_train, imagenet_val (the class-folder roots).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {
        "pretrain_images": pretrain_images,
        "train_images": train_images,
        "val_images": val_images,
        "test_images": test_images,
        "nlvr2_train": nlvr2_train,
        "nlvr2_dev": nlvr2_dev,
        "classification_train": classification_train,
        "classification_val": classification_val,
        "questions_per_image": questions_per_image,
    }
    pretrain = write_shapes_world(folder / "pretrain", pretrain_images, seed=seed, size=size)
    _write_coco_and_vqa(folder, seed, size, counts, questions_per_image)
    _write_nlvr2(folder / "nlvr2", seed, size, "train", nlvr2_train)
    _write_nlvr2(folder / "nlvr2", seed, size, "dev", nlvr2_dev)
    _write_image_folder(folder / "imagenet" / "train", seed, size, "train", classification_train)
    _write_image_folder(folder / "imagenet" / "val", seed, size, "val", classification_val)
    record = {"seed": seed, "size": size, "counts": counts, "classes": list(CLASSES)}
    (folder / "world.json").write_text(json.dumps(record, indent=2) + "\n")
    vqa = folder / "vqa"
    return {
        "pretrain_images": pretrain["images"],
        "pretrain_texts": pretrain["texts"],
        "pretrain_pairs": pretrain["pairs"],
        "coco_root": folder / "coco",
        "karpathy": folder / "coco" / "dataset_coco.json",
        "vqa_train_questions": vqa / "v2_OpenEnded_mscoco_train2014_questions.json",
        "vqa_train_annotations": vqa / "v2_mscoco_train2014_annotations.json",
        "vqa_val_questions": vqa / "v2_OpenEnded_mscoco_val2014_questions.json",
        "vqa_val_annotations": vqa / "v2_mscoco_val2014_annotations.json",
        "nlvr2_train": folder / "nlvr2" / "train.json",
        "nlvr2_train_images": folder / "nlvr2" / "images" / "train",
        "nlvr2_dev": folder / "nlvr2" / "dev.json",
        "nlvr2_dev_images": folder / "nlvr2" / "images" / "dev",
        "imagenet_train": folder / "imagenet" / "train",
        "imagenet_val": folder / "imagenet" / "val",
    }
