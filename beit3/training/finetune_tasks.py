"""What each fine-tuning task adds to the runner (``beit3.training.finetune``): its readers, training
step, evaluation and prediction files. The ``data`` section of a task config names the splits:

    vqa:            {train|eval|predict: {questions: v2_OpenEnded_..._questions.json, annotations: v2_mscoco_..._annotations.json}
                     or {index: vqa.train.jsonl, data_root: DIR}}, image_root (holds train2014/, val2014/, test2015/),
                    answer2label (answer2label.txt; null: built from the train annotations, min count answer_min_count),
                    vqa_loss (bce: the official multi-label loss on soft scores; softmax: one answer per question)
    nlvr2:          {train|eval|predict: {file: train.json, images: images/train} or {index: nlvr2.train.index.jsonl, data_root: DIR}}
    retrieval:      {train|eval|predict: {karpathy: dataset_coco.json, image_root: DIR, split: train|val|test}}; train may
                    instead be {pairs: [pairs.jsonl, ...]} (the pretraining pair lists: the image-text contrastive stage)
    captioning:     the same as retrieval; mask_prob, label_smoothing, drop_worst_after, drop_worst_ratio
    classification: {train|eval|predict: {folder: DIR}} (class folders; predict: any folder of images); mixup, cutmix,
                    label_smoothing
    all:            max_text_length, augment (none | randaug | imagenet), hflip

The ``eval`` section: batch_size, precision, num_workers; captioning also max_length, num_beams, length_penalty.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..checkpoints import read_folder_tensors
from ..data.common import ImagesOfOthers, collate_trimmed, load_rgb, split_batch, transform_image
from ..data.imagenet import ImageClassificationDataset, read_image_folder
from ..data.images import list_images
from ..data.karpathy import (
    ImageOnlyDataset,
    ImageTextDataset,
    TextOnlyDataset,
    captioning_records,
    pair_list_records,
    read_karpathy,
    retrieval_records,
)
from ..data.nlvr2 import Nlvr2Dataset, read_nlvr2, read_nlvr2_index
from ..data.vqa import (
    VqaDataset,
    answers_from_records,
    build_answer_vocabulary,
    label_to_answer,
    read_answer2label,
    read_vqa,
    read_vqa_index,
)
from ..image_processing_beit3 import VL_MEAN, VL_STD, Beit3ImageProcessor
from ..io import atomic_file
from ..log import get_logger
from ..masking import mask_caption_tokens
from ..metrics import (
    answer_prior,
    caption_scores,
    classification_accuracy,
    retrieval_recall,
    vqa_accuracy,
    vqa_accuracy_per_type,
    vqa_predictions,
    vqa_score,
    write_caption_results,
    write_json_atomic,
    write_vqa_predictions,
)
from ..modeling_heads import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
)
from .config import Section, check_keys, doc
from .engine import to_device
from .runner import autocast, ordered_batches

logger = get_logger(__name__)


@dataclass
class EvalOptions(Section):
    """The ``eval`` section of a task config."""

    section: ClassVar[str] = "eval"
    batch_size: int = doc("examples per evaluation batch", 64, low=1)
    precision: str = doc("fp32 | bf16 | fp16: autocast of evaluation", "fp32", choices=("fp32", "bf16", "fp16"))
    num_workers: int = doc("data-loader workers of evaluation", 0, low=0)
    max_length: int | None = doc("captioning: most tokens a caption gets (null: data.max_text_length)", None, low=2)
    num_beams: int = doc("captioning: beam width (1: greedy)", 3, low=1)
    length_penalty: float = doc(
        "captioning: beam search's length penalty (the official 0.6; transformers' default is 1.0)", 0.6
    )


@dataclass
class TaskData(Section):
    """The ``data`` section every task config has; each task adds its own options (``VqaData``, ...)."""

    section: ClassVar[str] = "data"
    train: dict | None = doc("the training split (its keys per task: see the module docstring)", None)
    eval: dict | None = doc("the held-out split scored after training and by --mode evaluate", None)
    predict: dict | None = doc("the split --mode predict writes predictions for", None)
    deepspeed: str | None = doc("a DeepSpeed JSON (null: configs/deepspeed/zero<train.zero_stage>.json)", None)
    max_text_length: int = doc("tokens per text, <s> and </s> included", 64, low=3)
    augment: str = doc(
        "training images: none (the evaluation transform) | randaug | imagenet",
        "none",
        choices=("none", "randaug", "imagenet"),
    )
    hflip: float = doc("flip probability of the randaug and imagenet augmentations", 0.0, low=0, high=1)
    skip_unreadable_images: bool = doc(
        "training: an example whose image does not decode is replaced by the next one, named "
        "and counted (skipped_images in metrics.jsonl); false: the run stops at it",
        True,
    )
    # The keys a split (train, eval, predict) may hold, per task: its readers' (see the module docstring).
    split_keys: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        super().__post_init__()
        for name in ("train", "eval", "predict"):
            check_keys(f"data.{name}", getattr(self, name), self.split_keys)


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


@dataclass
class Nlvr2Data(TaskData):
    split_keys = ("file", "images", "index", "data_root")


@dataclass
class RetrievalData(TaskData):
    split_keys = ("karpathy", "image_root", "split", "pairs")


@dataclass
class CaptioningData(TaskData):
    split_keys = ("karpathy", "image_root", "split")
    max_text_length: int = doc("tokens per caption, <s> and </s> included", 32, low=3)
    mask_prob: float = doc(
        "share of a caption's tokens masked (the official 0.6; the COCO recipe 0.7)", 0.6, above=0, high=1
    )
    label_smoothing: float = doc("of the masked-token cross-entropy", 0.1, low=0, below=1)
    drop_worst_after: int = doc(
        "from this step on, the worst drop_worst_ratio of the masked tokens are left out", 12000, low=0
    )
    drop_worst_ratio: float = doc("see drop_worst_after", 0.2, low=0, below=1)


@dataclass
class ClassificationData(TaskData):
    split_keys = ("folder",)
    mixup: float = doc("timm Mixup's mixup alpha (0: off)", 0.0, low=0)
    cutmix: float = doc("timm Mixup's cutmix alpha (0: off)", 0.0, low=0)
    label_smoothing: float = doc(
        "of the targets: timm Mixup's with mixup or cutmix on, the loss's otherwise", 0.1, low=0, below=1
    )


class FinetuneTask:
    """A task's pieces. ``config_overrides`` read the data alone; ``setup`` then gives the task the tokenizer and
    the model's config, once the model is built (or loaded, to evaluate or predict)."""

    name: str
    model_class: type
    metric: str  # the headline score (a key of ``evaluate``'s result; higher is better)
    reads_text: ClassVar[bool] = True  # False: the task needs no text tokenizer (images alone)

    Data: ClassVar[type[TaskData]] = TaskData  # the task's data section

    def __init__(self, data: TaskData | dict, eval_options: EvalOptions | dict | None = None):
        self.data = data if isinstance(data, Section) else self.Data.from_config(data)
        self.eval_options = eval_options if isinstance(eval_options, Section) else EvalOptions.from_config(eval_options)
        self.tokenizer, self.model_config = None, None
        self.max_text_length = self.data.max_text_length
        self.blind = False  # evaluate with the images swapped between examples (a control; see ImagesOfOthers)

    def setup(self, tokenizer, model_config) -> None:
        self.tokenizer, self.model_config = tokenizer, model_config

    def prepare_model(self, model, init: str | None) -> None:
        """After ``setup``, before training: whatever the task takes over from the model it starts from (``init``)."""

    def split(self, name: str) -> dict:
        spec = getattr(self.data, name, None)
        if not spec:
            raise KeyError(
                f"The config's data section has no {name!r} split; add data.{name} (see beit3/training/finetune_tasks.py)."
            )
        return spec

    # -- overridable pieces ------------------------------------------------------------------------
    def config_overrides(self) -> dict:
        """Config fields the task sets on the model it trains (labels, label smoothing)."""
        return {}

    def image_transform(self, train: bool):
        """Evaluation: the released models' processor (bicubic resize, mean = std = 0.5). Training: the same,
        or with ``data.augment: randaug`` timm's random resized crop (scale 0.5-1) and RandAugment, as unilm."""
        size = self.model_config.image_size
        if not train or self.data.augment == "none":
            return Beit3ImageProcessor(size={"height": size, "width": size})
        from timm.data import create_transform

        imagenet = self.data.augment == "imagenet"  # (else randaug: the data section allows no other value)
        return create_transform(
            size,
            is_training=True,
            scale=(0.08, 1.0) if imagenet else (0.5, 1.0),
            hflip=self.data.hflip,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic",
            re_prob=0.25 if imagenet else 0.0,
            mean=IMAGENET_DEFAULT_MEAN if imagenet else VL_MEAN,
            std=IMAGENET_DEFAULT_STD if imagenet else VL_STD,
        )

    def collate(self, items: list[dict]) -> dict:
        return collate_trimmed(items)

    def eval_file(self, name: str) -> str:
        """The name of an evaluation output file; a blind control's own (``blind_<name>``) beside it."""
        return f"blind_{name}" if self.blind else name

    def eval_batches(self, dataset):
        if self.blind:
            dataset = ImagesOfOthers(dataset, seed=0)
        return ordered_batches(dataset, self.eval_options.batch_size, self.eval_options.num_workers, collate_trimmed)

    def eval_autocast(self, model):
        return autocast(self.eval_options.precision, next(model.parameters()).device)

    def step(self, module, batch: dict, step: int):
        """``Engine.fit``'s step: (loss, {name: value}) of one micro-batch of step number ``step``."""
        raise NotImplementedError

    def train_dataset(self):
        raise NotImplementedError

    def evaluate(self, model, output_dir: Path) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, model, output_dir: Path) -> Path:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ VQA


