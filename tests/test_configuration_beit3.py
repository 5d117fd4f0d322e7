import pytest
import torch
from transformers import AutoConfig

from beit3 import Beit3Config, Beit3Model, list_presets


def count_parameters(config: Beit3Config) -> int:
    with torch.device("meta"):
        # with the mask token, as the official backbone holds one (our task heads have none)
        return sum(p.numel() for p in Beit3Model(config, use_mask_token=True).parameters())


def test_every_preset_builds_with_its_layout():
    names = list_presets()
    assert len(names) == 4 * 2 * 3
    for name in names:
        config = Beit3Config.from_preset(name)
        assert config.layout == ("paper" if "_paper_" in name else "released")
        assert config.image_size == int(name.rsplit("_", 1)[1])


def test_base_released_preset_has_the_official_parameter_count():
    # 220,987,392 = torchscale BEiT3 base at 224 (5 + 2 + 40 * 12 + 4 tensors); we fuse q/k/v, same count.
    assert count_parameters(Beit3Config.from_preset("beit3_base_patch16_224")) == 220_987_392


def test_giant_paper_preset_is_about_1_9_billion_parameters():
    config = Beit3Config.from_preset("beit3_giant_paper_patch14_224")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.patch_size) == (
        1408,
        40,
        6144,
        14,
    )
    assert 1.8e9 < count_parameters(config) < 2.0e9


def test_paper_layout_shares_attention_and_adds_vl_experts_on_top():
    config = Beit3Config.from_preset("beit3_tiny_paper_patch16_224")
    with torch.device("meta"):
        model = Beit3Model(config)
    assert list(model.layers[0].attention) == ["shared"]
    assert list(model.layers[0].ffn) == ["vision", "text"]
    assert list(model.layers[-1].ffn) == ["vision", "text", "vl"]


def test_overrides_and_config_files(tmp_path):
    config = Beit3Config.from_preset("beit3_base_patch16_480", final_layernorm=False)
    assert (config.image_size, config.final_layernorm) == (480, False)
    path = tmp_path / "mine.json"
    path.write_text('{"hidden_size": 48, "num_attention_heads": 3, "num_hidden_layers": 1}')
    assert Beit3Config.from_preset(str(path)).hidden_size == 48
    # A config saved by transformers writes layer_norm_eps as 1e-05, which YAML 1.1 alone would read as a string
    Beit3Config.from_preset("beit3_tiny_patch16_224", layer_norm_eps=1e-6).to_json_file(tmp_path / "saved.json")
    (tmp_path / "saved.yaml").write_text("hidden_size: 64\nnum_attention_heads: 2\nlayer_norm_eps: 1e-6\n")
    for name in ("saved.json", "saved.yaml"):
        assert Beit3Config.from_preset(str(tmp_path / name)).layer_norm_eps == 1e-6


def test_save_and_auto_config_round_trip(tmp_path):
    config = Beit3Config.from_preset("beit3_tiny_paper_patch16_384")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, Beit3Config)
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}


@pytest.mark.parametrize(
    "name, message",
    [
        ("beit3_huge_patch16_224", "Unknown BEiT-3 preset"),
        ("beit3_giant_patch16_224", "uses patch 14"),
    ],
)
def test_bad_preset_names_say_what_exists(name, message):
    with pytest.raises(ValueError, match=message):
        Beit3Config.from_preset(name)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "not a multiple of num_attention_heads"),
        (dict(image_size=225), "not a multiple of patch_size"),
        (dict(vl_ffn_layers=13), "vl_ffn_layers"),
    ],
)
def test_inconsistent_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Beit3Config(**fields)


def test_mask_token_id_follows_the_vocabulary():
    assert Beit3Config().mask_token_id == 64001
    assert Beit3Config(vocab_size=1000).mask_token_id is None
    assert Beit3Config(vocab_size=1000, mask_token_id=999).mask_token_id == 999


def test_a_folder_without_config_json_is_refused_not_read_as_a_default_config(tmp_path):
    # transformers 5.25 gives a default (base-size) config for a folder without config.json
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(OSError, match=r"holds no config.json, so the model's sizes are unknown"):
        Beit3Config.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("hidden_size", "abc", "a positive integer"),
        ("patch_size", 0, "a positive integer"),
        ("vl_ffn_layers", -1, ">= 0"),
    ],
)
def test_integer_fields_of_the_wrong_type_or_range_are_named(field, value, words):
    with pytest.raises(ValueError, match=rf"^Invalid Beit3Config: {field} {value!r} must be .*{words}"):
        Beit3Config(**{field: value})
