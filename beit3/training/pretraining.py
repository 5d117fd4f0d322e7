"""The step of masked data modeling: one forward per kind of input, one backward for their sum."""

from __future__ import annotations

from typing import Callable

import torch


def masked_data_modeling_step(visual_tokenizer) -> Callable:
    """A ``step_fn`` for ``Engine.fit`` over ``PretrainingBatches``: visual targets come from
    ``visual_tokenizer`` on the fly (no grad) from each image's tokenizer view.

    Returns (loss, values) with the loss and masked-token accuracy of each kind (image, text, pair).
    """

    def step(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, values = [], {}
        if "image" in batch:
            image = batch["image"]
            with torch.no_grad():
                codes = visual_tokenizer.get_codebook_indices(image["tokenizer_pixel_values"])
            out = module(pixel_values=image["pixel_values"], bool_masked_pos=image["bool_masked_pos"], image_labels=codes)
            losses.append(out.loss)
            values.update(image_loss=out.image_loss, image_accuracy=out.image_accuracy)
        for kind in ("text", "pair"):
            if kind in batch:
                out = module(**batch[kind])
                losses.append(out.loss)
                values.update({f"{kind}_loss": out.text_loss, f"{kind}_accuracy": out.text_accuracy})
        return sum(losses), values

    return step
