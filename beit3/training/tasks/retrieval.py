"""Image-text retrieval on COCO or Flickr30k (Karpathy's splits): recall@k both ways, each image's best captions.

Data: ``{train|eval|predict: {karpathy: dataset_coco.json, image_root: DIR, split: train|val|test}}``; train may instead
be ``{pairs: [pairs.jsonl, ...]}`` (the pretraining pair lists: the image-text contrastive stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.common import split_batch
from ...data.karpathy import ImageOnlyDataset, ImageTextDataset, TextOnlyDataset, pair_list_records, retrieval_records
from ...io import write_json_atomic
from ...metrics import RETRIEVAL_EVALUATION, retrieval_recall
from ...task_catalogue import RetrievalSpec
from ..engine import to_device
from .base import KarpathyTask, TaskData, register_task


@dataclass
class RetrievalData(TaskData):
    split_keys = ("karpathy", "image_root", "split", "pairs")


@register_task
class RetrievalTask(RetrievalSpec, KarpathyTask):
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
                image_embeds.append(
                    model.get_image_features(inputs["pixel_values"].to(device)).pooler_output.float().cpu()
                )
                image_ids.append(meta["image_id"])
            for inputs, meta in self.eval_batches(TextOnlyDataset(records, self.tokenizer, self.max_text_length)):
                text_embeds.append(model.get_text_features(**to_device(inputs, device)).pooler_output.float().cpu())
                text_ids.append(meta["image_id"])
        return torch.cat(image_embeds), torch.cat(image_ids), torch.cat(text_embeds), torch.cat(text_ids), records

    def evaluate(self, model, output_dir):
        image_embeds, image_ids, text_embeds, text_ids, _ = self.embed(model, "eval")
        return {**retrieval_recall(image_embeds, text_embeds, text_ids, image_ids), "evaluation": RETRIEVAL_EVALUATION}

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
        path = output_dir / self.predictions_file
        write_json_atomic(path, items)
        return path
