"""Task heads: each one trains a step at tiny size, and a converted official checkpoint gives the
official logits (reference: torchscale's backbone + the head written out from the documented layout)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE, reference_config_file, tiny_config, torchscale_reference
from transformers import DynamicCache

from beit3.convert import main
from beit3.modeling_heads import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForMaskedDataModeling,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
    caption_attention_mask,
)

IMAGE, PATCH, HIDDEN, VOCAB = (REFERENCE[k] for k in ("image_size", "patch_size", "hidden_size", "vocab_size"))
LABELS = 7
IMAGE_TOKENS = 1 + (IMAGE // PATCH) ** 2


def random_head(shapes: dict) -> dict:
    return {
        k: torch.randn(shape) * 0.2 + (1.0 if k.endswith("norm.weight") or ".1.weight" in k and "head.1" in k else 0.0)
        for k, shape in shapes.items()
    }


def layer_norm(x, head, name):
    return F.layer_norm(x, x.shape[-1:], head[f"{name}.weight"], head[f"{name}.bias"], eps=1e-5)


def linear(x, head, name, bias=True):
    return F.linear(x, head[f"{name}.weight"], head[f"{name}.bias"] if bias else None)


D = HIDDEN
# task -> (final LayerNorm in the official model, official head shapes, reference logits from (backbone, head, inputs))
OFFICIAL_TASKS = {
    "classification": (
        False,
        {"fc_norm.weight": (D,), "fc_norm.bias": (D,), "head.weight": (LABELS, D), "head.bias": (LABELS,)},
        lambda ref, h, img, ids, pad: linear(
            layer_norm(ref(visual_tokens=img)["encoder_out"][:, 1:].mean(1), h, "fc_norm"), h, "head"
        ),
    ),
    "vqa": (
        False,
        {
            "pooler.norm.weight": (D,),
            "pooler.norm.bias": (D,),
            "pooler.dense.weight": (D, D),
            "pooler.dense.bias": (D,),
            "head.0.weight": (2 * D, D),
            "head.0.bias": (2 * D,),
            "head.1.weight": (2 * D,),
            "head.1.bias": (2 * D,),
            "head.3.weight": (LABELS, 2 * D),
            "head.3.bias": (LABELS,),
        },
        lambda ref, h, img, ids, pad: linear(
            F.gelu(
                layer_norm(
                    linear(
                        torch.tanh(
                            linear(
                                layer_norm(
                                    ref(textual_tokens=ids, visual_tokens=img, text_padding_position=pad)[
                                        "encoder_out"
                                    ][:, 0],
                                    h,
                                    "pooler.norm",
                                ),
                                h,
                                "pooler.dense",
                            )
                        ),
                        h,
                        "head.0",
                    ),
                    h,
                    "head.1",
                )
            ),
            h,
            "head.3",
        ),
    ),
    "retrieval": (
        True,
        {"vision_head.weight": (D, D), "language_head.weight": (D, D), "logit_scale": ()},
        lambda ref, h, img, ids, pad: (
            h["logit_scale"].exp()
            * F.normalize(F.linear(ref(visual_tokens=img)["encoder_out"][:, 0], h["vision_head.weight"]), dim=-1)
            @ F.normalize(
                F.linear(
                    ref(textual_tokens=ids, text_padding_position=pad)["encoder_out"][:, 0], h["language_head.weight"]
                ),
                dim=-1,
            ).t()
        ),
    ),
}


def official_nlvr2_logits(ref, h, images, ids, pad):
    batch = images.shape[0]
    x = ref(
        textual_tokens=ids.repeat(2, 1),
        visual_tokens=torch.cat([images[:, 0], images[:, 1]]),
        text_padding_position=pad.repeat(2, 1),
    )["encoder_out"]
    pairs = torch.cat([x[:, 0], x[:, IMAGE_TOKENS]], dim=-1)
    features = torch.cat([pairs[:batch], pairs[batch:]], dim=-1)
    return linear(
        F.gelu(layer_norm(linear(layer_norm(features, h, "head.norm1"), h, "head.dense1"), h, "head.norm2")),
        h,
        "head.dense2",
    )


def official_captioning_logits(ref, h, images, ids, pad):
    length = IMAGE_TOKENS + ids.shape[1]
    allowed = torch.zeros(length, length)
    allowed[:, :IMAGE_TOKENS] = 1
    allowed[IMAGE_TOKENS:, IMAGE_TOKENS:] = torch.ones(ids.shape[1], ids.shape[1]).tril()
    x = ref(textual_tokens=ids, visual_tokens=images, text_padding_position=pad, attn_mask=1 - allowed)["encoder_out"]
    return linear(x[:, IMAGE_TOKENS:], h, "mlm_head")


OFFICIAL_TASKS["nlvr2"] = (
    True,
    {
        "head.norm1.weight": (4 * D,),
        "head.norm1.bias": (4 * D,),
        "head.dense1.weight": (2 * D, 4 * D),
        "head.dense1.bias": (2 * D,),
        "head.norm2.weight": (2 * D,),
        "head.norm2.bias": (2 * D,),
        "head.dense2.weight": (2, 2 * D),
        "head.dense2.bias": (2,),
    },
    official_nlvr2_logits,
)
OFFICIAL_TASKS["captioning"] = (
    True,
    {"mlm_head.weight": (VOCAB, D), "mlm_head.bias": (VOCAB,)},
    official_captioning_logits,
)
OUR_CALLS = {
    "classification": lambda m, img, ids, mask: m(pixel_values=img).logits,
    "vqa": lambda m, img, ids, mask: m(pixel_values=img, input_ids=ids, attention_mask=mask).logits,
    "retrieval": lambda m, img, ids, mask: m(pixel_values=img, input_ids=ids, attention_mask=mask).logits_per_image,
    "nlvr2": lambda m, img, ids, mask: m(pixel_values=img, input_ids=ids, attention_mask=mask).logits,
}


@pytest.mark.parametrize("task", sorted(OFFICIAL_TASKS))
def test_converted_official_task_checkpoint_gives_official_logits(tmp_path, task):
    final_layernorm, head_shapes, reference_logits = OFFICIAL_TASKS[task]
    reference = torchscale_reference(final_layernorm)
    head = random_head(head_shapes)
    torch.save(
        {"model": {**{"beit3." + k: v for k, v in reference.state_dict().items()}, **head}}, tmp_path / f"{task}.pth"
    )
    config = reference_config_file(tmp_path, final_layernorm)
    main(
        [
            "--checkpoint",
            str(tmp_path / f"{task}.pth"),
            "--task",
            task,
            "--output",
            str(tmp_path / "ours"),
            "--config",
            config,
        ]
    )
    model_class = {
        "classification": Beit3ForImageClassification,
        "vqa": Beit3ForVisualQuestionAnswering,
        "nlvr2": Beit3ForVisualReasoning,
        "retrieval": Beit3ForImageTextRetrieval,
        "captioning": Beit3ForCaptioning,
    }[task]
    ours = model_class.from_pretrained(tmp_path / "ours").eval()
    assert ours.config.final_layernorm == final_layernorm

    images = torch.randn(3, 2, 3, IMAGE, IMAGE) if task == "nlvr2" else torch.randn(3, 3, IMAGE, IMAGE)
    ids = torch.randint(3, VOCAB, (3, 6))
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        expected = reference_logits(reference, head, images, ids, padding)
        if task == "captioning":
            got = ours(pixel_values=images, input_ids=ids, attention_mask=(~padding).long()).logits
            expected, got = expected[~padding], got[~padding]  # padded positions are never read
        else:
            got = OUR_CALLS[task](ours, images, ids, (~padding).long())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    # and back to the official layout, head included
    main(["--checkpoint", str(tmp_path / "ours"), "--to", "official", "--output", str(tmp_path / "back.pth")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert all(torch.equal(back[k], v) for k, v in head.items())


def test_converting_with_the_wrong_task_names_what_is_missing(tmp_path):
    reference = torchscale_reference(final_layernorm=False)
    head = random_head(OFFICIAL_TASKS["classification"][1])
    torch.save(
        {"model": {**{"beit3." + k: v for k, v in reference.state_dict().items()}, **head}}, tmp_path / "in1k.pth"
    )
    with pytest.raises(SystemExit, match="has no 'head.3.weight': it is not a vqa checkpoint"):
        main(["--checkpoint", str(tmp_path / "in1k.pth"), "--task", "vqa", "--output", str(tmp_path / "out")])


def head_config(**overrides):
    return tiny_config(**{"num_labels": LABELS, "mask_token_id": 99, **overrides})


def train_step(model, **batch) -> float:
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.beit3.parameters())
    return loss.item()


def test_every_head_trains_a_step():
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(3, 99, (4, 6))
    mask = torch.ones_like(ids)
    train_step(Beit3ForImageClassification(head_config()), pixel_values=images, labels=torch.randint(0, LABELS, (4,)))
    train_step(
        Beit3ForImageClassification(head_config()),
        pixel_values=images,
        labels=torch.softmax(torch.randn(4, LABELS), -1),
    )
    train_step(
        Beit3ForVisualQuestionAnswering(head_config()),
        pixel_values=images,
        input_ids=ids,
        attention_mask=mask,
        labels=torch.rand(4, LABELS),
    )
    train_step(
        Beit3ForVisualReasoning(tiny_config(num_labels=2)),
        pixel_values=torch.randn(4, 2, 3, 32, 32),
        input_ids=ids,
        attention_mask=mask,
        labels=torch.randint(0, 2, (4,)),
    )
    train_step(
        Beit3ForImageTextRetrieval(head_config()),
        pixel_values=images,
        input_ids=ids,
        attention_mask=mask,
        return_loss=True,
    )
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    train_step(
        Beit3ForCaptioning(head_config()), pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels
    )


def test_small_head_initialization_follows_the_official_code():
    classifier = Beit3ForImageClassification(head_config())
    assert classifier.head.weight.abs().max() <= 0.02 * 0.001 * 2.01
    reasoning = Beit3ForVisualReasoning(tiny_config(num_labels=2))
    assert reasoning.head.dense1.weight.abs().max() <= 0.02 * 0.001 * 2.01
    assert Beit3ForImageTextRetrieval(head_config()).logit_scale.item() == pytest.approx(2.6593, abs=1e-4)


def test_retrieval_embeddings_are_unit_vectors_and_match_matching_pairs():
    model = Beit3ForImageTextRetrieval(head_config()).eval()
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(3, 99, (3, 6))
    out = model(pixel_values=images, input_ids=ids)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    only_images = model(pixel_values=images)
    assert only_images.text_embeds is None and only_images.loss is None


def test_retrieval_scores_one_image_against_many_texts_and_computes_a_loss_only_when_asked_as_clip_does():
    model = Beit3ForImageTextRetrieval(head_config()).eval()
    image, ids = torch.randn(1, 3, 32, 32), torch.randint(3, 99, (5, 6))
    out = model(pixel_values=image, input_ids=ids)
    assert out.loss is None and out.logits_per_image.shape == (1, 5) and out.logits_per_text.shape == (5, 1)
    torch.testing.assert_close(
        out.logits_per_image[0],
        model.logit_scale.exp()
        * model.get_text_features(ids).pooler_output
        @ model.get_image_features(image).pooler_output[0],
    )
    with pytest.raises(ValueError, match="as many images as texts.*1 images and 5 texts"):
        model(pixel_values=image, input_ids=ids, return_loss=True)
    assert torch.isfinite(model(pixel_values=image.repeat(5, 1, 1, 1), input_ids=ids, return_loss=True).loss)


def _head_call(task):
    """A model of ``task``'s head and the keyword arguments of one small batch for it."""
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 99, (2, 6))
    pair = {"pixel_values": images, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {
        "classification": (
            Beit3ForImageClassification(head_config()),
            {"pixel_values": images, "labels": torch.tensor([0, 1])},
        ),
        "vqa": (Beit3ForVisualQuestionAnswering(head_config()), {**pair, "labels": torch.rand(2, LABELS)}),
        "nlvr2": (
            Beit3ForVisualReasoning(tiny_config(num_labels=2)),
            {**pair, "pixel_values": torch.randn(2, 2, 3, 32, 32), "labels": torch.tensor([0, 1])},
        ),
        "retrieval": (Beit3ForImageTextRetrieval(head_config()), {**pair, "return_loss": True}),
        "captioning": (Beit3ForCaptioning(head_config()), {**pair, "labels": ids}),
        "mdm": (Beit3ForMaskedDataModeling(tiny_config()), {"input_ids": ids, "labels": ids}),
    }[task]


@pytest.mark.parametrize("task", ["classification", "vqa", "nlvr2", "retrieval", "captioning", "mdm"])
def test_every_head_passes_hidden_states_and_attentions_on_and_honours_return_dict_false(task):
    model, batch = _head_call(task)
    model.eval()
    plain = model(**batch)
    assert plain.loss is not None and all(
        getattr(plain, name, None) is None for name in ("hidden_states", "attentions")
    )
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    backbone = out.text_model_output if task == "retrieval" else out
    layers = model.config.num_hidden_layers
    assert len(backbone.hidden_states) == layers + 1 and len(backbone.attentions) == layers
    as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], plain.loss)
    torch.testing.assert_close(as_tuple[1], plain[1])