class VqaTask(FinetuneTask):
    name, model_class, metric = "vqa", Beit3ForVisualQuestionAnswering, "accuracy"
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
        write_vqa_predictions(output_dir / self.eval_file("vqa_eval_predictions.json"), predictions)
        truth = answers_from_records(records)
        if truth:  # the official accuracy against the 10 raw annotator answers, overall and per question type
            return {
                "accuracy": vqa_accuracy(predictions, truth),
                **self._per_question_type(predictions, truth, records),
            }
        if soft_scores:  # index files: the soft-score proxy
            return {"accuracy": vqa_score(torch.cat(logits), torch.cat(soft_scores))}
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
            prior = vqa_accuracy_per_type(guesses, truth, types)
        counts = Counter(types[q] for q in truth if q in types)
        return {
            "per_question_type": {
                kind: {"accuracy": accuracy, "prior": prior.get(kind), "questions": counts[kind]}
                for kind, accuracy in vqa_accuracy_per_type(predictions, truth, types).items()
            }
        }

    def predict(self, model, output_dir):
        predictions, *_ = self._answers(model, "predict")
        path = output_dir / "vqa_predictions.json"
        write_vqa_predictions(path, predictions)
        return path


# ---------------------------------------------------------------------------------------------- NLVR2


class Nlvr2Task(FinetuneTask):
    name, model_class, metric = "nlvr2", Beit3ForVisualReasoning, "accuracy"
    Data = Nlvr2Data

    def config_overrides(self) -> dict:
        return {"num_labels": 2}

    def dataset(self, split: str, train: bool = False):
        spec = self.split(split)
        records = (
            read_nlvr2_index(spec["index"], spec["data_root"])
            if "index" in spec
            else read_nlvr2(spec["file"], spec["images"])
        )
        return Nlvr2Dataset(records, self.image_transform(train), self.tokenizer, self.max_text_length)

    def train_dataset(self):
        return self.dataset("train", train=True)

    def step(self, module, batch, step: int):
        inputs, _ = split_batch(batch)
        out = module(**inputs)
        return out.loss, {"accuracy": (out.logits.argmax(-1) == inputs["labels"]).float().mean()}

    def _predictions(self, model, split: str) -> tuple[list[tuple[str, int]], list[int]]:
        rows, labels = [], []
        with torch.no_grad(), self.eval_autocast(model):
            for inputs, meta in self.eval_batches(self.dataset(split)):
                labels += inputs.pop("labels").tolist()
                logits = model(**to_device(inputs, next(model.parameters()).device)).logits
                rows += list(zip(meta["identifier"], logits.argmax(-1).tolist()))
        return rows, labels

    @staticmethod
    def _write(rows, path: Path) -> Path:
        """lil-lab's evaluation format: ``identifier,True|False`` per line."""
        with atomic_file(path, "w", newline="") as handle:
            csv.writer(handle).writerows((identifier, "True" if label else "False") for identifier, label in rows)
        return path

    def evaluate(self, model, output_dir):
        rows, labels = self._predictions(model, "eval")
        self._write(rows, output_dir / self.eval_file("nlvr2_eval_predictions.csv"))
        return {"accuracy": 100.0 * sum(p == t for (_, p), t in zip(rows, labels)) / len(labels)}

    def predict(self, model, output_dir):
        return self._write(self._predictions(model, "predict")[0], output_dir / "nlvr2_predictions.csv")


