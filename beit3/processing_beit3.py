"""Beit3Processor: one call that turns images and texts into the inputs of ``Beit3Model``."""

from __future__ import annotations

from transformers import ProcessorMixin


class Beit3Processor(ProcessorMixin):
    r"""A ``Beit3ImageProcessor`` and a ``Beit3Tokenizer`` behind one call.

    ``processor(images=..., text=..., return_tensors="pt")`` returns
        ``pixel_values`` (B, 3, S, S) when images are given, and
        ``input_ids`` (B, T) and ``attention_mask`` (B, T) (1 = token, 0 = padding) when texts are given.
    Texts are truncated and right-padded to the tokenizer's ``model_max_length`` (64), as unilm feeds
    the released models; pass ``padding=True`` (pad to the longest text), ``max_length=...`` or
    ``truncation=False`` to change that. Images and texts are paired by position, so a call with both
    needs as many of each, or one image with N texts (as CLIP's processor: the retrieval head scores the
    image against each text; a fused head needs the image repeated, ``pixel_values.expand(N, -1, -1, -1)``).
    """

    # Lowest-priority defaults (a call's own arguments win): unilm's fixed-length text format.
    text_kwargs = {"padding": "max_length", "truncation": True}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Raises ValueError for a call without input and for missing, empty or non-string texts."""
        if images is None and text is None:
            raise ValueError("Beit3Processor needs images, text or both; it got neither.")
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, list):
                raise ValueError(
                    f"text is a {type(text).__name__}; Beit3Processor takes a string or a list of strings."
                )
            if not texts:
                raise ValueError("text is an empty list; pass at least one string (or leave text out for images only).")
            for index, item in enumerate(texts):
                if not isinstance(item, str):
                    raise ValueError(
                        f"text[{index}] is a {type(item).__name__}; Beit3Processor takes a string or a list of strings."
                    )
                if not item.strip():
                    where = "text" if isinstance(text, str) else f"text[{index}]"
                    raise ValueError(
                        f"{where} is empty ({item!r}); every text needs at least one word. For an image alone "
                        "leave text out (text=None)."
                    )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def __call__(self, images=None, text=None, **kwargs):
        text = list(text) if isinstance(text, tuple) else text  # transformers takes lists only
        outputs = super().__call__(images=images, text=text, **kwargs)
        if (
            "pixel_values" in outputs
            and "input_ids" in outputs
            and len(outputs["pixel_values"]) not in (1, len(outputs["input_ids"]))
        ):
            raise ValueError(
                f"Got {len(outputs['pixel_values'])} images and {len(outputs['input_ids'])} texts; an image+text "
                "batch pairs them by position, so pass as many of each (or one image to score against every text)."
            )
        return outputs
