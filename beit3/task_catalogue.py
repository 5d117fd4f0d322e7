"""What each fine-tuning task is, for every program that meets its models: its name and ``beit3 predict`` verb, its
head class, its headline metric, the head tensor that counts its labels, the files its evaluation and predictions
write, and how it answers ``beit3 predict`` on local images.

How a task is trained (its data section, readers, step, evaluation) builds on this in ``beit3.training.tasks``: each
training class there is also its task's ``TaskSpec``. The checkpoint tools (``convert``, ``export``, ``predict``)
read the catalogue alone, so they import neither the training code nor DeepSpeed. A task of another package
registers through the entry point group ``beit3.tasks`` (its training class); ``load_outside_tasks`` imports those
where every task is needed.

    task_spec("caption")       # CaptioningSpec, by name or predict verb
    all_specs()                # {name: spec}, the package's and other packages' tasks
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from .data.vqa import insert_answer_slot
from .image_processing_beit3 import Beit3ImageProcessor
from .modeling_heads import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
)
from .processing_beit3 import Beit3Processor

ENTRY_POINT_GROUP = "beit3.tasks"

# {name: spec}: the package's tasks, registered below, and other packages' once load_outside_tasks ran.
TASK_SPECS: dict[str, type[TaskSpec]] = {}


class TaskSpec:
    """One task, as the programs that meet its models see it. Subclasses declare the fields; ``predict_examples``
    answers ``beit3 predict``."""

    name: ClassVar[str]  # beit3 finetune <name>, tasks/<name>.py, configs/tasks/<name>_*.yaml
    model_class: ClassVar[type]  # its head model (beit3.modeling_heads)
    metric: ClassVar[str]  # the headline score: a key of the evaluation's result, higher is better
    metric_label: ClassVar[str]  # how reports name the headline score, e.g. "VQA accuracy (%)"
    reads_text: ClassVar[bool] = True  # False: the task needs no text tokenizer (images alone)
    # The head tensor whose first dimension counts the labels (None: the head has no labels): how beit3 convert
    # sizes the head of an official fine-tuned checkpoint and tells it from another task's.
    label_key: ClassVar[str | None] = None
    predict_verb: ClassVar[str]  # beit3 predict <verb> (the name works too)
    eval_predictions_file: ClassVar[str | None] = None  # what the evaluation writes beside eval_results.json
    predictions_file: ClassVar[str]  # what --mode predict writes into the output folder

    @classmethod
    def held_out_predictions(cls, output_dir: Path) -> list | None:
        """What the model predicted for each held-out example, as the evaluation wrote it into ``output_dir``; None
        for a task whose predictions are rankings or scores rather than one answer each."""
        return None

    @classmethod
    def example_image_processor(cls, size: int) -> Beit3ImageProcessor:
        return Beit3ImageProcessor(size=size)

    @classmethod
    def predict_examples(
        cls, model, image_processor, tokenizer, images: dict[str, Image.Image], texts: list[str] | None, options: dict
    ) -> list[str]:
        """The lines ``beit3 predict`` prints for ``images`` ({path: picture}) and ``texts`` (``tokenizer`` is None
        for a task that reads no text). ``options``: ``top`` (answers or classes listed), ``max_length`` and
        ``num_beams`` (generation). Input the task cannot take raises ValueError, saying what it needs."""
        raise NotImplementedError


def register_spec(spec: type[TaskSpec]) -> type[TaskSpec]:
    """Makes ``spec`` known by its ``name`` and ``predict_verb``. A name or verb another task holds is refused: one
    of them would silently shadow the other."""
    taken = {
        word: other.name
        for other in TASK_SPECS.values()
        if other.name != spec.name
        for word in (other.name, other.predict_verb)
    }
    for word in {spec.name, spec.predict_verb}:
        if word in taken:
            raise ValueError(
                f"{spec.__module__}.{spec.__name__} is named {word!r}, as the task {taken[word]!r} is: "
                "give it another name (or predict_verb)."
            )
    TASK_SPECS[spec.name] = spec
    return spec


_outside_tasks_loaded = False


def load_outside_tasks() -> None:
    """Imports the tasks other packages declare in the entry point group ``beit3.tasks``, once; each registers
    itself."""
    global _outside_tasks_loaded
    if _outside_tasks_loaded:
        return
    # Marked first: such a module imports beit3.training.tasks, which calls this again while the module is half built
    _outside_tasks_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def all_specs() -> dict[str, type[TaskSpec]]:
    load_outside_tasks()
    return dict(TASK_SPECS)


def task_spec(name: str) -> type[TaskSpec]:
    """The task called ``name``, or by its ``beit3 predict`` verb (``caption``: captioning); KeyError names the
    known ones."""
    for spec in all_specs().values():
        if name in (spec.name, spec.predict_verb):
            return spec
    raise KeyError(f"unknown task {name!r}; the tasks are {', '.join(TASK_SPECS)}")


def ranked_labels(probabilities: torch.Tensor, names: dict, top: int) -> str:
    """``"name p, name p, ..."``: the ``top`` most probable labels of one example's ``probabilities`` (labels,)."""
    best = probabilities.topk(min(top, probabilities.numel()))
    return ", ".join(f"{names.get(int(i), i)} {p:.3f}" for p, i in zip(best.values, best.indices))


