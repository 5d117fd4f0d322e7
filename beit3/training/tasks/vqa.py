"""VQAv2: answers scored against the 10 annotators' (the official accuracy), the test-dev submission JSON.

The accuracy is the official vqaEval.py's, in the version ``data.vqa_evaluation`` names (the current 2021 script by
default); every eval_results.json says which. Data: ``{train|eval|predict: {questions: v2_OpenEnded_..._questions.json, annotations: v2_mscoco_..._annotations.json}
or {index: vqa.train.jsonl, data_root: DIR}}``, ``image_root`` (holds train2014/, val2014/, test2015/),
``answer2label`` (answer2label.txt; null: built from the train annotations, min count ``answer_min_count``),
``vqa_loss`` (bce: the official multi-label loss on soft scores; softmax: one answer per question).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ...checkpoints import read_folder_tensors
from ...data.common import split_batch
from ...data.vqa import (
    VqaDataset,
    answers_from_records,
    build_answer_vocabulary,
    label_to_answer,
    read_answer2label,
    read_vqa,
    read_vqa_index,
)
from ...log import get_logger
from ...metrics import (
    VQA_EVALUATION,
    VQA_EVALUATIONS,
    answer_prior,
    vqa_accuracy,
    vqa_accuracy_per_type,
    vqa_predictions,
    vqa_score,
    write_vqa_predictions,
)
from ...sections import doc
from ...task_catalogue import VqaSpec
from ..engine import to_device
from .base import FinetuneTask, TaskData, register_task

logger = get_logger(__name__)


@dataclass
class VqaData(TaskData):
    split_keys = ("questions", "annotations", "image_root", "index", "data_root")
    image_root: str | None = doc("the folder holding train2014/, val2014/, test2015/ (a split may give its own)", None)
    answer2label: str | None = doc("answer2label.txt (null: built from the train annotations)", None)
    answer_min_count: int = doc("an answer given this often in the train annotations becomes a label", 9, low=1)
    vqa_loss: str = doc(
        "bce: the official multi-label loss on soft scores | softmax: one answer per question",
        "bce",
        choices=("bce", "softmax"),
    )
    vqa_head: str = doc(
        "pooler: the official head on the pooled image CLS | answer_slot: read at a <mask> after the question, "
        "the head started from the init's MLM head (docs/finetuning.md)",
        "pooler",
        choices=("pooler", "answer_slot"),
    )
    vqa_evaluation: str = doc(
        "the official vqaEval.py whose accuracy is reported: 2021 (the current script) | 2016 (the one before its "
        "2021 correction, for comparing with older papers' val figures)",
        VQA_EVALUATION,
        choices=tuple(VQA_EVALUATIONS),
    )


@register_task
class VqaTask(VqaSpec, FinetuneTask):
    Data = VqaData

    def answer2label(self) -> dict[str, int]:
        if self.model_config is not None and self.model_config.id2label and len(self.model_config.id2label) > 2:
            return {answer: int(label) for label, answer in self.model_config.id2label.items()}
        if self.data.answer2label:
            return read_answer2label(self.data.answer2label)
        train = self.split("train")
        if "annotations" not in train:
            raise ValueError(
                "The official index files hold labels, not answers: set data.answer2label to their answer2label.txt."
            )
        return build_answer_vocabulary([train["annotations"]], min_count=self.data.answer_min_count)

    def config_overrides(self) -> dict:
        return {
            "id2label": {label: answer for answer, label in self.answer2label().items()},
            "vqa_loss": self.data.vqa_loss,
            "vqa_head": self.data.vqa_head,
        }

    def prepare_model(self, model, init: str | None) -> None:
        """An answer-slot head starts from the MLM head of a masked data modeling init (each answer: the mean of its
        pieces' rows), so the answer is read where pretraining learned to fill words in from the image."""
        if model.config.vqa_head != "answer_slot" or not init or not Path(init).is_dir():
            return
        mlm = read_folder_tensors(init, ("mlm_head.weight", "mlm_head.bias"))
        if mlm is None:
            return  # a VQA model already (its head was loaded), or a bare backbone: nothing to take over
        pieces = [
            self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            for answer in label_to_answer(self.answer2label())
        ]
        model.init_answer_head_from_mlm(mlm["mlm_head.weight"], mlm["mlm_head.bias"], pieces)
        logger.info(f"vqa: the answer-slot head starts from the MLM head of {init} ({len(pieces)} answers)")

    def records(self, split: str):
        spec = self.split(split)
        if "index" in spec:
            return read_vqa_index(spec["index"], spec["data_root"])
        result = read_vqa(
            spec["questions"],
            spec.get("image_root", self.data.image_root),
            spec.get("annotations"),
            self.answer2label() if spec.get("annotations") else None,
            drop_unlabeled=split == "train",
        )
        if result.out_of_vocabulary_answers:
            logger.info(
                f"vqa {split}: {result.out_of_vocabulary_answers} annotator answers are outside the answer vocabulary and were ignored"
                + (
                    f"; {result.dropped_questions} questions had no answer in it and were left out"
                    if result.dropped_questions
                    else ""
                )
            )
        return result.records

    def dataset(self, split: str, train: bool = False):
        return VqaDataset(
            self.records(split),
            self.image_transform(train),
            self.tokenizer,
            self.model_config.num_labels,
            self.max_text_length,
            answer_slot=self.model_config.vqa_head == "answer_slot",
        )

    def train_dataset(self):
        return self.dataset("train", train=True)

    def step(self, module, batch, step: int):
        inputs, _ = split_batch(batch)
        out = module(**inputs)
        chosen = inputs["labels"].gather(1, out.logits.argmax(dim=-1, keepdim=True))
        return out.loss, {"vqa_score": chosen.mean()}

    def _answers(self, model, split: str):
        dataset = self.dataset(split)
        answers = label_to_answer(self.answer2label())
        predictions, soft_scores, logits_seen = {}, [], []
        with torch.no_grad(), self.eval_autocast(model):
            for inputs, meta in self.eval_batches(dataset):
                labels = inputs.pop("labels", None)
                logits = model(**to_device(inputs, next(model.parameters()).device)).logits.float().cpu()
                predictions.update(
                    (p["question_id"], p["answer"]) for p in vqa_predictions(logits, meta["question_id"], answers)
                )
                if labels is not None:
                    soft_scores.append(labels)
                    logits_seen.append(logits)
        return predictions, dataset.records, soft_scores, logits_seen

    def evaluate(self, model, output_dir):
        predictions, records, soft_scores, logits = self._answers(model, "eval")
        write_vqa_predictions(output_dir / self.eval_file(self.eval_predictions_file), predictions)
        truth = answers_from_records(records)
        if truth:  # the official accuracy against the 10 raw annotator answers, overall and per question type
            version = self.data.vqa_evaluation
            return {
                "accuracy": vqa_accuracy(predictions, truth, version),
                "evaluation": f"vqaEval.py {version}: {VQA_EVALUATIONS[version]}",
                **self._per_question_type(predictions, truth, records),
            }
        if soft_scores:  # index files: the soft-score proxy
            return {
                "accuracy": vqa_score(torch.cat(logits), torch.cat(soft_scores)),
                "evaluation": "VQAScore proxy: the soft score of the arg-max answer (the index files hold no answers)",
            }
        raise ValueError("The eval split has no answers to score against; use mode predict for test questions.")

    def _per_question_type(self, predictions: dict[int, str], truth: dict[int, list[str]], records) -> dict:
        """``{"per_question_type": {type: {"accuracy", "prior", "questions"}}}`` where the annotations give question
        types; ``prior`` is the accuracy of always giving the type's most frequent training answer (the score of a
        model that reads the question and not the image); ``records``: the eval split's."""
        types = {r.question_id: r.question_type for r in records if r.question_type}
        if not types:
            return {}
        train = self.split("train")
        prior = {}
        if "annotations" in train:
            most_common = answer_prior(
                (r.question_type, r.answer) for r in self.records("train") if r.question_type and r.answer
            )
            guesses = {q: most_common.get(kind, "") for q, kind in types.items()}
            prior = vqa_accuracy_per_type(guesses, truth, types, self.data.vqa_evaluation)
        counts = Counter(types[q] for q in truth if q in types)
        return {
            "per_question_type": {
                kind: {"accuracy": accuracy, "prior": prior.get(kind), "questions": counts[kind]}
                for kind, accuracy in vqa_accuracy_per_type(predictions, truth, types, self.data.vqa_evaluation).items()
            }
        }

    def predict(self, model, output_dir):
        predictions, *_ = self._answers(model, "predict")
        path = output_dir / self.predictions_file
        write_vqa_predictions(path, predictions)
        return path
