"""VQAv2: the official question and annotation files, the answer vocabulary and soft scores, and a torch Dataset.

Inputs, as downloaded from visualqa.org:
    v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
        {"data_subtype", "questions": [{"image_id", "question", "question_id"}]}
    v2_mscoco_{train2014,val2014}_annotations.json
        {"annotations": [{"question_id", "image_id", "multiple_choice_answer", "answers": [{"answer", "answer_id", ...}] x 10}]}
    images: <image_root>/<train2014|val2014|test2015>/COCO_<folder>_<image_id:012d>.jpg (test-dev images live in test2015/)

The vocabulary and the soft scores follow BEiT-3's (ViLT's) recipe, which the released 3129-way
heads are indexed by: normalized ``multiple_choice_answer`` of train then val, kept if seen at least
9 times, labels in order of first appearance; per question, each raw annotator answer in the
vocabulary scores 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ annotators.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import (
    DatasetRecords,
    check_images_exist,
    encode_text,
    load_rgb,
    read_index,
    read_json,
    require_text,
    transform_image,
)
from .vqa_answers import answer_score, normalize_answer


@dataclass
class VqaRecord:
    """One question. ``labels``/``scores``: the vocabulary answers with their soft scores (empty for test);
    ``answers``: the raw annotator answers, for the official accuracy. The official index files hold
    the question as piece ids (``text_ids``) instead of ``question``."""

    question_id: int
    image_path: str
    question: str | None
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    image_id: int | None = None
    text_ids: list[int] | None = None
    question_type: str | None = (
        None  # the annotation's question_type ("what color is the", ...): VQA's per-type breakdown
    )
    answer: str | None = None  # the annotation's multiple_choice_answer (the most common annotator answer)


@dataclass
class VqaSplit:
    """Records of one split, with what was left out: annotator answers outside the vocabulary (ignored) and
    questions left with no vocabulary answer (dropped, as the official recipe does for train and val)."""

    records: list[VqaRecord]
    out_of_vocabulary_answers: int = 0
    dropped_questions: int = 0


def _annotations(path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(
            f'{path} is not a VQA annotation file: it needs a top-level "annotations" list '
            "(v2_mscoco_<split>_annotations.json)."
        )
    return data["annotations"]


def build_answer_vocabulary(annotation_files: Sequence[str | os.PathLike], min_count: int = 9) -> dict[str, int]:
    """answer -> label: the normalized ``multiple_choice_answer`` seen at least ``min_count`` times over the
    files (train, then val, for the released heads: 3129 answers), labels in order of first appearance."""
    counts = Counter(
        normalize_answer(a["multiple_choice_answer"]) for path in annotation_files for a in _annotations(path)
    )
    return {answer: label for label, answer in enumerate(a for a, n in counts.items() if n >= min_count)}


def write_answer2label(path: str | os.PathLike, answer2label: Mapping[str, int]) -> None:
    """``answer2label.txt`` as the official code writes it: one ``{"answer": ..., "label": ...}`` per line, by label."""
    lines = (
        json.dumps({"answer": answer, "label": label})
        for answer, label in sorted(answer2label.items(), key=lambda x: x[1])
    )
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_answer2label(path: str | os.PathLike) -> dict[str, int]:
    """Reads ``answer2label.txt``; the labels must be 0..N-1, each once."""
    answer2label = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                answer2label[item["answer"]] = int(item["label"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f'{path}:{number} is not an {{"answer", "label"}} line ({error}).') from error
    if sorted(answer2label.values()) != list(range(len(answer2label))):
        raise ValueError(
            f"{path}: the labels are not 0..{len(answer2label) - 1}, each once; the file is damaged or not answer2label.txt."
        )
    return answer2label


def image_folder_of(data_subtype: str) -> str:
    """The image folder of a question file's ``data_subtype``: test-dev2015 questions are about test2015 images."""
    return "test2015" if data_subtype.startswith("test") else data_subtype