def require_texts(texts: list[str] | None) -> list[str]:
    if not texts or not all(t.strip() for t in texts):
        raise ValueError("this task needs non-empty --text / --texts.")
    return texts


def texts_per_image(texts: list[str] | None, images: int) -> list[str]:
    """One text per image from ``texts``: one for all, or one each; anything else raises ValueError."""
    require_texts(texts)
    if len(texts) not in (1, images):
        raise ValueError(f"give one text, or one per image ({images}); got {len(texts)}.")
    return texts if len(texts) == images else texts[:1] * images


@register_spec
class VqaSpec(TaskSpec):
    """VQAv2: the answer to a question about an image."""

    name, model_class = "vqa", Beit3ForVisualQuestionAnswering
    metric, metric_label = "accuracy", "VQA accuracy (%)"
    label_key = "head.3.weight"
    predict_verb = "vqa"
    eval_predictions_file, predictions_file = "vqa_eval_predictions.json", "vqa_predictions.json"

    @classmethod
    def held_out_predictions(cls, output_dir: Path) -> list[str]:
        return [p["answer"] for p in json.loads((output_dir / cls.eval_predictions_file).read_text())]

    @classmethod
    def predict_examples(cls, model, image_processor, tokenizer, images, texts, options):
        questions = texts_per_image(texts, len(images))
        processor = Beit3Processor(image_processor=image_processor, tokenizer=tokenizer)
        inputs = processor(images=list(images.values()), text=questions, return_tensors="pt")
        if model.config.vqa_head == "answer_slot":
            inputs.update(insert_answer_slot(inputs["input_ids"], inputs["attention_mask"], model.config.mask_token_id))
        logits = model(**inputs).logits
        probabilities = logits.softmax(-1) if model.config.vqa_loss == "softmax" else logits.sigmoid()
        return [
            f"{path} | {question}: {ranked_labels(row, model.config.id2label, options['top'])}"
            for path, question, row in zip(images, questions, probabilities)
        ]