def test_caption_mask_blocks_image_to_text_and_future_text():
    mask = caption_attention_mask(3, torch.tensor([[1, 1, 1, 0]]))
    assert mask[0, :3, :3].all() and not mask[0, :3, 3:].any()  # the image sees only the image
    assert mask[0, 3:, :3].all()  # text sees the image
    assert mask[0, 4, 3:5].all() and not mask[0, 4, 5:].any()  # and itself and the words before
    assert not mask[0, :, 6].any()  # padding is never a key


@pytest.mark.parametrize("layout", [dict(), dict(multiway_attention=False, vl_ffn_layers=1)])
def test_cached_greedy_decoding_equals_recomputing_and_runs_two_tokens_a_step(layout):
    model = Beit3ForCaptioning(head_config(**layout)).eval()
    with torch.no_grad():
        model.mlm_head.bias[2] = -1e4  # keep </s> from ending captions at once, so there is something to compare
    images = torch.randn(3, 3, 32, 32)
    lengths = []
    hook = model.beit3.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    cached = model.generate(images, max_new_tokens=11)
    hook.remove()
    recomputed = model.generate(pixel_values=images, max_new_tokens=11, use_cache=False)
    assert cached.shape == (3, 12) and (cached[:, 0] == 0).all()
    assert torch.equal(cached, recomputed)
    assert lengths == [2] + [2] * 10  # <s> + <mask>, then [newest word, <mask>] against the cache


