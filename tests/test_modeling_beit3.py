import warnings

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModel, DynamicCache

from beit3 import Beit3Model


def inputs(config, batch=2, text=6):
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size)
    input_ids = torch.randint(3, config.vocab_size, (batch, text))
    return pixel_values, input_ids


def padded_inputs(config, batch=2, text=6, row=1, real=3):
    """``inputs`` and a text mask in which example ``row`` has ``real`` tokens, the rest padding."""
    pixel_values, input_ids = inputs(config, batch, text)
    mask = torch.ones_like(input_ids)
    mask[row, real:] = 0
    return pixel_values, input_ids, mask


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def test_sequence_is_image_then_text_and_says_where_text_starts():
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config)
    image_tokens = 1 + config.num_patches
    fused = model(pixel_values=pixel_values, input_ids=input_ids)
    assert fused.last_hidden_state.shape == (2, image_tokens + 6, 32) and fused.text_start == image_tokens
    image_only = model(pixel_values=pixel_values)
    assert image_only.last_hidden_state.shape == (2, image_tokens, 32) and image_only.text_start == image_tokens
    text_only = model(input_ids=input_ids)
    assert text_only.last_hidden_state.shape == (2, 6, 32) and text_only.text_start == 0


@pytest.mark.parametrize("layout", [dict(), dict(multiway_attention=False, vl_ffn_layers=1)])
def test_each_modality_uses_only_its_own_experts(layout):
    config = tiny_config(**layout)
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config)
    with torch.no_grad():
        image_before, text_before = (
            model(pixel_values=pixel_values).last_hidden_state,
            model(input_ids=input_ids).last_hidden_state,
        )
        for layer in model.layers:
            perturb(layer.ffn["text"])
            if config.multiway_attention:
                perturb(layer.attention["text"])
        assert torch.equal(model(pixel_values=pixel_values).last_hidden_state, image_before)
        assert not torch.allclose(model(input_ids=input_ids).last_hidden_state, text_before)


def test_vl_experts_serve_only_image_text_input_in_the_top_layers():
    config = tiny_config(multiway_attention=False, vl_ffn_layers=1)
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config)
    with torch.no_grad():
        image, text = model(pixel_values=pixel_values).last_hidden_state, model(input_ids=input_ids).last_hidden_state
        fused = model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state
        perturb(model.layers[-1].ffn["vl"])
        assert torch.equal(model(pixel_values=pixel_values).last_hidden_state, image)
        assert torch.equal(model(input_ids=input_ids).last_hidden_state, text)
        changed = model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state
    assert (changed - fused).abs().amax(dim=-1).min() > 0  # every position, image and text, went through it
    # and in the fused input the top layer's V and L experts are idle
    with torch.no_grad():
        perturb(model.layers[-1].ffn["vision"])
        perturb(model.layers[-1].ffn["text"])
        assert torch.equal(model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state, changed)


@pytest.mark.parametrize("with_image", [False, True])
def test_padding_does_not_change_the_real_tokens(with_image):
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config, batch=1, text=5)
    padded = torch.cat([input_ids, torch.full((1, 3), config.pad_token_id)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    image = {"pixel_values": pixel_values} if with_image else {}
    with torch.no_grad():
        short = model(input_ids=input_ids, **image).last_hidden_state
        long = model(input_ids=padded, attention_mask=mask, **image).last_hidden_state
    torch.testing.assert_close(long[:, : short.shape[1]], short, atol=1e-5, rtol=1e-5)


def test_full_attention_mask_with_causal_text_hides_later_tokens():
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config, batch=1, text=6)
    image_tokens, length = 1 + config.num_patches, 1 + config.num_patches + 6
    mask = torch.ones(1, length, length, dtype=torch.long)
    mask[:, :image_tokens, image_tokens:] = 0  # the image does not see the text
    mask[:, image_tokens:, image_tokens:] = torch.tril(torch.ones(6, 6, dtype=torch.long))
    changed_ids = input_ids.clone()
    changed_ids[0, 4:] = (changed_ids[0, 4:] + 1) % config.vocab_size
    with torch.no_grad():
        a = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).last_hidden_state
        b = model(pixel_values=pixel_values, input_ids=changed_ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[:, : image_tokens + 4], b[:, : image_tokens + 4])
    assert not torch.allclose(a[:, image_tokens + 4 :], b[:, image_tokens + 4 :])


