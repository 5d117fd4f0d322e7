"""Image captioning on COCO (Karpathy's splits): the official causal masked LM, CIDEr and BLEU-4, the captions JSON.

Data: as retrieval's (``{train|eval|predict: {karpathy: dataset_coco.json, image_root: DIR, split: ...}}``);
``mask_prob``, ``label_smoothing``, ``drop_worst_after``, ``drop_worst_ratio``. The ``eval`` section's
``max_length``, ``num_beams`` and ``length_penalty`` steer the decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...data.common import split_batch
from ...data.karpathy import ImageOnlyDataset, ImageTextDataset, captioning_records
from ...masking import mask_caption_tokens
from ...metrics import caption_evaluation, caption_scores, caption_tokenizer, write_caption_results
from ...sections import doc
from ...task_catalogue import CaptioningSpec
from .base import EvalOptions, KarpathyTask, TaskData, register_task


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


@register_task
class CaptioningTask(CaptioningSpec, KarpathyTask):
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
        write_caption_results(output_dir / self.eval_file(self.eval_predictions_file), predictions)
        tokenizer = caption_tokenizer()
        scores = caption_scores(predictions, {r.image_id: r.references for r in records}, tokenize=tokenizer)
        return {"CIDEr": scores["CIDEr"], "Bleu_4": scores["Bleu_4"], "evaluation": caption_evaluation(tokenizer)}

    def predict(self, model, output_dir):
        path = output_dir / self.predictions_file
        write_caption_results(
            path, self._captions(model, "predict", captioning_records(self.images("predict"), train=False))
        )
        return path