def test_captioning_speaks_transformers_generate():
    model = Beit3ForCaptioning(head_config()).eval()
    assert (
        model.can_generate() and model.generation_config.bos_token_id == 0 and model.generation_config.eos_token_id == 2
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.mlm_head.bias[2] = -1e4
    greedy = model.generate(pixel_values=images, max_new_tokens=7)
    beams = model.generate(pixel_values=images, max_new_tokens=7, num_beams=3, length_penalty=0.6)
    assert beams.shape[0] == 2 and (beams[:, 0] == 0).all()
    assert torch.equal(
        model.generate(pixel_values=images, max_new_tokens=7, num_beams=3, length_penalty=0.6, use_cache=False), beams
    )
    from transformers import GenerationConfig

    assert torch.equal(
        model.generate(
            pixel_values=images,
            generation_config=GenerationConfig(max_new_tokens=7, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        ),
        greedy,
    )
    torch.manual_seed(0)
    sampled = model.generate(pixel_values=images, max_new_tokens=7, do_sample=True, top_k=5)
    torch.manual_seed(0)
    assert torch.equal(
        sampled, model.generate(pixel_values=images, max_new_tokens=7, do_sample=True, top_k=5, use_cache=False)
    )
    output = model(pixel_values=images, input_ids=greedy, labels=greedy)
    assert type(output).__name__ == "CausalLMOutputWithPast" and output.logits.shape == (
        *greedy.shape,
        model.config.vocab_size,
    )


def test_a_preset_config_knows_the_released_mask_token():
    from beit3 import Beit3Config

    assert Beit3Config.from_preset("beit3_base_patch16_224").mask_token_id == 64001


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: Beit3ForVisualReasoning(tiny_config(num_labels=2))(
                pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.ones(2, 3, dtype=torch.long)
            ),
            "pair of images",
        ),
        (lambda: Beit3ForCaptioning(tiny_config()).generate(torch.randn(1, 3, 32, 32)), "mask_token_id"),
        (
            lambda: Beit3ForCaptioning(head_config()).generate(max_new_tokens=3),
            "generates from an image: pass pixel_values",
        ),
    ],
)
def test_bad_head_input_gets_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_masked_data_modeling_counts_masked_positions_only():
    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    model = Beit3ForMaskedDataModeling(tiny_config(visual_vocab_size=32)).eval()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 99, (2, 6))
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, :5] = True
    codes = torch.randint(0, 32, (2, 16))
    image = model(pixel_values=images, bool_masked_pos=masked, image_labels=codes)
    assert image.image_logits.shape == (10, 32) and image.text_loss is None
    other_codes = codes.clone()
    other_codes[~masked] = (codes[~masked] + 1) % 32  # labels of visible patches are never read
    torch.testing.assert_close(
        model(pixel_values=images, bool_masked_pos=masked, image_labels=other_codes).loss, image.loss
    )
    labels = torch.full_like(ids, -100)
    labels[:, 2:4] = ids[:, 2:4]
    pair = model(pixel_values=images, input_ids=ids, labels=labels)
    assert pair.text_logits.shape == (4, 100) and pair.image_loss is None and 0 <= pair.text_accuracy <= 1
    both = model(pixel_values=images, input_ids=ids, bool_masked_pos=masked, image_labels=codes, labels=labels)
    torch.testing.assert_close(both.loss, both.image_loss + both.text_loss)
    assert model(input_ids=ids, labels=torch.full_like(ids, -100)).loss is None  # nothing masked, nothing to learn