def test_cached_decoding_equals_the_full_causal_forward():
    config = tiny_config(multiway_attention=False, vl_ffn_layers=1)
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config, batch=2, text=5)
    image_tokens, length = 1 + config.num_patches, 1 + config.num_patches + 5
    mask = torch.ones(2, length, length, dtype=torch.long)
    mask[:, :image_tokens, image_tokens:] = 0
    mask[:, image_tokens:, image_tokens:] = torch.tril(torch.ones(5, 5, dtype=torch.long))
    with torch.no_grad():
        full = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).last_hidden_state
        prefix = model(
            pixel_values=pixel_values,
            input_ids=input_ids[:, :2],
            attention_mask=mask[:, : image_tokens + 2, : image_tokens + 2],
            use_cache=True,
        )
        cache = prefix.cache
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == image_tokens + 2
        steps = [prefix.last_hidden_state]
        for t in range(2, 5):
            step = model(
                input_ids=input_ids[:, t : t + 1],
                position_ids=torch.full((2, 1), t),
                cache=cache,
                use_cache=True,
                attention_mask=mask[:, image_tokens + t : image_tokens + t + 1, : image_tokens + t + 1],
            )
            steps.append(step.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_masked_patches_become_the_mask_token():
    config = tiny_config()
    model = Beit3Model(config, use_mask_token=True).eval()
    pixel_values, _ = inputs(config, batch=1)
    masked = torch.zeros(1, config.num_patches, dtype=torch.bool)
    masked[0, :4] = True  # the first row of the 4x4 grid
    other_pixels = pixel_values.clone()
    other_pixels[..., :8, :] = torch.randn(1, 3, 8, 32)  # change only the masked row of patches
    with torch.no_grad():
        a = model(pixel_values=pixel_values, bool_masked_pos=masked).last_hidden_state
        b = model(pixel_values=other_pixels, bool_masked_pos=masked).last_hidden_state
        c = model(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_attentions_and_hidden_states_match_the_sdpa_path():
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config)
    mask = torch.ones_like(input_ids)
    mask[1, 3:] = 0
    with torch.no_grad():
        plain = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask)
        rich = model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=mask,
            output_attentions=True,
            output_hidden_states=True,
        )
    torch.testing.assert_close(rich.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(rich.hidden_states) == config.num_hidden_layers + 1 and len(rich.attentions) == config.num_hidden_layers
    probs = rich.attentions[0]
    assert probs.shape == (2, 2, 23, 23)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 23))
    assert probs[1, :, :, 17 + 3 :].abs().max() == 0  # padded keys get no attention


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config(drop_path_rate=0.0)
    model = Beit3Model(config).train()
    pixel_values, input_ids = inputs(config)

    def grads():
        model.zero_grad()
        model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state.pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5.24's name, not the deprecated gradient_checkpointing_enable
        model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.layers)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_drop_path_is_random_in_training_and_off_in_eval():
    config = tiny_config(drop_path_rate=0.5)
    model = Beit3Model(config)
    pixel_values, _ = inputs(config, batch=8)
    assert model.layers[0].drop_path.__class__.__name__ == "Identity"  # rate grows from 0 at the first layer
    model.train()
    with torch.no_grad():
        assert not torch.equal(
            model(pixel_values=pixel_values).last_hidden_state, model(pixel_values=pixel_values).last_hidden_state
        )
        model.eval()
        assert torch.equal(
            model(pixel_values=pixel_values).last_hidden_state, model(pixel_values=pixel_values).last_hidden_state
        )


