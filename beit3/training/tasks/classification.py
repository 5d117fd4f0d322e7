"""Image classification from class folders (ImageNet's layout): top-1 and top-5, each image's best class.

Data: ``{train|eval|predict: {folder: DIR}}`` (class folders; predict: any folder of images); ``mixup``, ``cutmix``,
``label_smoothing``; ``augment: imagenet`` for ImageNet's statistics and timm's ImageNet augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.common import load_rgb, split_batch, transform_image
from ...data.imagenet import ImageClassificationDataset, read_image_folder
from ...data.images import list_images
from ...image_processing_beit3 import Beit3ImageProcessor
from ...io import write_json_atomic
from ...metrics import classification_accuracy
from ...sections import doc
from ...task_catalogue import ClassificationSpec
from ..engine import to_device
from .base import EvalOptions, FinetuneTask, TaskData, register_task


@dataclass
class ClassificationData(TaskData):
    split_keys = ("folder",)
    mixup: float = doc("timm Mixup's mixup alpha (0: off)", 0.0, low=0)
    cutmix: float = doc("timm Mixup's cutmix alpha (0: off)", 0.0, low=0)
    label_smoothing: float = doc(
        "of the targets: timm Mixup's with mixup or cutmix on, the loss's otherwise", 0.1, low=0, below=1
    )


@register_task
class ClassificationTask(ClassificationSpec, FinetuneTask):
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
        path = output_dir / self.predictions_file
        write_json_atomic(path, rows)
        return path
