"""Beit3Processor: images and texts in, Beit3Model's inputs out; save/load through AutoProcessor."""

import numpy as np
import pytest
import torch
from conftest import tiny_config, word_tokenizer
from PIL import Image
from transformers import AutoProcessor

from beit3 import (
    Beit3ImageProcessor,
    Beit3ImageProcessorPil,
    Beit3Model,
    Beit3Processor,
    Beit3Tokenizer,
    check_tokenizer_matches,
)

WORDS = "a the man dog cat horse bus street park beach red blue two is on in with riding playing next to".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS, 40)


@pytest.fixture
def processor(tokenizer):
    return Beit3Processor(image_processor=Beit3ImageProcessor(size=32), tokenizer=tokenizer)


def images(n):
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_outputs_are_named_as_the_model_takes_them_and_padded_as_unilm(processor, tokenizer):
    out = processor(images=images(2), text=["a dog on the beach", "two red bus"], return_tensors="pt")
    assert set(out) == {"pixel_values", "input_ids", "attention_mask"}
    assert out["pixel_values"].shape == (2, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 64)  # unilm's fixed length by default
    assert out["input_ids"][0].tolist() == tokenizer("a dog on the beach", padding="max_length")["input_ids"]
    assert ((out["input_ids"] == 1) == (out["attention_mask"] == 0)).all() and out["input_ids"][:, 0].eq(0).all()


def test_padding_truncation_and_max_length_pass_through(processor):
    texts = ["a dog", "the man riding a horse on the beach next to a red bus"]
    longest = processor(text=texts, padding=True, return_tensors="pt")
    assert (
        set(longest) == {"input_ids", "attention_mask"}
        and longest["attention_mask"][0].sum() < longest["input_ids"].shape[1]
    )
    short = processor(text=texts, max_length=6, return_tensors="pt")
    assert short["input_ids"].shape == (2, 6) and short["input_ids"][1, -1] == 2 and short["attention_mask"][1].all()


def test_output_feeds_beit3_model(processor, tokenizer):
    config = tiny_config(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id)
    check_tokenizer_matches(tokenizer, config)
    model = Beit3Model(config).eval()
    inputs = processor(
        images=images(3), text=["a dog", "a cat on the street", "two man"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        fused = model(**inputs)
        image_only = model(**processor(images=images(3), return_tensors="pt"))
        text_only = model(**processor(text=["a dog", "a cat"], max_length=16, return_tensors="pt"))
    assert fused.last_hidden_state.shape == (3, 1 + config.num_patches + inputs["input_ids"].shape[1], 32)
    assert image_only.last_hidden_state.shape == (3, 1 + config.num_patches, 32)
    assert text_only.last_hidden_state.shape == (2, 16, 32) and torch.isfinite(fused.last_hidden_state).all()


def test_save_and_load_through_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is Beit3Processor and type(loaded.tokenizer) is Beit3Tokenizer
    assert type(loaded.image_processor) is Beit3ImageProcessor and loaded.image_processor.size.height == 32
    kwargs = dict(images=images(2), text=["a dog", "a red bus in the park"], return_tensors="pt")
    before, after = processor(**kwargs), loaded(**{**kwargs, "text": tuple(kwargs["text"])})
    assert {key: torch.equal(before[key], after[key]) for key in before} == dict.fromkeys(before, True)
    pil = AutoProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(pil.image_processor) is Beit3ImageProcessorPil


def test_empty_or_missing_input_gets_a_clear_error(processor):
    for text, where in (("", "text is empty"), (["a dog", "  "], r"text\[1\] is empty"), ([], "empty list")):
        with pytest.raises(ValueError, match=where):
            processor(images=images(1), text=text)
    with pytest.raises(ValueError, match="text\\[0\\] is a int"):
        processor(text=[3])
    with pytest.raises(ValueError, match="text is a dict"):
        processor(text={"a": "dog"})
    with pytest.raises(ValueError, match="neither"):
        processor()
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        processor(images=images(2), text=["a", "b", "c"], return_tensors="pt")
    one_image = processor(
        images=images(1), text=["a", "b", "c"], return_tensors="pt"
    )  # one image against N texts, as CLIP's
    assert one_image["pixel_values"].shape[0] == 1 and one_image["input_ids"].shape[0] == 3