def read_vqa(
    questions_file: str | os.PathLike,
    image_root: str | os.PathLike,
    annotations_file: str | os.PathLike | None = None,
    answer2label: Mapping[str, int] | None = None,
    drop_unlabeled: bool = True,
    check_images: bool = True,
) -> VqaSplit:
    """One split from the official files.

    Args:
        questions_file: ``v2_OpenEnded_mscoco_<split>_questions.json``.
        image_root: the folder holding ``train2014/``, ``val2014/``, ``test2015/``.
        annotations_file: ``v2_mscoco_<split>_annotations.json``; None for test and test-dev.
        answer2label: the vocabulary (``build_answer_vocabulary`` / ``read_answer2label``); needed with annotations.
        drop_unlabeled: leave out questions none of whose annotator answers is in the vocabulary (the official
            training data); False keeps them (with empty labels), e.g. to score the official accuracy on all of val.
        check_images: raise FileNotFoundError up front, naming the missing image files.
    """
    data = read_json(questions_file)
    if not isinstance(data, dict) or "questions" not in data:
        raise ValueError(
            f'{questions_file} is not a VQA question file: it needs a top-level "questions" list '
            "(v2_OpenEnded_mscoco_<split>_questions.json)."
        )
    subtype = data.get("data_subtype")
    if subtype is None:
        match = re.search(r"(train2014|val2014|test-dev2015|test2015)", Path(questions_file).name)
        if match is None:
            raise ValueError(
                f'{questions_file} has no "data_subtype" and its name does not say the split; cannot find its images.'
            )
        subtype = match.group(1)
    folder = image_folder_of(subtype)
    if annotations_file is not None and answer2label is None:
        raise ValueError(
            "Annotations need the answer vocabulary: pass answer2label (build_answer_vocabulary or read_answer2label)."
        )
    by_question = (
        {a["question_id"]: a for a in _annotations(annotations_file)} if annotations_file is not None else None
    )

    records, out_of_vocabulary, dropped = [], 0, 0
    for q in data["questions"]:
        question_id = q["question_id"]
        require_text(q.get("question"), f"Question {question_id} in {questions_file}")
        record = VqaRecord(
            question_id=question_id,
            question=q["question"],
            image_id=q["image_id"],
            image_path=os.path.join(image_root, folder, f"COCO_{folder}_{q['image_id']:012d}.jpg"),
        )
        if by_question is not None:
            if question_id not in by_question:
                raise ValueError(
                    f"Question {question_id} of {questions_file} has no annotation in {annotations_file}; "
                    "are they files of the same split?"
                )
            annotation = by_question[question_id]
            record.answers = [a["answer"] for a in annotation["answers"]]
            record.question_type, record.answer = (
                annotation.get("question_type"),
                annotation.get("multiple_choice_answer"),
            )
            # Raw annotator strings, not normalized, as the official recipe counts them.
            for answer, count in Counter(record.answers).items():
                if answer in answer2label:
                    record.labels.append(answer2label[answer])
                    record.scores.append(answer_score(count))
                else:
                    out_of_vocabulary += count
            if not record.labels and drop_unlabeled:
                dropped += 1
                continue
        records.append(record)
    if check_images:
        check_images_exist((r.image_path for r in records), f"VQA images of {Path(questions_file).name}")
    return VqaSplit(records, out_of_vocabulary, dropped)


def _row_answers(value, column: str, row_number: int) -> list[str]:
    """A row's annotator answers: a list of strings, a list of ``{"answer": ...}`` (VQAv2's layout), or one string."""
    if isinstance(value, str):
        return [value]
    # A datasets Sequence of dicts comes back as columns
    if isinstance(value, dict) and isinstance(value.get("answer"), list):
        value = value["answer"]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"Row {row_number}: the {column!r} column holds {value!r}; give a list of answers (strings or "
            '{"answer": ...} dicts) or one answer string.'
        )
    return [a["answer"] if isinstance(a, dict) else str(a) for a in value]


