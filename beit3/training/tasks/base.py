"""What every fine-tuning task shares, and the registry of tasks by name.

A task is one module of this package (``beit3/training/tasks/<task>.py``) holding a ``FinetuneTask`` subclass
decorated with ``@register_task``. What the task is (its name, head class, metric, label tensor, file names and
``beit3 predict`` verb and answer) it takes from its ``TaskSpec`` in ``beit3.task_catalogue``, which the checkpoint
tools read without this package; its data section, readers, training step, evaluation and predictions are declared
and written here. ``beit3 finetune``, the configuration reference and the demo read ``TASKS``; a task of another
package registers through the ``beit3.tasks`` entry point group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ...data.common import ImagesOfOthers, collate_trimmed
from ...data.karpathy import read_karpathy
from ...image_processing_beit3 import VL_MEAN, VL_STD, Beit3ImageProcessor
from ...sections import Section, check_keys, doc
from ...task_catalogue import TASK_SPECS, TaskSpec, register_spec
from ..runner import autocast, ordered_batches

# {name: task class}, filled by @register_task as the task modules are imported (beit3.training.tasks does).
TASKS: dict[str, type[FinetuneTask]] = {}


def register_task(task_class: type[FinetuneTask]) -> type[FinetuneTask]:
    """Class decorator: makes ``task_class`` the training of its task. A task of the catalogue keeps its spec there;
    any other (another package's) becomes its own spec, refused when its name or verb is another task's."""
    if not issubclass(task_class, TASK_SPECS.get(task_class.name, ())):
        register_spec(task_class)
    TASKS[task_class.name] = task_class
    return task_class


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


class FinetuneTask(TaskSpec):
    """A task's pieces. ``config_overrides`` read the data alone; ``setup`` then gives the task the tokenizer and
    the model's config, once the model is built (or loaded, to evaluate or predict). What the task is comes from its
    ``TaskSpec`` (a training class lists it first among its bases)."""

    Data: ClassVar[type[TaskData]] = TaskData  # its data section

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
                f"The config's data section has no {name!r} split; add data.{name} (see beit3/training/tasks/{self.name}.py)."
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
        """Writes ``output_dir / predictions_file`` for the ``predict`` split, in the task's submission format."""
        raise NotImplementedError


class KarpathyTask(FinetuneTask):
    """Retrieval and captioning read the same splits: Karpathy's ``dataset_coco.json`` (or Flickr30k's)."""

    def images(self, split: str):
        spec = self.split(split)
        return read_karpathy(
            spec["karpathy"],
            spec["image_root"],
            spec.get("split", {"eval": "val", "predict": "test"}.get(split, split)),
        )