# ----------------------------------------------------------------------------------- retrieval, captioning


class _KarpathyTask(FinetuneTask):
    def images(self, split: str):
        spec = self.split(split)
        return read_karpathy(
            spec["karpathy"],
            spec["image_root"],
            spec.get("split", {"eval": "val", "predict": "test"}.get(split, split)),
        )


class RetrievalTask(_KarpathyTask):
    name, model_class, metric = "retrieval", Beit3ForImageTextRetrieval, "tr_r1"
    Data = RetrievalData

    def train_dataset(self):
        pairs = self.split("train").get("pairs")
        if pairs:  # the image-text contrastive stage on pretraining pairs, before fine-tuning on COCO or Flickr30k
            records = pair_list_records([pairs] if isinstance(pairs, str) else pairs)
        else:
            records = retrieval_records(self.images("train"))
        return ImageTextDataset(records, self.image_transform(True), self.tokenizer, self.max_text_length)

    def step(self, module, batch, step: int):
        inputs, _ = split_batch(batch)
        out = module(**inputs, return_loss=True)
        targets = torch.arange(len(out.logits_per_image), device=out.logits_per_image.device)
        return out.loss, {"accuracy": (out.logits_per_image.argmax(-1) == targets).float().mean()}

    def embed(self, model, split: str):
        """(image embeddings, image ids, text embeddings, each text's image id, the records)."""
        images = self.images(split)
        records = retrieval_records(images)
        device = next(model.parameters()).device
        image_embeds, image_ids, text_embeds, text_ids = [], [], [], []
        with torch.no_grad(), self.eval_autocast(model):
            for inputs, meta in self.eval_batches(ImageOnlyDataset(images, self.image_transform(False))):
                image_embeds.append(model.get_image_features(inputs["pixel_values"].to(device)).float().cpu())
                image_ids.append(meta["image_id"])
            for inputs, meta in self.eval_batches(TextOnlyDataset(records, self.tokenizer, self.max_text_length)):
                text_embeds.append(model.get_text_features(**to_device(inputs, device)).float().cpu())
                text_ids.append(meta["image_id"])
        return torch.cat(image_embeds), torch.cat(image_ids), torch.cat(text_embeds), torch.cat(text_ids), records

    def evaluate(self, model, output_dir):
        image_embeds, image_ids, text_embeds, text_ids, _ = self.embed(model, "eval")
        return retrieval_recall(image_embeds, text_embeds, text_ids, image_ids)

    def predict(self, model, output_dir, top: int = 5):
        """For each image of the split, its ``top`` best captions: ``[{"image_id", "image", "captions": [...], "scores": [...]}]``."""
        image_embeds, image_ids, text_embeds, _, records = self.embed(model, "predict")
        scores, best = (image_embeds @ text_embeds.t()).topk(min(top, len(records)), dim=-1)
        paths = {r.image_id: r.image_path for r in records}
        items = [
            {
                "image_id": int(i),
                "image": paths[int(i)],
                "captions": [records[j].caption for j in row],
                "scores": [round(v, 4) for v in s],
            }
            for i, row, s in zip(image_ids.tolist(), best.tolist(), scores.tolist())
        ]
        path = output_dir / "retrieval_predictions.json"
        write_json_atomic(path, items)
        return path


