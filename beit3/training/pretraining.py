"""The step of masked data modeling: one forward per kind of input, one backward for their sum."""

from __future__ import annotations

from typing import Callable

import torch


def masked_data_modeling_step(visual_tokenizer=None) -> Callable:
    """A ``step_fn`` for ``Engine.fit`` over ``PretrainingBatches``. Visual targets are the batch's
    ``image_labels`` when it has them (codes precomputed by ``tokenizers/encode_images.py``), else they come
    from ``visual_tokenizer`` on the fly (no grad) from each image's tokenizer view; it may be None when
    every batch brings its labels.

    Returns (loss, values) with the loss and masked-token accuracy of each kind (image, text, pair), and the
    image-text matching loss and accuracy when the batch has an ``itm`` part (``itm_negatives``).
    """

    def step(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, values = [], {}
        if "image" in batch:
            image = batch["image"]
            if "image_labels" in image:
                codes = image["image_labels"]
            elif visual_tokenizer is None:
                raise ValueError("The image batch has no image_labels (precomputed codes) and there is no visual tokenizer to "
                                 "compute them; give one, or batches from load_sources(image_codes=...).")
            else:
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
        if "itm" in batch:
            out = module(**batch["itm"])
            losses.append(out.loss)
            values.update(itm_loss=out.itm_loss, itm_accuracy=out.itm_accuracy)
        return sum(losses), values

    return step
