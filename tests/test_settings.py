"""The train section (beit3/training/settings.py): every field checked before any work."""

import re
from pathlib import Path

import pytest

from beit3.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("save_every", 0, "train.save_every must be an integer >= 1; got 0"),
        ("log_every", 0, "train.log_every must be an integer >= 1"),
        ("max_steps", "abc", "train.max_steps must be an integer >= 1; got 'abc'"),
        ("max_steps", -3, "train.max_steps must be an integer >= 1; got -3"),
        ("micro_batch_size", -1, "train.micro_batch_size must be an integer >= 1"),
        ("keep_last", 0, "train.keep_last must be an integer >= 1"),
        ("lr", 0, "train.lr must be a number > 0"),
        ("lr", "fast", "train.lr must be a number > 0"),
        ("min_lr_ratio", 2, "train.min_lr_ratio must be a number >= 0 and <= 1"),
        ("layer_decay", 1.5, "train.layer_decay must be a number > 0 and <= 1 or null"),
        ("betas", [0.9], "train.betas must be two numbers in [0, 1)"),
        ("precision", "fp8", "train.precision must be one of fp32, bf16, fp16; got 'fp8'"),
        ("zero_stage", 4, "train.zero_stage must be one of 0, 1, 2, 3; got 4"),
        ("gradient_checkpointing", "yes", "train.gradient_checkpointing must be true or false"),
        ("num_workers", True, "train.num_workers must be an integer >= 0"),
        ("lr", float("nan"), "train.lr must be a number > 0; got nan"),
        ("zero_stage", True, "train.zero_stage must be one of 0, 1, 2, 3; got True"),
        ("output_dir", "", "train.output_dir must be a folder path; got ''"),
    ],
)
def test_every_train_setting_is_checked_before_any_work(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainSettings.from_config({"output_dir": "x", "max_steps": 10, "save_every": 5, field: value})
    settings = TrainSettings.from_config(
        {"output_dir": "x", "max_steps": 10, "save_every": 5, "lr": 3, "layer_decay": None}
    )
    assert settings.lr == 3.0 and isinstance(settings.lr, float)  # an integer is a number
