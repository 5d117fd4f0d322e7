"""Official checkpoints: equality with torchscale (the reference) and timm (an independent second reference)."""

import argparse
import contextlib
import io
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import REFERENCE, reference_config, reference_config_file, tiny_config, torchscale_reference
from safetensors import safe_open
from timm.models.vision_transformer import checkpoint_filter_fn
from torchscale.architecture.config import EncoderConfig

from beit3 import Beit3Config, Beit3Model
from beit3.checkpoints import load_state_dict_checked, read_checkpoint
from beit3.convert import beit3_to_official, main, model_from_official
from beit3.modeling_heads import Beit3ForImageClassification

IMAGE, PATCH, HIDDEN, VOCAB = (REFERENCE[k] for k in ("image_size", "patch_size", "hidden_size", "vocab_size"))


def save_official(model: torch.nn.Module, path, dtype=torch.float32) -> None:
    torch.save({"model": {"beit3." + k: v.to(dtype) for k, v in model.state_dict().items()}}, path)


def text_batch():
    ids = torch.randint(0, VOCAB, (3, 7))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    padding[2, 2:] = True
    return ids, padding


@pytest.mark.parametrize("final_layernorm", [True, False])
def test_converted_checkpoint_gives_torchscale_outputs(tmp_path, final_layernorm):
    reference = torchscale_reference(final_layernorm)
    save_official(reference, tmp_path / "official.pth")
    main(
        [
            "--checkpoint",
            str(tmp_path / "official.pth"),
            "--output",
            str(tmp_path / "ours"),
            "--config",
            reference_config_file(tmp_path, final_layernorm),
        ]
    )
    ours = Beit3Model.from_pretrained(tmp_path / "ours").eval()
    assert ours.config.final_layernorm == final_layernorm and ours.config.num_attention_heads == HIDDEN // 64

    images = torch.randn(3, 3, IMAGE, IMAGE)
    ids, padding = text_batch()
    with torch.no_grad():
        cases = {
            "image only": (reference(visual_tokens=images), ours(pixel_values=images)),
            "text with padding": (
                reference(textual_tokens=ids, text_padding_position=padding),
                ours(input_ids=ids, attention_mask=~padding),
            ),
            "image+text with padding": (
                reference(textual_tokens=ids, visual_tokens=images, text_padding_position=padding),
                ours(pixel_values=images, input_ids=ids, attention_mask=~padding),
            ),
        }
    for name, (theirs, mine) in cases.items():
        diff = (theirs["encoder_out"] - mine.last_hidden_state).abs().max().item()
        assert diff <= 1e-4, f"{name}: max |diff| {diff}"


