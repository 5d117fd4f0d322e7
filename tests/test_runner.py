import pytest
import torch

from beit3.training.runner import autocast, command_line, ordered_batches, read_run_config, step_loader
from beit3.training.engine import TrainSettings


def _config(tmp_path, train="{output_dir: out, max_steps: 2, save_every: 1}", data="{}"):
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {data}\ntrain: {train}\n")
    return path


def test_a_run_config_is_read_with_its_overrides_and_every_declared_train_setting(tmp_path):
    config, settings = read_run_config(_config(tmp_path), ["train.max_steps=5", "train.max_nonfinite_steps=3"])
    assert settings.max_steps == 5 and settings.max_nonfinite_steps == 3 and config["train"]["max_steps"] == 5


@pytest.mark.parametrize("train, overrides, message", [
    ("{output_dir: out, max_steps: 2, save_every: 0}", [], "train.save_every must be an integer >= 1; got 0"),
    ("{output_dir: out, max_steps: 2, save_every: 1}", ["train.max_stepz=3"], "has no field 'train.max_stepz'; known here:"),
    ("{output_dir: out, max_steps: 2, save_every: 1}", ["train.max_steps"], "--set takes key=value"),
])
def test_a_config_that_cannot_run_ends_with_one_error_line_before_any_work(tmp_path, train, overrides, message):
    with pytest.raises(SystemExit) as stopped:
        read_run_config(_config(tmp_path, train), overrides)
    assert str(stopped.value).startswith("error: ") and message in str(stopped.value)


def test_a_missing_section_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {output_dir: out, max_steps: 2, save_every: 1}\n")
    with pytest.raises(SystemExit, match="has no 'model', 'data' section"):
        read_run_config(path, [], sections=("model", "data", "train"))
    with pytest.raises(SystemExit, match="No config file at"):
        read_run_config(tmp_path / "missing.yaml", [])


def test_command_line_takes_the_shared_options_and_a_programs_own():
    args = command_line("doc", ["--config", "c.yaml", "--set", "a=1", "--set", "b=2", "--local_rank", "1", "--kind", "vqkd"],
                        add_arguments=lambda parser: parser.add_argument("--kind"))
    assert (args.config, args.set, args.kind) == ("c.yaml", ["a=1", "b=2"], "vqkd")


def test_step_loader_and_ordered_batches():
    settings = TrainSettings(output_dir="out", max_steps=1, save_every=1, num_workers=0)
    batches = list(step_loader(settings, [{"x": torch.ones(2)}, {"x": torch.zeros(2)}], batch_size=None))
    assert [b["x"].sum().item() for b in batches] == [2.0, 0.0]
    items = [{"pixel_values": torch.full((1,), float(i)), "question_id": i} for i in range(5)]
    passes = list(ordered_batches(items, 2))
    assert [meta["question_id"].tolist() for _, meta in passes] == [[0, 1], [2, 3], [4]]
    assert [inputs["pixel_values"].flatten().tolist() for inputs, _ in passes][0] == [0.0, 1.0]


def test_autocast_only_for_half_precisions():
    with autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
