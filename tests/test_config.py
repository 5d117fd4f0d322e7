"""Run configs (beit3/training/config.py): overrides, typos, the packaged configs."""

from pathlib import Path

import pytest

from beit3.training.config import load_config
from beit3.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent


def test_overrides_reach_nested_fields_and_typos_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  betas: [0.9, 0.98]\nmodel:\n  preset: beit3_tiny_patch16_224\n")
    config = load_config(path, ["train.lr=3e-4", "train.betas=[0.9, 0.999]", "model.preset=beit3_base_patch16_224"])
    assert (
        config["train"]["lr"] == 3e-4
        and config["train"]["betas"] == [0.9, 0.999]
        and config["model"]["preset"] == "beit3_base_patch16_224"
    )
    with pytest.raises(KeyError, match="no field 'train.learning_rate'"):
        load_config(path, ["train.learning_rate=1"])
    with pytest.raises(KeyError, match="no section 'optim'"):
        load_config(path, ["optim.lr=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(KeyError, match="Unknown train settings"):
        TrainSettings.from_config({"output_dir": "x", "max_steps": 1, "save_every": 1, "lerning_rate": 1})


def test_set_accepts_every_declared_setting_the_file_does_not_list(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    config = load_config(path, ["train.max_nonfinite_steps=3"], declared={"train": TrainSettings.field_names()})
    assert config["train"]["max_nonfinite_steps"] == 3
    with pytest.raises(KeyError, match="known here: .*max_nonfinite_steps"):
        load_config(path, ["train.max_nonfinite_stepz=3"], declared={"train": TrainSettings.field_names()})


def test_shipped_pretraining_configs_parse():
    for name in ("tiny", "beit3_base_paper"):
        config = load_config(ROOT / "configs/pretrain" / f"{name}.yaml")
        settings = TrainSettings.from_config(config["train"])
        assert settings.max_steps > 0 and settings.save_every > 0 and settings.output_dir
        assert set(config["data"]["batch_size"]) == {"image", "text", "pair"}


def test_shipped_task_configs_parse_and_name_known_settings():
    for path in sorted((ROOT / "configs" / "tasks").glob("*.yaml")):
        config = load_config(path)
        settings = TrainSettings.from_config(config["train"])
        assert settings.max_steps > 0 and settings.lr > 0, path
        assert {"train", "eval"} <= set(config["data"]), path
        assert config["model"]["preset"].startswith("beit3_"), path


def test_a_field_that_moved_to_another_section_is_named_with_its_new_place():
    from beit3.training.pretraining import PretrainingData

    with pytest.raises(KeyError, match=r"data.deepspeed is now train.deepspeed: move it there"):
        PretrainingData.from_config({"deepspeed": "configs/deepspeed/zero2.json"})