def test_masked_data_modeling_takes_the_masked_counts_and_refuses_a_wrong_one():
    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    model = Beit3ForMaskedDataModeling(tiny_config(visual_vocab_size=32))
    images, ids, codes = torch.randn(2, 3, 32, 32), torch.randint(3, 99, (2, 6)), torch.randint(0, 32, (2, 16))
    masked = torch.rand(2, 16) < 0.4
    labels = torch.where(torch.rand(2, 6) < 0.5, ids, -100)
    inputs = dict(pixel_values=images, input_ids=ids, bool_masked_pos=masked, image_labels=codes, labels=labels)
    counts = dict(num_masked_patches=int(masked.sum()), num_masked_text_tokens=int((labels != -100).sum()))
    read, given = model(**inputs), model(**inputs, **counts)  # found by reading the mask, or from the counts
    for name in ("loss", "image_logits", "text_logits", "image_accuracy", "text_accuracy"):
        assert torch.equal(getattr(read, name), getattr(given, name)), name
    with pytest.raises(ValueError, match="num_masked_patches is 3, but the mask holds"):
        model(**inputs, num_masked_patches=3 if counts["num_masked_patches"] != 3 else 4)


def test_masked_data_modeling_learns_a_fixed_batch():
    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    model = Beit3ForMaskedDataModeling(tiny_config(visual_vocab_size=32))
    images, masked = torch.randn(4, 3, 32, 32), torch.rand(4, 16) < 0.4
    codes = torch.randint(0, 32, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(pixel_values=images, bool_masked_pos=masked, image_labels=codes).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_masked_data_modeling_refuses_codes_from_another_tokenizer():
    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    model = Beit3ForMaskedDataModeling(tiny_config(visual_vocab_size=32))
    masked = torch.ones(1, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="visual token 40, but the model predicts 32"):
        model(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=masked, image_labels=torch.full((1, 16), 40))
    with pytest.raises(ValueError, match="no image_labels"):
        model(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=masked)


def test_heads_load_through_the_auto_classes(tmp_path):
    from transformers import AutoModelForImageClassification, AutoModelForVisualQuestionAnswering

    Beit3ForImageClassification(head_config()).save_pretrained(tmp_path / "cls")
    Beit3ForVisualQuestionAnswering(head_config()).save_pretrained(tmp_path / "vqa")
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path / "cls"), Beit3ForImageClassification)
    assert isinstance(
        AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path / "vqa"), Beit3ForVisualQuestionAnswering
    )


def test_a_head_of_another_size_names_both_shapes_in_the_runtime_error_transformers_raises(tmp_path):
    saved = Beit3ForVisualQuestionAnswering(head_config())
    saved.save_pretrained(tmp_path / "vqa")
    with pytest.raises(RuntimeError, match=r"head\.3\.weight: \(7, 64\) in the checkpoint, \(3, 64\) in the model"):
        Beit3ForVisualQuestionAnswering.from_pretrained(tmp_path / "vqa", num_labels=3)
    # ignore_mismatched_sizes: the head of the other size starts afresh, everything else loads
    model = Beit3ForVisualQuestionAnswering.from_pretrained(
        tmp_path / "vqa", num_labels=3, ignore_mismatched_sizes=True
    )
    assert model.head[3].weight.shape == (3, 64)
    torch.testing.assert_close(model.head[0].weight, saved.head[0].weight)
    torch.testing.assert_close(
        model.beit3.layers[1].ffn["text"].fc2.weight, saved.beit3.layers[1].ffn["text"].fc2.weight
    )


