"""NLVR2: is a statement true of a pair of images? Accuracy, and lil-lab's ``identifier,True|False`` files.

Data: ``{train|eval|predict: {file: train.json, images: images/train} or {index: nlvr2.train.index.jsonl, data_root: DIR}}``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from ...data.common import split_batch
from ...data.nlvr2 import Nlvr2Dataset, read_nlvr2, read_nlvr2_index
from ...io import atomic_file
from ...task_catalogue import Nlvr2Spec
from ..engine import to_device
from .base import FinetuneTask, TaskData, register_task


@dataclass
class Nlvr2Data(TaskData):
    split_keys = ("file", "images", "index", "data_root")


@register_task
class Nlvr2Task(Nlvr2Spec, FinetuneTask):
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
        self._write(rows, output_dir / self.eval_file(self.eval_predictions_file))
        return {"accuracy": 100.0 * sum(p == t for (_, p), t in zip(rows, labels)) / len(labels)}

    def predict(self, model, output_dir):
        return self._write(self._predictions(model, "predict")[0], output_dir / self.predictions_file)