def test_save_pretrained_writes_safetensors_and_auto_model_loads_it(tmp_path):
    config = tiny_config()
    model = Beit3Model(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, Beit3Model)
    pixel_values, input_ids = inputs(config)
    with torch.no_grad():
        assert torch.equal(
            loaded(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state,
            model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state,
        )


def test_import_beit3_is_what_registers_the_auto_classes(tmp_path):
    import subprocess
    import sys

    Beit3Model(tiny_config()).save_pretrained(tmp_path)
    script = f"""
from transformers import AutoModel
try:
    AutoModel.from_pretrained({str(tmp_path)!r})
except (ValueError, KeyError) as error:
    print("before import beit3:", type(error).__name__)
import beit3
print("after import beit3:", type(AutoModel.from_pretrained({str(tmp_path)!r})).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "before import beit3: " in out.stdout and "after import beit3: Beit3Model" in out.stdout


def test_loading_at_another_image_size_resamples_the_position_table(tmp_path):
    config = tiny_config()
    Beit3Model(config).save_pretrained(tmp_path)
    for model in (
        Beit3Model.from_pretrained(tmp_path, image_size=48),
        AutoModel.from_pretrained(tmp_path, image_size=48),
    ):
        assert model.config.image_size == 48
        assert model.embeddings.vision_position_embeddings.shape == (1, 2 + 1 + 36, 32)
        assert model(pixel_values=torch.randn(1, 3, 48, 48)).last_hidden_state.shape == (1, 37, 32)


def test_running_at_another_image_size_needs_interpolate_pos_encoding():
    config = tiny_config()
    model = Beit3Model(config).eval()
    big = torch.randn(1, 3, 48, 64)
    with pytest.raises(ValueError, match="built for 32x32 images, got 48x64"):
        model(pixel_values=big)
    assert model(pixel_values=big, interpolate_pos_encoding=True).last_hidden_state.shape == (1, 1 + 6 * 8, 32)
    # at the model's own size, interpolation is the identity
    same = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=same, interpolate_pos_encoding=True).last_hidden_state,
            model(pixel_values=same).last_hidden_state,
        )


def test_bf16_autocast_stays_close_to_fp32():
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config)
    with torch.no_grad():
        exact = model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state.float()
    assert (low - exact).abs().max() < 0.1 * exact.std()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, c: m(), "needs pixel_values .* or both"),
        (lambda m, c: m(pixel_values=torch.randn(1, 3, 30, 30)), "does not fit the 8x8 patch grid"),
        (
            lambda m, c: m(pixel_values=torch.randn(1, 3, 4, 4), interpolate_pos_encoding=True),
            "does not fit the 8x8 patch grid",
        ),
        (lambda m, c: m(pixel_values=torch.randn(1, 3, 64, 64)), "built for 32x32 images"),
        (lambda m, c: m(pixel_values=torch.randn(1, 1, 32, 32)), "1 channels but the model takes 3"),
        (lambda m, c: m(pixel_values=torch.randn(3, 32, 32)), "must be \\(batch, channels, height, width\\)"),
        (lambda m, c: m(input_ids=torch.randint(0, 10, (1, 39))), "past the position table, which holds 38"),
        (lambda m, c: m(input_ids=torch.tensor([[0, 5, 100]])), "outside the vocabulary \\[0, 100\\)"),
        (lambda m, c: m(input_ids=torch.tensor([[0, -1]])), "outside the vocabulary"),
        (
            lambda m, c: m(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5)),
            "attention_mask must be",
        ),
        (
            lambda m, c: m(pixel_values=torch.randn(1, 3, 32, 32), attention_mask=torch.ones(1, 5)),
            "no text was given",
        ),
        (
            lambda m, c: m(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.ones(3, 4, dtype=torch.long)),
            "different batch sizes",
        ),
        (
            lambda m, c: m(
                input_ids=torch.ones(1, 4, dtype=torch.long), bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool)
            ),
            "no pixel_values",
        ),
        (
            lambda m, c: m(
                pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=torch.zeros(1, 15, dtype=torch.bool)
            ),
            "bool_masked_pos must be",
        ),
        (lambda m, c: m(input_ids=torch.ones(1, 4)), "input_ids must be integer token ids .* got torch.float32"),
        (
            lambda m, c: m(pixel_values=torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)),
            "must be normalized floats; got torch.uint8",
        ),
        (
            lambda m, c: m(pixel_values=torch.randn(1, 3, 32, 32).index_fill_(2, torch.tensor([3]), float("nan"))),
            "NaN or infinite",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    config = tiny_config()
    with pytest.raises(ValueError, match=message):
        call(Beit3Model(config), config)


def test_pixel_values_with_infinities_of_both_signs_are_refused_and_huge_finite_ones_taken():
    model, pixels = Beit3Model(tiny_config()), torch.randn(1, 3, 32, 32)
    both = pixels.clone()
    both[0, 0, 0, :2] = torch.tensor([float("inf"), float("-inf")])  # their sum is NaN, not an infinity
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(pixel_values=both)
    huge = pixels.sign() * 3e38  # finite, though their sum overflows
    assert model(pixel_values=huge).last_hidden_state.shape == (1, 17, 32)


def test_pixels_of_another_float_type_are_cast_to_the_weights():
    model = Beit3Model(tiny_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    exact = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(model(pixel_values=pixels.half()).last_hidden_state, exact, atol=1e-2, rtol=1e-2)
    low = model.to(torch.bfloat16)(pixel_values=pixels).last_hidden_state  # bf16 weights (DeepSpeed bf16), fp32 pixels
    assert low.dtype == torch.bfloat16 and (low.float() - exact).abs().max() < 0.1 * exact.std()


def test_cached_decoding_without_positions_is_refused():
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config)
    cache = model(pixel_values=pixel_values, input_ids=input_ids, use_cache=True).cache
    with pytest.raises(ValueError, match="needs position_ids"):
        model(input_ids=input_ids[:, :1], cache=cache)


def test_initialization_truncates_at_two_std_and_applies_magneto_gain_to_fresh_weights(tmp_path):
    import math

    config = tiny_config(num_hidden_layers=4, hidden_size=64, intermediate_size=256)
    gain = math.sqrt(math.log(8))
    model = Beit3Model(config)
    attention, ffn = model.layers[0].attention["vision"], model.layers[0].ffn["vision"]
    assert ffn.fc1.weight.abs().max() <= 0.04 * gain + 1e-6 and ffn.fc1.weight.std() > 0.015 * gain
    query, value = attention.qkv.weight[:64], attention.qkv.weight[128:]
    assert (
        query.abs().max() <= 0.04 + 1e-6 and abs(value.std() / query.std() - gain) < 0.1
    )  # only the value rows get the gain
    plain = Beit3Model(tiny_config(num_hidden_layers=4, hidden_size=64, intermediate_size=256, subln_init_gain=False))
    assert plain.layers[0].ffn["vision"].fc1.weight.abs().max() <= 0.04
    model.save_pretrained(tmp_path)  # loaded weights are not scaled again
    assert torch.equal(Beit3Model.from_pretrained(tmp_path).layers[0].ffn["vision"].fc1.weight, ffn.fc1.weight)


def _padded_pair(batch: int, length: int) -> dict:
    input_ids = torch.randint(3, 99, (batch, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length // 2 :] = 0
    return {"pixel_values": torch.randn(batch, 3, 32, 32), "input_ids": input_ids, "attention_mask": attention_mask}


def test_torch_export_with_dynamic_batch_and_text_length_matches_eager_at_other_shapes():
    model = Beit3Model(tiny_config()).eval()
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=30)
    program = torch.export.export(
        model,
        (),
        _padded_pair(3, 6),
        dynamic_shapes={
            "pixel_values": {0: batch},
            "input_ids": {0: batch, 1: length},
            "attention_mask": {0: batch, 1: length},
        },
    )
    for shape in ((1, 2), (5, 11)):
        inputs = _padded_pair(*shape)
        torch.testing.assert_close(
            program.module()(**inputs).last_hidden_state, model(**inputs).last_hidden_state, atol=1e-5, rtol=1e-5
        )


def test_torch_compile_traces_the_backbone_without_a_graph_break():
    model = Beit3Model(tiny_config()).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    inputs = _padded_pair(2, 7)
    torch.testing.assert_close(
        compiled(**inputs).last_hidden_state, model(**inputs).last_hidden_state, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="different batch sizes"):  # shape checks still speak under torch.compile
        torch.compile(model, backend="eager")(
            pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.ones(3, 4, dtype=torch.long)
        )


def test_value_checks_read_only_cpu_tensors_in_eager_mode():
    from beit3.modeling_beit3 import values_checkable

    assert values_checkable(torch.ones(2))
    assert not values_checkable(torch.ones(2, device="meta"))  # a GPU tensor likewise: reading it would be a host sync


# transformers' conventions, as its common model tests check them


def test_output_flags_and_return_dict_default_to_the_config(tmp_path):
    config = tiny_config()
    Beit3Model(config).save_pretrained(tmp_path)
    pixel_values, input_ids = inputs(config)
    model = Beit3Model.from_pretrained(tmp_path, output_hidden_states=True, output_attentions=True).eval()
    out = model(pixel_values=pixel_values, input_ids=input_ids)
    assert len(out.hidden_states) == config.num_hidden_layers + 1 and len(out.attentions) == config.num_hidden_layers
    quiet = model(pixel_values=pixel_values, input_ids=input_ids, output_hidden_states=False, output_attentions=False)
    assert quiet.hidden_states is None and quiet.attentions is None  # a flag given to the call wins
    as_tuple = Beit3Model.from_pretrained(tmp_path, return_dict=False).eval()(pixel_values=pixel_values)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], model(pixel_values=pixel_values).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_only_a_model_built_with_use_mask_token_has_a_mask_token_and_the_other_weights_are_the_same(tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    plain = Beit3Model(config)
    torch.manual_seed(0)
    masking = Beit3Model(config, use_mask_token=True)
    assert plain.embeddings.mask_token is None and "embeddings.mask_token" not in plain.state_dict()
    others = masking.state_dict()
    assert others.pop("embeddings.mask_token").shape == (1, 1, config.hidden_size)
    assert all(torch.equal(value, others[key]) for key, value in plain.state_dict().items())
    with pytest.raises(ValueError, match="use_mask_token=True"):
        plain(pixel_values=torch.randn(1, 3, 32, 32), bool_masked_pos=torch.ones(1, 16, dtype=torch.bool))
    # A saved mask token (pretraining's) is left out without a report when a model without one loads the folder
    masking.save_pretrained(tmp_path)
    loaded, info = Beit3Model.from_pretrained(tmp_path, output_loading_info=True)
    assert loaded.embeddings.mask_token is None and not info["unexpected_keys"] and not info["missing_keys"]
    assert torch.equal(
        Beit3Model.from_pretrained(tmp_path, use_mask_token=True).embeddings.mask_token, masking.embeddings.mask_token
    )


def _count_sdpa_calls(monkeypatch) -> list:
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


@pytest.mark.parametrize("case", ["image+text, padded", "text only, padded", "image only", "causal text"])
def test_eager_and_sdpa_are_two_code_paths_that_agree(case, monkeypatch):
    config = tiny_config(attention_probs_dropout_prob=0.0)
    pixel_values, input_ids, mask = padded_inputs(config, batch=3, real=4)
    given = {
        "image+text, padded": dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask),
        "text only, padded": dict(input_ids=input_ids, attention_mask=mask),
        "image only": dict(pixel_values=pixel_values),
        "causal text": dict(input_ids=input_ids, attention_mask=torch.ones(3, 6, 6).tril()),
    }[case]
    calls = _count_sdpa_calls(monkeypatch)
    results = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = Beit3Model._from_config(config, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        calls.clear()
        out = model(**given).last_hidden_state
        # a random projection: a sum of squares after the LayerNorm cancels in its gradient (1e-3 off in fp32 either way)
        out.mul(torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        assert len(calls) == (config.num_hidden_layers if implementation == "sdpa" else 0)
        results[implementation] = (out, model.embeddings.patch_embed.proj.weight.grad)
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
    if "pixel_values" in given:
        scale = results["sdpa"][1].abs().max()
        torch.testing.assert_close(results["eager"][1] / scale, results["sdpa"][1] / scale, atol=1e-5, rtol=0)


def test_set_attn_implementation_switches_the_path_and_a_registered_function_is_called(monkeypatch):
    from transformers import AttentionInterface

    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config)
    calls = _count_sdpa_calls(monkeypatch)
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state
        model.set_attn_implementation("eager")
        calls.clear()
        eager = model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state
        assert not calls
        torch.testing.assert_close(eager, reference, atol=1e-5, rtol=1e-5)

        seen = []

        def recorded(module, query, key, value, attention_mask, **kwargs):
            seen.append((module.layer_idx, tuple(query.shape)))
            return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register("beit3_test_recorded", recorded)
        try:
            model.set_attn_implementation("beit3_test_recorded")
            torch.testing.assert_close(
                model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state, reference, atol=1e-6, rtol=0
            )
        finally:
            del AttentionInterface._global_mapping["beit3_test_recorded"]
    assert seen == [(i, (2, 2, 23, 16)) for i in range(config.num_hidden_layers)]


def test_flex_attention_agrees_with_sdpa_on_a_padded_image_text_batch(tmp_path, monkeypatch):
    import tempfile

    # flex attention compiles: its cache and precompiled headers go to the test's folder, not /tmp
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids, mask = padded_inputs(config)
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("flex_attention")
        flex = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)


def test_past_key_values_is_taken_as_the_older_name_of_cache_with_a_warning():
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids = inputs(config, batch=1)
    new = dict(input_ids=input_ids[:, 3:], position_ids=torch.arange(3, 6)[None])
    with torch.no_grad():
        results = []
        for name in ("cache", "past_key_values"):
            prefix = model(pixel_values=pixel_values, input_ids=input_ids[:, :3], use_cache=True).cache
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results.append(model(**new, **{name: prefix}).last_hidden_state)
            assert any("past_key_values" in str(w.message) for w in caught) == (name == "past_key_values")
    assert results[1].shape == (1, 3, config.hidden_size)
    torch.testing.assert_close(results[1], results[0])


def test_inputs_embeds_give_what_input_ids_give():
    config = tiny_config()
    model = Beit3Model(config).eval()
    pixel_values, input_ids, mask = padded_inputs(config, row=0, real=4)
    with torch.no_grad():
        by_ids = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).last_hidden_state
        embeds = model.get_input_embeddings()(input_ids)
        by_embeds = model(pixel_values=pixel_values, inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(by_embeds, by_ids)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=input_ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=embeds[..., :8])


@pytest.mark.parametrize("placement", ["all on disk", "split by max_memory"])
def test_device_map_offload_gives_the_outputs_of_the_model_in_memory(placement, tmp_path):
    from accelerate import infer_auto_device_map

    config = tiny_config()
    model = Beit3Model(config).eval()
    model.save_pretrained(tmp_path / "model")
    if placement == "all on disk":
        device_map = {"": "disk"}
    else:  # room for part of the weights: the rest goes to disk, split only between whole layers
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        device_map = infer_auto_device_map(
            model, max_memory={"cpu": size * 3 // 4, "disk": 10 * size}, no_split_module_classes=model._no_split_modules
        )
        assert set(device_map.values()) == {"cpu", "disk"}
        assert all(not key.startswith("layers.") or key.count(".") == 1 for key in device_map)  # whole layers only
    offloaded = Beit3Model.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    pixel_values, input_ids = inputs(config)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state
        got = offloaded(pixel_values=pixel_values, input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(got, expected)