def _soft_labels(answers: list[str], answer2label: Mapping[str, int], single: bool) -> tuple[list[int], list[float]]:
    """Vocabulary labels and soft scores of one question's annotator answers, counted as written (as ``read_vqa``
    and the official recipe count them); one given answer is normalized, as a vocabulary answer is, and scores 1."""
    labels, scores = [], []
    for answer, count in Counter(map(normalize_answer, answers) if single else answers).items():
        if answer in answer2label:
            labels.append(answer2label[answer])
            scores.append(1.0 if single else answer_score(count))
    return labels, scores


class VqaDatasetRecords(DatasetRecords):
    """VQA records from a user's ``datasets.Dataset`` (an image column, a question column, an answers column), one row
    at a time; the images stay undecoded until ``VqaDataset`` reads them. Labels and soft scores come from the
    annotators' answers as ``read_vqa`` computes them, against ``answer2label`` or a vocabulary built from this data
    (each question's most frequent answer, normalized, kept when at least ``min_count`` questions give it, as
    ``build_answer_vocabulary`` builds it). As in the official recipe, the annotators' answers are counted as
    written, not normalized: "3" x3 and "three" x3 are two answers of score 0.9 (the released VQAv2 annotations
    are normalized already; map ``beit3.data.vqa_answers.normalize_answer`` over a column that is not). A column
    of single answer strings is normalized, as the vocabulary's answers are, and each scores 1.0.
    Rows with no vocabulary answer are left out (``drop_unlabeled``); ``question_id`` is a column or the row number.
    """

    def __init__(
        self,
        dataset,
        answer2label: Mapping[str, int] | None = None,
        image: str = "image",
        question: str = "question",
        answers: str = "answers",
        question_id: str | None = None,
        question_type: str | None = None,
        min_count: int = 1,
        drop_unlabeled: bool = True,
    ):
        columns = {"image_path": image, "question": question, "answers": answers}
        columns.update({k: v for k, v in (("question_id", question_id), ("question_type", question_type)) if v})
        super().__init__(dataset, VqaRecord, **columns)
        given = [_row_answers(value, answers, n) for n, value in enumerate(self.dataset[answers])]
        self.single = all(isinstance(value, str) for value in self.dataset[answers][:1000])
        if answer2label is None:
            counts = Counter(Counter(map(normalize_answer, row)).most_common(1)[0][0] for row in given)
            answer2label = {
                answer: label for label, answer in enumerate(a for a, n in counts.items() if n >= min_count)
            }
        self.answer2label = dict(answer2label)
        kept = [n for n, row in enumerate(given) if _soft_labels(row, self.answer2label, self.single)[0]]
        self.dropped_questions = len(given) - len(kept)
        if drop_unlabeled and self.dropped_questions:
            self.rows = kept

    def record(self, row: dict, row_number: int) -> VqaRecord:
        answers = _row_answers(row[self.columns["answers"]], self.columns["answers"], row_number)
        require_text(row[self.columns["question"]], f"Row {row_number}'s question")
        labels, scores = _soft_labels(answers, self.answer2label, self.single)
        return VqaRecord(
            question_id=int(row[self.columns["question_id"]]) if "question_id" in self.columns else row_number,
            image_path=row[self.columns["image_path"]],
            question=row[self.columns["question"]],
            labels=labels,
            scores=scores,
            answers=answers,
            question_type=row.get(self.columns.get("question_type", "")),
            answer=Counter(answers).most_common(1)[0][0],
        )


def read_vqa_index(
    index_file: str | os.PathLike, data_root: str | os.PathLike, check_images: bool = True
) -> list[VqaRecord]:
    """The official index (``vqa.{train,val,test,test-dev,trainable_val,rest_val}.jsonl``): lines
    ``{"image_path", "text_segment", "labels", "scores", "qid"}``, image paths relative to ``data_root``,
    questions as piece ids of ``beit3.spm`` (so only that tokenizer's ids fit)."""
    return read_index(
        index_file,
        ["image_path", "text_segment", "labels", "scores", "qid"],
        lambda row: VqaRecord(
            question_id=row["qid"],
            image_path=os.path.join(data_root, row["image_path"]),
            question=None,
            labels=list(row["labels"] or []),
            scores=list(row["scores"] or []),
            text_ids=list(row["text_segment"]),
        ),
        lambda record: [record.image_path],
        "question",
        check_images,
    )