class CaptioningTask(_KarpathyTask):
    name, model_class, metric = "captioning", Beit3ForCaptioning, "CIDEr"
    Data = CaptioningData

    def __init__(self, data: CaptioningData | dict, eval_options: EvalOptions | dict | None = None):
        super().__init__(data, eval_options)
        self.mask_prob, self.label_smoothing = self.data.mask_prob, self.data.label_smoothing
        self.drop_worst_after, self.drop_worst_ratio = self.data.drop_worst_after, self.data.drop_worst_ratio

    def config_overrides(self) -> dict:
        return {"label_smoothing": self.label_smoothing}

    def train_dataset(self):
        return ImageTextDataset(
            captioning_records(self.images("train"), train=True),
            self.image_transform(True),
            self.tokenizer,
            self.max_text_length,
        )

    def step(self, module, batch, step: int):
        """The official causal masked LM: corrupt some caption tokens, predict them with label smoothing;
        after ``drop_worst_after`` steps the worst ``drop_worst_ratio`` of the masked tokens are left out."""
        inputs, _ = split_batch(batch)
        input_ids, labels = mask_caption_tokens(
            inputs["input_ids"], inputs["attention_mask"], self.model_config.mask_token_id, self.mask_prob
        )
        logits = module(
            pixel_values=inputs["pixel_values"], input_ids=input_ids, attention_mask=inputs["attention_mask"]
        ).logits
        chosen = labels != -100
        logits, targets = logits[chosen].float(), labels[chosen]
        losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)
        if step >= self.drop_worst_after:
            keep = max(1, int(len(losses) * (1 - self.drop_worst_ratio)))
            losses = losses.topk(keep, largest=False).values
        return losses.mean(), {"accuracy": (logits.argmax(-1) == targets).float().mean()}

    def _captions(self, model, split: str, records) -> dict[int, str]:
        options = {
            "max_length": self.eval_options.max_length or self.max_text_length,
            "num_beams": self.eval_options.num_beams,
            "length_penalty": self.eval_options.length_penalty,
        }
        predictions = {}
        with torch.no_grad(), self.eval_autocast(model):
            for inputs, meta in self.eval_batches(ImageOnlyDataset(records, self.image_transform(False))):
                ids = model.generate(inputs["pixel_values"].to(next(model.parameters()).device), **options)
                texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
                predictions.update({int(i): t.strip() for i, t in zip(meta["image_id"].tolist(), texts)})
        return predictions

    def evaluate(self, model, output_dir):
        records = captioning_records(self.images("eval"), train=False)
        predictions = self._captions(model, "eval", records)
        write_caption_results(output_dir / self.eval_file("captions_eval.json"), predictions)
        scores = caption_scores(predictions, {r.image_id: r.references for r in records})
        return {"CIDEr": scores["CIDEr"], "Bleu_4": scores["Bleu_4"]}

    def predict(self, model, output_dir):
        path = output_dir / "captions.json"
        write_caption_results(
            path, self._captions(model, "predict", captioning_records(self.images("predict"), train=False))
        )
        return path