def test_image_text_matching_is_an_optional_weighted_loss_on_the_image_cls(tmp_path):
    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    images, ids = torch.randn(4, 3, 32, 32), torch.randint(3, 99, (4, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    plain = Beit3ForMaskedDataModeling(tiny_config(visual_vocab_size=32))
    assert not any(name.startswith("itm_") for name, _ in plain.named_parameters())  # the paper: no extra head
    with pytest.raises(ValueError, match="itm_weight"):
        plain(pixel_values=images, input_ids=ids, itm_labels=torch.tensor([1, 0, 1, 0]))
    model = Beit3ForMaskedDataModeling(tiny_config(visual_vocab_size=32, itm_weight=0.5)).eval()
    matching = torch.tensor([1, 0, 1, 0])
    out = model(pixel_values=images, input_ids=ids, itm_labels=matching)
    assert out.itm_logits.shape == (4, 2) and out.text_loss is None
    torch.testing.assert_close(out.itm_loss, F.cross_entropy(out.itm_logits, matching))
    torch.testing.assert_close(out.loss, 0.5 * out.itm_loss)
    both = model(pixel_values=images, input_ids=ids, labels=labels, itm_labels=matching)
    torch.testing.assert_close(both.loss, both.text_loss + 0.5 * both.itm_loss)
    with pytest.raises(ValueError, match="both pixel_values and input_ids"):
        model(input_ids=ids, itm_labels=matching)
    with pytest.raises(ValueError, match="itm_weight"):
        tiny_config(itm_weight=-1.0)
    # The matching pooler is its own: a VQA model fine-tuned from this one gets the backbone and a fresh pooler.
    model.save_pretrained(tmp_path / "pretrained")
    vqa = Beit3ForVisualQuestionAnswering.from_pretrained(tmp_path / "pretrained", num_labels=3)
    assert torch.equal(vqa.beit3.embeddings.text_embeddings.weight, model.beit3.embeddings.text_embeddings.weight)
    assert not torch.equal(vqa.pooler.dense.weight, model.itm_pooler.dense.weight)


def test_vqa_loss_is_bce_on_soft_scores_by_default_or_one_softmax():
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 99, (2, 6))
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.3]])
    bce = Beit3ForVisualQuestionAnswering(tiny_config(num_labels=3)).eval()
    out = bce(pixel_values=images, input_ids=ids, labels=scores)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, scores) * 3)
    softmax = Beit3ForVisualQuestionAnswering(tiny_config(num_labels=3, vqa_loss="softmax")).eval()
    out = softmax(pixel_values=images, input_ids=ids, labels=scores)
    expected = -(scores / scores.sum(-1, keepdim=True) * out.logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="vqa_loss 'hinge' must be one of bce, softmax"):
        tiny_config(vqa_loss="hinge")


@pytest.mark.parametrize("task", ["classification", "vqa", "nlvr2", "retrieval", "captioning"])
def test_every_head_exports_with_dynamic_batch_and_text_length_and_matches_eager(task):
    model, batch = _head_call(task)
    model.eval()
    batch = {k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")}
    batch_dim, length_dim = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=30)
    dynamic = {
        "pixel_values": {0: batch_dim},
        "input_ids": {0: batch_dim, 1: length_dim},
        "attention_mask": {0: batch_dim, 1: length_dim},
    }
    program = torch.export.export(model, (), batch, dynamic_shapes={k: dynamic[k] for k in batch})
    images = torch.randn(3, *batch["pixel_values"].shape[1:])
    other = {
        "pixel_values": images,
        "input_ids": torch.randint(3, 99, (3, 9)),
        "attention_mask": torch.tensor([[1] * 9] * 2 + [[1] * 4 + [0] * 5]),
    }
    other = {k: other[k] for k in batch}
    first = "logits_per_image" if task == "retrieval" else "logits"
    torch.testing.assert_close(program.module()(**other)[first], getattr(model(**other), first), atol=1e-5, rtol=1e-5)