def insert_answer_slot(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int
) -> dict[str, torch.Tensor]:
    """``<s> question </s>`` -> ``<s> question <mask> </s>``, the input of ``vqa_head="answer_slot"``: (B, T) or (T,)
    in, one longer out (every row padded alike). Right padding, as the tokenizers here give."""
    single = input_ids.dim() == 1
    ids, mask = (input_ids[None], attention_mask[None]) if single else (input_ids, attention_mask)
    lengths = mask.sum(-1)
    if bool((lengths < 2).any()):
        raise ValueError("insert_answer_slot needs every row to hold at least <s> and </s>.")
    positions = torch.arange(ids.shape[1] + 1, device=ids.device)[None]
    eos = (lengths - 1)[:, None]  # where </s> is now, and where the <mask> goes; </s> and the padding move one on
    new_ids = ids.gather(1, torch.where(positions < eos, positions, positions - 1).expand(ids.shape[0], -1))
    new_ids = new_ids.masked_fill(positions == eos, mask_token_id)
    new_mask = (positions <= eos + 1).to(mask.dtype)
    return {"input_ids": new_ids[0] if single else new_ids, "attention_mask": new_mask[0] if single else new_mask}


class VqaDataset(torch.utils.data.Dataset):
    """Items for ``Beit3ForVisualQuestionAnswering``:

        pixel_values (C, H, W), input_ids (T,), attention_mask (T,),
        labels (num_labels,) float soft scores (for annotated questions only), question_id () long.

    ``image_transform``: an image processor or a callable PIL -> (C, H, W) tensor (a training augmentation).
    ``answer_slot``: a ``<mask>`` after each question (``insert_answer_slot``), for ``vqa_head="answer_slot"``; the
    question is cut one piece shorter so that the text stays ``max_length`` long.
    """

    def __init__(
        self,
        records: Sequence[VqaRecord],
        image_transform,
        tokenizer,
        num_labels: int,
        max_length: int = 64,
        answer_slot: bool = False,
    ):
        self.records, self.image_transform, self.tokenizer = list(records), image_transform, tokenizer
        self.num_labels, self.max_length, self.answer_slot = num_labels, max_length, answer_slot
        if answer_slot and tokenizer.mask_token_id is None:
            raise ValueError("answer_slot=True puts a <mask> after each question, but the tokenizer has no mask token.")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        text = encode_text(self.tokenizer, record.question, record.text_ids, self.max_length - self.answer_slot)
        if self.answer_slot:
            text = insert_answer_slot(text["input_ids"], text["attention_mask"], self.tokenizer.mask_token_id)
        item = {
            "pixel_values": transform_image(self.image_transform, load_rgb(record.image_path)),
            **text,
            "question_id": torch.tensor(record.question_id),
        }
        if record.labels or record.answers:  # annotated; test questions have neither
            labels = torch.zeros(self.num_labels)
            labels[torch.tensor(record.labels)] = torch.tensor(record.scores, dtype=torch.float)
            item["labels"] = labels
        return item


def label_to_answer(answer2label: Mapping[str, int]) -> list[str]:
    """The answers indexed by label, to decode ``logits.argmax(-1)``."""
    answers = [""] * len(answer2label)
    for answer, label in answer2label.items():
        answers[label] = answer
    return answers


def answers_from_records(records: Iterable[VqaRecord]) -> dict[int, list[str]]:
    """question_id -> the raw annotator answers, the ground truth of ``beit3.metrics.vqa_accuracy``."""
    return {r.question_id: r.answers for r in records if r.answers}