def test_conversion_back_to_the_official_layout_is_exact(tmp_path):
    reference = torchscale_reference(final_layernorm=True)
    save_official(reference, tmp_path / "official.pth")
    config = reference_config_file(tmp_path, final_layernorm=True)
    main(["--checkpoint", str(tmp_path / "official.pth"), "--output", str(tmp_path / "ours"), "--config", config])
    main(["--checkpoint", str(tmp_path / "ours"), "--to", "official", "--output", str(tmp_path / "back.pth")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    original = {"beit3." + k: v for k, v in reference.state_dict().items()}
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_image_output_equals_timm_on_the_same_official_checkpoint(tmp_path):
    reference = torchscale_reference(final_layernorm=False)  # timm's converter expects no final LayerNorm
    save_official(reference, tmp_path / "official.pth")
    timm_kwargs = dict(
        img_size=IMAGE, patch_size=PATCH, embed_dim=HIDDEN, depth=2, num_heads=HIDDEN // 64, mlp_ratio=2, num_classes=0
    )
    theirs = timm.create_model("beit3_base_patch16_224", **timm_kwargs).eval()
    official = torch.load(tmp_path / "official.pth", weights_only=True)
    result = theirs.load_state_dict(checkpoint_filter_fn(official, theirs), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {
        "fc_norm.weight",
        "fc_norm.bias",
    }  # the classifier's norm
    ours = model_from_official(tmp_path / "official.pth", reference_config(final_layernorm=False))
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(pixel_values=images).last_hidden_state, theirs.forward_features(images), atol=1e-5, rtol=1e-5
        )

    # and our --to timm file loads into timm with the call the converter prints
    loaded = timm_model_as_printed(
        [
            "--checkpoint",
            str(tmp_path / "official.pth"),
            "--to",
            "timm",
            "--output",
            str(tmp_path / "vision.safetensors"),
            "--config",
            reference_config_file(tmp_path, final_layernorm=False),
        ]
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().forward_features(images), theirs.forward_features(images))


def timm_model_as_printed(argv: list[str]):
    """Runs the converter, then the ``timm.create_model(...)`` call it prints, exactly as printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(argv)
    call = next(line for line in printed.getvalue().splitlines() if line.startswith("load it with: ")).removeprefix(
        "load it with: "
    )
    return eval(call, {"timm": timm})  # the line the converter printed for the user to paste


@pytest.mark.parametrize("head", ["backbone", "classifier"])
def test_the_printed_timm_call_loads_any_size_with_its_preprocessing(tmp_path, head):
    config = tiny_config(
        hidden_size=HIDDEN,
        num_attention_heads=2,
        intermediate_size=256,
        num_hidden_layers=3,
        num_labels=5,
        final_layernorm=head == "backbone",
    )  # as released: the ImageNet classifiers have no final LayerNorm
    ours = (Beit3Model(config) if head == "backbone" else Beit3ForImageClassification(config)).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = timm_model_as_printed(
        ["--checkpoint", str(tmp_path / "ours"), "--to", "timm", "--output", str(tmp_path / "vision.safetensors")]
    ).eval()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        if head == "backbone":  # with its final LayerNorm
            torch.testing.assert_close(
                theirs.forward_features(images), ours(pixel_values=images).last_hidden_state, atol=1e-5, rtol=1e-5
            )
        else:
            torch.testing.assert_close(theirs(images), ours(pixel_values=images).logits, atol=1e-5, rtol=1e-5)
    data = timm.data.resolve_data_config(model=theirs)
    expected = (0.485, 0.456, 0.406) if head == "classifier" else (0.5, 0.5, 0.5)
    assert data["mean"] == expected and data["input_size"] == (3, IMAGE, IMAGE) and data["interpolation"] == "bicubic"
    with safe_open(str(tmp_path / "vision.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["pretrained_cfg"])["mean"] == list(expected)
    if head == "classifier":  # timm's VisionTransformer holds a final LayerNorm or an fc_norm, not both
        config.final_layernorm = True
        Beit3ForImageClassification(config).save_pretrained(tmp_path / "both")
        with pytest.raises(SystemExit, match="final backbone LayerNorm before its fc_norm"):
            main(
                ["--checkpoint", str(tmp_path / "both"), "--to", "timm", "--output", str(tmp_path / "both.safetensors")]
            )


def test_fp16_checkpoint_is_read_in_fp32_and_interpolated_like_unilm(tmp_path):
    reference = torchscale_reference(final_layernorm=True)
    save_official(reference, tmp_path / "half.pth", dtype=torch.float16)
    assert read_checkpoint(tmp_path / "half.pth")["beit3.text_embed.weight"].dtype == torch.float32

    ours = model_from_official(tmp_path / "half.pth", reference_config(final_layernorm=True, image_size=48))
    table = reference.state_dict()["encoder.embed_positions.A.weight"].half().float()
    grid = (
        table[3:].reshape(1, 4, 4, HIDDEN).permute(0, 3, 1, 2)
    )  # unilm: rows 0-2 kept, the 4x4 grid resized bicubically
    grid = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, HIDDEN)
    expected = torch.cat([table[:3], grid])
    torch.testing.assert_close(ours.embeddings.vision_position_embeddings[0], expected, atol=1e-6, rtol=1e-6)
    assert ours(pixel_values=torch.randn(1, 3, 48, 48)).last_hidden_state.shape == (1, 37, HIDDEN)


def test_vision_only_checkpoint_converts_with_a_warning(tmp_path):
    reference = torchscale_reference(final_layernorm=False)
    state = {
        "beit3." + k: v for k, v in reference.state_dict().items() if ".B." not in k and not k.startswith("text_embed")
    }
    torch.save({"model": state}, tmp_path / "in1k.pth")
    with pytest.warns(UserWarning, match="keep their initial values"):
        ours = model_from_official(tmp_path / "in1k.pth", reference_config(final_layernorm=False))
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(pixel_values=images).last_hidden_state,
            reference(visual_tokens=images)["encoder_out"],
            atol=1e-5,
            rtol=1e-5,
        )


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save({"model": timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()}, tmp_path / "vit.pth")
    with pytest.raises(SystemExit, match="error: This is not an official BEiT-3 checkpoint"):
        main(["--checkpoint", str(tmp_path / "vit.pth"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_arbitrary_objects_is_not_unpickled(tmp_path):
    torch.save(
        {"model": {"beit3.vision_embed.cls_token": torch.zeros(1)}, "args": EncoderConfig()}, tmp_path / "pickled.pth"
    )
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(tmp_path / "pickled.pth")


def test_a_checkpoint_that_does_not_fit_names_keys_and_shapes():
    model = Beit3Model(tiny_config())
    state = model.state_dict()
    state["embeddings.text_embeddings.weight"] = torch.zeros(7, 32)
    del state["layers.0.ffn.vision.fc1.bias"]
    state["layers.9.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load_state_dict_checked(model, state)
    message = str(error.value)
    assert "embeddings.text_embeddings.weight: (7, 32) in the checkpoint, (100, 32) in the model" in message
    assert "1 missing: layers.0.ffn.vision.fc1.bias" in message and "1 unexpected: layers.9.extra" in message


def test_the_paper_layout_has_no_official_form():
    model = Beit3Model(tiny_config(multiway_attention=False, vl_ffn_layers=1))
    with pytest.raises(ValueError, match="paper layout"):
        beit3_to_official(model.state_dict(), model.config)


def test_the_head_count_is_carried_never_guessed(tmp_path):
    """No tensor shows the number of attention heads (q, k, v are hidden x hidden however they are split): a file
    written by --to official carries its config; a preset of exactly the tensors' sizes names it; unilm's args name
    the model; otherwise --config must, and a --config that does not fit is one error line."""
    tiny = Beit3Model(Beit3Config.from_preset("beit3_tiny_patch16_224")).eval()  # hidden 64, 2 heads (64 // 64 = 1)
    custom = Beit3Model(tiny_config(hidden_size=96, num_attention_heads=3, intermediate_size=128)).eval()
    images = torch.randn(2, 3, 224, 224)
    for name, model in (("tiny", tiny), ("custom", custom)):
        model.save_pretrained(tmp_path / name)
        main(["--checkpoint", str(tmp_path / name), "--to", "official", "--output", str(tmp_path / f"{name}.pth")])
        main(["--checkpoint", str(tmp_path / f"{name}.pth"), "--output", str(tmp_path / f"{name}-back")])
        back = Beit3Model.from_pretrained(tmp_path / f"{name}-back").eval()
        assert back.config.num_attention_heads == model.config.num_attention_heads
        size = model.config.image_size
        with torch.no_grad():
            torch.testing.assert_close(
                back(pixel_values=images[..., :size, :size]).last_hidden_state,
                model(pixel_values=images[..., :size, :size]).last_hidden_state,
            )
    # The same tensors without our config: the tiny preset's sizes name 2 heads; the custom sizes name nothing.
    for name, heads in (("tiny", 2), ("custom", None)):
        bare = {"model": read_checkpoint(tmp_path / f"{name}.pth")}
        torch.save(bare, tmp_path / f"{name}-bare.pth")
        if heads:
            assert model_from_official(tmp_path / f"{name}-bare.pth").config.num_attention_heads == heads
        else:
            with pytest.raises(SystemExit, match=r"number of attention heads .* Pass --config"):
                main(["--checkpoint", str(tmp_path / f"{name}-bare.pth"), "--output", str(tmp_path / "x")])
            assert not (tmp_path / "x").exists()
            # unilm's training saves its args beside the weights; torchscale's name for the count is read there
            torch.save({**bare, "args": argparse.Namespace(encoder_attention_heads=3, epochs=10)}, tmp_path / "a.pth")
            assert model_from_official(tmp_path / "a.pth").config.num_attention_heads == 3
    config = tmp_path / "tiny_4_heads.json"
    tiny_config(num_attention_heads=4).to_json_file(config)  # hidden 32: it does not fit the custom file
    with pytest.raises(
        SystemExit, match=r"^error: The config does not fit .*: hidden_size 32 in the config, 96 in the tensors; "
    ):
        main(
            [
                "--checkpoint",
                str(tmp_path / "custom-bare.pth"),
                "--output",
                str(tmp_path / "x"),
                "--config",
                str(config),
            ]
        )


def test_a_config_of_sizes_alone_converts_the_task_layouts_and_a_conflict_is_one_line(tmp_path, caplog):
    """The released VQA and classification files drop the final LayerNorm and carry no label names: a --config that
    names the sizes and the head count (as a user writes one for a custom size) takes the rest from the tensors."""
    from beit3.modeling_heads import Beit3ForVisualQuestionAnswering

    vqa = Beit3ForVisualQuestionAnswering(
        tiny_config(hidden_size=96, num_attention_heads=3, intermediate_size=128, final_layernorm=False, num_labels=7)
    ).eval()
    torch.save({"model": beit3_to_official(vqa.state_dict(), vqa.config)}, tmp_path / "vqa.pth")
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text("hidden_size: 96\nnum_hidden_layers: 2\nintermediate_size: 128\nnum_attention_heads: 3\n")
    convert = lambda output: main(  # noqa: E731
        ["--checkpoint", str(tmp_path / "vqa.pth"), "--task", "vqa", "--output", str(output), "--config", str(sizes)]
    )
    with caplog.at_level("WARNING"):
        convert(tmp_path / "out")
    assert not [r for r in caplog.records if "incompatible" in r.getMessage()]  # transformers' id2label complaint
    back = Beit3ForVisualQuestionAnswering.from_pretrained(tmp_path / "out").eval()
    assert (back.config.final_layernorm, back.config.max_position_embeddings, back.config.num_labels) == (False, 40, 7)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(3, 100, (2, 5))}
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, vqa(**inputs).logits)
    sizes.write_text(sizes.read_text() + "final_layernorm: true\npatch_size: 16\n")
    with pytest.raises(SystemExit) as error:
        convert(tmp_path / "x")
    message = str(error.value)
    assert message.count("\n") == 0 and "patch_size 16 in the config, 8 in the tensors" in message
    assert "final_layernorm True in the config, False in the tensors" in message and not (tmp_path / "x").exists()