def test_onnx_export_runs_in_onnxruntime_and_matches_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")  # the [onnx] extra; `make test` installs it
    model, _ = _head_call("vqa")
    model.eval()
    pixel_values, input_ids = torch.randn(2, 3, 32, 32), torch.randint(3, 99, (2, 6))
    attention_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=30)
    torch.onnx.export(
        model,
        (pixel_values, input_ids, attention_mask),
        tmp_path / "vqa.onnx",
        dynamo=True,
        input_names=["pixel_values", "input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes=({0: batch}, {0: batch, 1: length}, {0: batch, 1: length}),
    )
    session = onnxruntime.InferenceSession(str(tmp_path / "vqa.onnx"), providers=["CPUExecutionProvider"])
    other = {
        "pixel_values": torch.randn(3, 3, 32, 32),
        "input_ids": torch.randint(3, 99, (3, 9)),
        "attention_mask": torch.tensor([[1] * 9] * 2 + [[1] * 4 + [0] * 5]),
    }
    logits = session.run(["logits"], {k: v.numpy() for k, v in other.items()})[0]
    torch.testing.assert_close(torch.from_numpy(logits), model(**other).logits, atol=1e-5, rtol=1e-5)


def test_zero_shot_image_classification_pipeline_ranks_labels_with_the_retrieval_head(tmp_path):
    from conftest import word_tokenizer
    from PIL import Image
    from transformers import AutoModelForZeroShotImageClassification, pipeline

    from beit3 import Beit3ImageProcessor

    tokenizer = word_tokenizer(tmp_path, "this is a photo of red blue circle square".split(), 28, model_max_length=16)
    model = Beit3ForImageTextRetrieval(tiny_config(vocab_size=len(tokenizer))).eval()
    for part in (model, tokenizer, Beit3ImageProcessor(size=32)):
        part.save_pretrained(tmp_path / "retrieval")
    assert (
        type(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path / "retrieval"))
        is Beit3ForImageTextRetrieval
    )
    image, labels = Image.new("RGB", (40, 40), (200, 10, 10)), ["red circle", "blue square", "red square"]
    ranked = pipeline("zero-shot-image-classification", model=str(tmp_path / "retrieval"))(
        image, candidate_labels=labels
    )
    assert sorted(r["label"] for r in ranked) == sorted(labels) and abs(sum(r["score"] for r in ranked) - 1) < 1e-5
    processor = Beit3ImageProcessor(size=32)
    texts = tokenizer([f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = (
            model(pixel_values=processor(image, return_tensors="pt")["pixel_values"], **texts)
            .logits_per_image[0]
            .softmax(-1)
        )
    assert [r["label"] for r in ranked] == [labels[i] for i in expected.argsort(descending=True)]
    assert [r["score"] for r in ranked] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-5)


def test_the_answer_slot_vqa_head_reads_the_mask_and_starts_from_mlm_rows():
    config = head_config(vqa_head="answer_slot")
    model = Beit3ForVisualQuestionAnswering(config).eval()
    assert not hasattr(model, "pooler") and isinstance(model.head, torch.nn.Linear)
    images, ids = torch.randn(2, 3, 32, 32), torch.tensor([[0, 5, 6, 99, 2, 1], [0, 7, 99, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        out = model(pixel_values=images, input_ids=ids, attention_mask=mask)
        hidden = model.beit3(pixel_values=images, input_ids=ids, attention_mask=mask)
    text = hidden.last_hidden_state[:, hidden.text_start :]
    torch.testing.assert_close(out.logits, model.head(torch.stack([text[0, 3], text[1, 2]])))
    with pytest.raises(
        ValueError, match=r"one <mask> \(id 99\) per question; rows here have \[0, 1\].*insert_answer_slot"
    ):
        model(
            pixel_values=images, input_ids=torch.tensor([[0, 5, 6, 8, 2, 1], [0, 7, 99, 2, 1, 1]]), attention_mask=mask
        )
    weight, bias = torch.randn(100, 32), torch.randn(100)
    model.init_answer_head_from_mlm(weight, bias, [[5], [6, 7]] + [[8]] * (LABELS - 2))
    torch.testing.assert_close(model.head.weight[1], (weight[6] + weight[7]) / 2)
    torch.testing.assert_close(model.head.bias[:2], torch.stack([bias[5], (bias[6] + bias[7]) / 2]))
    with pytest.raises(ValueError, match="needs a non-empty list of token ids for each"):
        model.init_answer_head_from_mlm(weight, bias, [[5]])
    with pytest.raises(ValueError, match="set config.mask_token_id"):
        Beit3ForVisualQuestionAnswering(tiny_config(num_labels=LABELS, vqa_head="answer_slot"))
    with pytest.raises(ValueError, match="vqa_head 'cls' must be one of pooler, answer_slot"):
        tiny_config(vqa_head="cls")
    train_step(
        Beit3ForVisualQuestionAnswering(config),
        pixel_values=images,
        input_ids=ids,
        attention_mask=mask,
        labels=torch.rand(2, LABELS),
    )


def test_image_text_to_text_pipeline_captions_from_a_prompt_the_caption_continues(tmp_path):
    from conftest import word_tokenizer
    from PIL import Image
    from transformers import AutoModelForImageTextToText, pipeline

    from beit3 import Beit3ImageProcessor, Beit3Processor

    tokenizer = word_tokenizer(tmp_path, "a red blue circle square on the left right".split(), 24, model_max_length=16)
    model = Beit3ForCaptioning(tiny_config(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id)).eval()
    processor = Beit3Processor(image_processor=Beit3ImageProcessor(size=32), tokenizer=tokenizer)
    for part in (model, processor):
        part.save_pretrained(tmp_path / "captioning")
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "captioning")) is Beit3ForCaptioning
    image = Image.new("RGB", (40, 40), (200, 10, 10))
    (result,) = pipeline("image-text-to-text", model=str(tmp_path / "captioning"))(
        images=image, text="a red", max_new_tokens=6
    )
    prefix = torch.tensor([[tokenizer.bos_token_id, *tokenizer("a red", add_special_tokens=False)["input_ids"]]])
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    expected = model.generate(pixel_values, input_ids=prefix, max_new_tokens=6)
    assert expected[0, : prefix.shape[1]].tolist() == prefix[0].tolist() and expected.shape[1] > prefix.shape[1]
    assert result["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)
    for side in ("right", "left"):  # the processor pads on the right, transformers' pipeline (from 5.25) on the left
        prompt = processor(images=image, text="a red", padding_side=side, return_tensors="pt")
        assert prompt["attention_mask"][0, 0 if side == "left" else -1] == 0
        assert torch.equal(model.generate(**prompt, max_new_tokens=6), expected)
    # Prompts of unequal length in one batch: each row continues as it does alone (the batch comes back left-padded)
    batch = model.generate(
        **processor(images=[image, image], text=["a red", "a"], padding="max_length", return_tensors="pt"),
        max_new_tokens=6,
    )
    alone = model.generate(**processor(images=image, text="a", return_tensors="pt"), max_new_tokens=6)
    assert torch.equal(batch[0, : expected.shape[1]], expected[0])
    words = batch[1][batch[1] != tokenizer.pad_token_id]
    assert torch.equal(words, alone[0][alone[0] != tokenizer.pad_token_id])


# transformers' conventions, as its common model tests check them

ALL_HEADS = {
    "classification": Beit3ForImageClassification,
    "vqa": Beit3ForVisualQuestionAnswering,
    "nlvr2": Beit3ForVisualReasoning,
    "retrieval": Beit3ForImageTextRetrieval,
    "captioning": Beit3ForCaptioning,
}


def head_inputs(task: str, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    ids = torch.randint(3, 99, (batch, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, 4:] = 0
    return {
        "classification": dict(pixel_values=images, labels=torch.arange(batch) % LABELS),
        "vqa": dict(
            pixel_values=images,
            input_ids=ids,
            attention_mask=mask,
            labels=torch.rand(batch, LABELS, generator=generator),
        ),
        "nlvr2": dict(
            pixel_values=torch.randn(batch, 2, 3, 32, 32, generator=generator),
            input_ids=ids,
            attention_mask=mask,
            labels=torch.arange(batch) % 2,
        ),
        "retrieval": dict(pixel_values=images, input_ids=ids, attention_mask=mask, return_loss=True),
        "captioning": dict(pixel_values=images, input_ids=ids, attention_mask=mask, labels=ids),
    }[task]


@pytest.mark.parametrize("task", list(ALL_HEADS))
def test_every_parameter_of_a_head_gets_a_gradient_so_ddp_needs_no_unused_parameter_search(task):
    model = ALL_HEADS[task](head_config(num_labels=2 if task == "nlvr2" else LABELS)).train()
    model(**head_inputs(task)).loss.backward()
    assert model.beit3.embeddings.mask_token is None
    # the VL experts serve image+text input only; the vision and language experts, text or image only
    unused = {
        "classification": (
            "ffn.text",
            "ffn.vl",
            "attention.text",
            "text_embeddings",
            "text_position",
            "final_norm.text",
        ),
        "retrieval": ("ffn.vl",),
    }.get(task, ())
    without = [n for n, p in model.named_parameters() if p.grad is None and not any(part in n for part in unused)]
    assert without == []


@pytest.mark.parametrize("task", list(ALL_HEADS))
def test_output_flags_on_the_config_reach_every_head(task, tmp_path):
    config = head_config(num_labels=2 if task == "nlvr2" else LABELS)
    ALL_HEADS[task](config).save_pretrained(tmp_path)
    model = ALL_HEADS[task].from_pretrained(tmp_path, output_hidden_states=True, output_attentions=True).eval()
    with torch.no_grad():
        out = model(**head_inputs(task))
    outputs = [out.vision_model_output, out.text_model_output] if task == "retrieval" else [out]
    for output in outputs:
        assert len(output.hidden_states) == config.num_hidden_layers + 1
        assert len(output.attentions) == config.num_hidden_layers
    as_tuple = ALL_HEADS[task].from_pretrained(tmp_path, return_dict=False).eval()(**head_inputs(task))
    assert isinstance(as_tuple, tuple)


@pytest.mark.parametrize("task", [*ALL_HEADS, "masked data modeling"])
def test_main_input_name_is_the_first_argument_of_forward(task):
    import inspect

    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    model_class = ALL_HEADS.get(task, Beit3ForMaskedDataModeling)
    assert list(inspect.signature(model_class.forward).parameters)[1] == model_class.main_input_name  # after self


def test_retrieval_features_are_base_model_outputs_with_pooling_as_clip_returns_them():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model = Beit3ForImageTextRetrieval(head_config()).eval()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 99, (3, 6))
    with torch.no_grad():
        image = model.get_image_features(images, output_hidden_states=True, output_attentions=True)
        text = model.get_text_features(ids, output_hidden_states=True)
        pair = model(pixel_values=images, input_ids=ids)
        as_tuple = model.get_image_features(images, return_dict=False)
    assert isinstance(image, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    torch.testing.assert_close(image.pooler_output, pair.image_embeds)
    torch.testing.assert_close(text.pooler_output, pair.text_embeds)
    assert image.last_hidden_state.shape == (2, 17, 32) and len(image.hidden_states) == 3 and len(image.attentions) == 2
    assert text.attentions is None and len(text.hidden_states) == 3
    torch.testing.assert_close(as_tuple[1], image.pooler_output)


@pytest.mark.parametrize("task", ["classification", "nlvr2"])
def test_problem_type_chooses_the_loss_as_in_transformers(task):
    inputs = head_inputs(task, batch=4)
    labels = {
        "regression": torch.randn(4, 1),
        "multi_label_classification": (torch.rand(4, 2) > 0.5).float(),
        "single_label_classification": torch.tensor([0, 1, 1, 0]),
    }
    for problem, target in labels.items():
        num_labels = 1 if problem == "regression" else 2
        model = ALL_HEADS[task](head_config(num_labels=num_labels, problem_type=problem)).eval()
        out = model(**{**inputs, "labels": target})
        expected = {
            "regression": lambda: F.mse_loss(out.logits.squeeze(-1), target.view(-1)),
            "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(out.logits, target),
            "single_label_classification": lambda: F.cross_entropy(out.logits, target),
        }[problem]()
        torch.testing.assert_close(out.loss, expected)
    # unset: one label means regression, as transformers infers it
    model = ALL_HEADS[task](head_config(num_labels=1)).eval()
    target = torch.randn(4)
    out = model(**{**inputs, "labels": target})
    assert model.config.problem_type is None
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), target))


def test_nlvr2_hidden_states_are_per_example_with_both_images():
    model = Beit3ForVisualReasoning(head_config(num_labels=2)).eval()
    inputs = head_inputs("nlvr2", batch=3)
    inputs.pop("labels")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        second = model.beit3(
            pixel_values=inputs["pixel_values"][1, 1:], input_ids=inputs["input_ids"][1:2], output_hidden_states=True
        )
    assert out.hidden_states[-1].shape == (3, 2, 17 + 6, 32) and out.attentions[0].shape == (3, 2, 2, 23, 23)
    torch.testing.assert_close(out.hidden_states[-1][1, 1], second.last_hidden_state[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval", "captioning", "masked data modeling"])
def test_inputs_embeds_give_what_input_ids_give_in_every_head_with_text(task):
    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    if task == "masked data modeling":
        model = Beit3ForMaskedDataModeling(tiny_config(visual_vocab_size=32))
        inputs = dict(head_inputs("captioning"))
    else:
        model = ALL_HEADS[task](head_config(num_labels=2 if task == "nlvr2" else LABELS))
        inputs = head_inputs(task)
    model.eval()
    ids = inputs.pop("input_ids")
    with torch.no_grad():
        by_ids = model(**inputs, input_ids=ids)
        by_embeds = model(**inputs, inputs_embeds=model.get_input_embeddings()(ids))
    torch.testing.assert_close(by_embeds.loss, by_ids.loss)


def test_captioning_takes_past_key_values_as_the_older_name_of_cache():
    model = Beit3ForCaptioning(head_config()).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), pytest.warns(FutureWarning, match="past_key_values"):
        older = model.generate(images, max_new_tokens=4, past_key_values=None)
    assert torch.equal(older, model.generate(images, max_new_tokens=4))
    step = model.prepare_inputs_for_generation(torch.tensor([[0]]), pixel_values=images, cache=DynamicCache())
    with torch.no_grad():
        cache = model(**step).cache
        new = model.prepare_inputs_for_generation(torch.tensor([[0, 5]]), cache=cache)
        new.pop("cache")
        with pytest.warns(FutureWarning, match="past_key_values"):
            assert model(**new, past_key_values=cache).logits.shape == (1, 2, 100)


def test_captioning_follows_transformers_generation_conventions():
    from transformers import GenerationConfig

    model = Beit3ForCaptioning(head_config()).eval()
    with torch.no_grad():
        model.mlm_head.bias[2] = -1e4  # </s> last: lengths then depend on the length settings alone
    images = torch.randn(2, 3, 32, 32)
    assert model.generate(images, max_length=5).shape == (2, 5)
    # min_new_tokens: </s> is kept out until that many tokens are new, however likely it is
    with torch.no_grad():
        model.mlm_head.bias[2] = 1e4
    assert model.generate(images, max_new_tokens=3).shape == (2, 2)  # <s> </s>
    shortest = model.generate(images, max_new_tokens=8, min_new_tokens=4)
    assert shortest.shape == (2, 6) and (shortest[:, 1:5] != 2).all() and (shortest[:, 5] == 2).all()
    with torch.no_grad():
        model.mlm_head.bias[2] = -1e4
    for settings in (dict(do_sample=True, num_return_sequences=3), dict(num_beams=3, num_return_sequences=3)):
        torch.manual_seed(0)
        several = model.generate(images, max_new_tokens=4, **settings)
        assert several.shape == (6, 5)
        if settings.get("num_beams"):  # beam search's three hypotheses of one image differ
            assert len({tuple(row) for row in several[:3].tolist()}) == 3
    scored = model.generate(images, max_new_tokens=4, num_beams=2, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(scored.sequences, model.generate(images, max_new_tokens=4, num_beams=2))
    assert len(scored.scores) == 4 and scored.scores[0].shape == (2 * 2, 100) and scored.sequences_scores.shape == (2,)
    greedy = model.generate(
        images,
        generation_config=GenerationConfig(max_new_tokens=4, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert torch.equal(greedy.scores[0].argmax(-1), greedy.sequences[:, 1])
    # prepare_inputs_for_generation: the whole caption + <mask> first, then [newest word, <mask>] against the cache
    first = model.prepare_inputs_for_generation(
        torch.tensor([[1, 0, 7], [0, 5, 7]]), pixel_values=images, cache=DynamicCache()
    )
    assert first["input_ids"].tolist() == [[1, 0, 7, 99], [0, 5, 7, 99]]
    assert first["position_ids"].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]  # a left-padded row counts from its <s>
    with torch.no_grad():
        cache = model(**first).cache
    later = model.prepare_inputs_for_generation(torch.tensor([[1, 0, 7, 8], [0, 5, 7, 9]]), cache=cache)
    assert later["input_ids"].tolist() == [[8, 99], [9, 99]] and later["position_ids"].tolist() == [[2, 3], [3, 4]]
    assert later["attention_mask"].shape == (2, 2, 17 + 4 + 1) and not later["attention_mask"][0, :, 17].any()