# -------------------------------------------------------------------------------------- classification


class ClassificationTask(FinetuneTask):
    name, model_class, metric = "classification", Beit3ForImageClassification, "top1"
    reads_text = False
    Data = ClassificationData

    def __init__(self, data: ClassificationData | dict, eval_options: EvalOptions | dict | None = None):
        super().__init__(data, eval_options)
        self.mixup = None
        if self.data.mixup > 0 or self.data.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=self.data.mixup,
                cutmix_alpha=self.data.cutmix,
                label_smoothing=self.data.label_smoothing,
                num_classes=1,
            )  # num_classes set in setup

    def classes(self) -> list[str]:
        if (
            self.model_config is not None
            and self.model_config.id2label
            and "LABEL_0" not in self.model_config.id2label.values()
        ):
            return [self.model_config.id2label[i] for i in range(self.model_config.num_labels)]

        return read_image_folder(self.split("train")["folder"]).classes

    def setup(self, tokenizer, model_config) -> None:
        super().setup(tokenizer, model_config)
        if self.mixup is not None and model_config is not None:
            self.mixup.num_classes = model_config.num_labels

    def config_overrides(self) -> dict:
        return {"id2label": dict(enumerate(self.classes())), "label_smoothing": self.data.label_smoothing}

    def image_transform(self, train: bool):
        if not train and self.data.augment == "imagenet":
            return Beit3ImageProcessor.for_imagenet(self.model_config.image_size)
        return super().image_transform(train)

    def dataset(self, split: str, train: bool = False):
        return ImageClassificationDataset(
            read_image_folder(self.split(split)["folder"], self.classes()).records, self.image_transform(train)
        )

    def train_dataset(self):
        return self.dataset("train", train=True)

    def step(self, module, batch, step: int):
        inputs, _ = split_batch(batch)
        hard = inputs["labels"]
        # Soft targets (B, classes); timm's mixup draws from numpy, which the engine seeds per step
        if self.mixup is not None:
            inputs["pixel_values"], inputs["labels"] = self.mixup(inputs["pixel_values"], inputs["labels"])
        out = module(**inputs)
        return out.loss, {"accuracy": (out.logits.argmax(-1) == hard).float().mean()}

    def evaluate(self, model, output_dir):
        logits, labels = [], []
        with torch.no_grad(), self.eval_autocast(model):
            for inputs, _ in self.eval_batches(self.dataset("eval")):
                labels.append(inputs.pop("labels"))
                logits.append(model(**to_device(inputs, next(model.parameters()).device)).logits.float().cpu())
        return classification_accuracy(
            torch.cat(logits), torch.cat(labels), topk=(1, min(5, self.model_config.num_labels))
        )

    def predict(self, model, output_dir):
        paths = list_images(self.split("predict")["folder"])
        classes, transform, rows = self.classes(), self.image_transform(False), []
        device = next(model.parameters()).device
        size = self.eval_options.batch_size
        with torch.no_grad(), self.eval_autocast(model):
            for start in range(0, len(paths), size):
                chunk = paths[start : start + size]
                pixel_values = torch.stack([transform_image(transform, load_rgb(p)) for p in chunk]).to(device)
                probs = model(pixel_values=pixel_values).logits.float().softmax(-1).cpu()
                rows += [
                    {"image": str(p), "label": classes[i], "score": round(float(s), 4)}
                    for p, (s, i) in zip(chunk, zip(*probs.max(-1)))
                ]
        path = output_dir / "classification_predictions.json"
        write_json_atomic(path, rows)
        return path


TASKS = {task.name: task for task in (VqaTask, Nlvr2Task, RetrievalTask, CaptioningTask, ClassificationTask)}