@register_spec
class Nlvr2Spec(TaskSpec):
    """NLVR2: is a statement true of a pair of images?"""

    name, model_class = "nlvr2", Beit3ForVisualReasoning
    metric, metric_label = "accuracy", "accuracy (%)"
    label_key = "head.dense2.weight"
    predict_verb = "nlvr2"
    eval_predictions_file, predictions_file = "nlvr2_eval_predictions.csv", "nlvr2_predictions.csv"

    @classmethod
    def held_out_predictions(cls, output_dir: Path) -> list[str]:
        lines = (output_dir / cls.eval_predictions_file).read_text().splitlines()
        return [line.rsplit(",", 1)[-1] for line in lines if line]

    @classmethod
    def predict_examples(cls, model, image_processor, tokenizer, images, texts, options):
        statement = require_texts(texts)[0]
        if len(images) != 2 or len(texts) != 1:
            raise ValueError("nlvr2 takes exactly two --images and one --text statement.")
        pixel_values = image_processor(list(images.values()), return_tensors="pt")["pixel_values"].unsqueeze(0)
        text = tokenizer([statement], padding="max_length", truncation=True, return_tensors="pt")
        prob_true = model(pixel_values=pixel_values, **text).logits.softmax(-1)[0, 1].item()
        left, right = images
        return [
            f"{statement!r} about {left} and {right}: {'true' if prob_true >= 0.5 else 'false'} (p(true) = {prob_true:.3f})"
        ]


@register_spec
class RetrievalSpec(TaskSpec):
    """Image-text retrieval: each image's best captions, each caption's best images."""

    name, model_class = "retrieval", Beit3ForImageTextRetrieval
    metric, metric_label = "tr_r1", "image->text R@1 (%)"
    predict_verb = "retrieve"
    predictions_file = "retrieval_predictions.json"

    @classmethod
    def predict_examples(cls, model, image_processor, tokenizer, images, texts, options):
        candidates = require_texts(texts)
        image_embeds = model.get_image_features(
            image_processor(list(images.values()), return_tensors="pt")["pixel_values"]
        ).pooler_output
        text = tokenizer(candidates, padding="max_length", truncation=True, return_tensors="pt")
        scores = image_embeds @ model.get_text_features(text["input_ids"], text["attention_mask"]).pooler_output.t()
        return [
            f"{path}: best match {candidates[int(row.argmax())]!r} ("
            + ", ".join(f"{s:.3f}" for s in row.tolist())
            + ")"
            for path, row in zip(images, scores)
        ]


@register_spec
class CaptioningSpec(TaskSpec):
    """Image captioning: the official causal masked LM's captions."""

    name, model_class = "captioning", Beit3ForCaptioning
    metric, metric_label = "CIDEr", "CIDEr"
    predict_verb = "caption"
    eval_predictions_file, predictions_file = "captions_eval.json", "captions.json"

    @classmethod
    def held_out_predictions(cls, output_dir: Path) -> list[str]:
        return [p["caption"] for p in json.loads((output_dir / cls.eval_predictions_file).read_text())]

    @classmethod
    def predict_examples(cls, model, image_processor, tokenizer, images, texts, options):
        pixel_values = image_processor(list(images.values()), return_tensors="pt")["pixel_values"]
        ids = model.generate(  # length_penalty 0.6: the official beam scoring
            pixel_values, max_length=options["max_length"], num_beams=options["num_beams"], length_penalty=0.6
        )
        return [
            f"{path}: {caption}" for path, caption in zip(images, tokenizer.batch_decode(ids, skip_special_tokens=True))
        ]


@register_spec
class ClassificationSpec(TaskSpec):
    """Image classification (ImageNet's layout): each image's best classes."""

    name, model_class = "classification", Beit3ForImageClassification
    metric, metric_label = "top1", "top-1 (%)"
    reads_text = False
    label_key = "head.weight"
    predict_verb = "classify"
    predictions_file = "classification_predictions.json"

    @classmethod
    def example_image_processor(cls, size: int) -> Beit3ImageProcessor:
        return Beit3ImageProcessor.for_imagenet(size=size)

    @classmethod
    def predict_examples(cls, model, image_processor, tokenizer, images, texts, options):
        pixel_values = image_processor(list(images.values()), return_tensors="pt")["pixel_values"]
        probabilities = model(pixel_values=pixel_values).logits.softmax(-1)
        return [
            f"{path}: {ranked_labels(row, model.config.id2label, options['top'])}"
            for path, row in zip(images, probabilities)
        ]
