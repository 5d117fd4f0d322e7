from pathlib import Path

import pytest
import torch
import yaml

from beit3.training.runner import autocast, command_line, ordered_batches, read_run_config, step_loader
from beit3.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path, train="{output_dir: out, max_steps: 2, save_every: 1}", data="{}", name="run.yaml"):
    path = tmp_path / name
    path.write_text(f"data: {data}\ntrain: {train}\n")
    return path


def test_a_run_config_is_read_with_its_overrides_and_every_declared_train_setting(tmp_path):
    config, settings, _ = read_run_config(_config(tmp_path), ["train.max_steps=5", "train.max_nonfinite_steps=3"])
    assert settings.max_steps == 5 and settings.max_nonfinite_steps == 3 and config["train"]["max_steps"] == 5


def test_typed_sections_take_every_declared_field_refuse_unknown_ones_and_print_resolved(tmp_path, capsys):
    from beit3.training.tasks import EvalOptions
    from beit3.training.tasks.captioning import CaptioningData

    path = _config(tmp_path, data="{train: {karpathy: k.json}, mask_prob: 0.7}")
    # eval is not in the file and num_beams/drop_worst_after are not listed: declared fields can still be set
    config, _, sections = read_run_config(
        path, ["eval.num_beams=5", "data.drop_worst_after=10"], typed={"data": CaptioningData, "eval": EvalOptions}
    )
    data, options = sections["data"], sections["eval"]
    assert (data.mask_prob, data.drop_worst_after, data.max_text_length, data.label_smoothing) == (0.7, 10, 32, 0.1)
    assert (options.num_beams, options.batch_size, options.length_penalty) == (5, 64, 0.6)
    assert (
        config["eval"] == {"num_beams": 5} and "max_text_length" not in config["data"]
    )  # what was written and set, no defaults
    with pytest.raises(SystemExit, match=r"has no field 'data.mask_probability'; known here: .*drop_worst_after"):
        read_run_config(path, ["data.mask_probability=0.7"], typed={"data": CaptioningData, "eval": EvalOptions})
    unknown = _config(tmp_path, data="{train: {karpathy: k.json}, mask_probability: 0.7}", name="unknown.yaml")
    with pytest.raises(SystemExit, match=r"Unknown data settings \['mask_probability'\]; known: \[.*'mask_prob'"):
        read_run_config(unknown, [], typed={"data": CaptioningData})
    with pytest.raises(SystemExit) as stopped:
        read_run_config(path, [], typed={"data": CaptioningData, "eval": EvalOptions}, show=True)
    printed = capsys.readouterr().out
    assert stopped.value.code == 0 and "drop_worst_after: 12000" in printed and "num_beams: 3" in printed
    assert "#   length_penalty: captioning: beam search's length penalty" in printed and "max_steps: 2" in printed


@pytest.mark.parametrize(
    "train, overrides, message",
    [
        ("{output_dir: out, max_steps: 2, save_every: 0}", [], "train.save_every must be an integer >= 1; got 0"),
        (
            "{output_dir: out, max_steps: 2, save_every: 1}",
            ["train.max_stepz=3"],
            "has no field 'train.max_stepz'; known here:",
        ),
        ("{output_dir: out, max_steps: 2, save_every: 1}", ["train.max_steps"], "--set takes key=value"),
    ],
)
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
    args = command_line(
        "doc",
        ["--config", "c.yaml", "--set", "a=1", "--set", "b=2", "--local_rank", "1", "--kind", "vqkd"],
        add_arguments=lambda parser: parser.add_argument("--kind"),
    )
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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.answer_min_count=0"], r"data.answer_min_count must be an integer >= 1; got 0"),
        (["data.vqa_head=cls"], r"data.vqa_head must be one of pooler, answer_slot; got 'cls'"),
        (["data.max_text_length=abc"], r"data.max_text_length must be an integer >= 3; got 'abc'"),
        (["data.hflip=1.5"], r"data.hflip must be a number >= 0 and <= 1; got 1.5"),
        (["eval.num_beams=0"], r"eval.num_beams must be an integer >= 1; got 0"),
        (["eval.precision=fp8"], r"eval.precision must be one of fp32, bf16, fp16; got 'fp8'"),
    ],
)
def test_every_typed_field_is_checked_for_type_and_range_before_any_work(tmp_path, overrides, message):
    from beit3.training.tasks import EvalOptions
    from beit3.training.tasks.vqa import VqaData

    with pytest.raises(SystemExit, match=message):
        read_run_config(_config(tmp_path), overrides, typed={"data": VqaData, "eval": EvalOptions})
    _, _, sections = read_run_config(
        _config(tmp_path), ["data.hflip=1", "eval.length_penalty=1"], typed={"data": VqaData, "eval": EvalOptions}
    )
    assert sections["data"].hflip == 1.0 and isinstance(
        sections["eval"].length_penalty, float
    )  # an int where a float goes


def test_the_model_section_is_typed_too(tmp_path):
    from beit3.training.finetune import FinetuneModel
    from beit3.training.pretraining import PretrainingModel

    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {preset: beit3_tiny_patch16_224}\ndata: {}\ntrain: {output_dir: out, max_steps: 2, save_every: 1}\n"
    )
    _, _, sections = read_run_config(
        path, ["model.init=runs/x", "model.overrides={image_size: 64}"], typed={"model": FinetuneModel}
    )
    assert (sections["model"].init, sections["model"].overrides) == ("runs/x", {"image_size": 64})
    with pytest.raises(SystemExit, match=r"has no field 'model.pretrained'; known here: init, overrides, preset"):
        read_run_config(path, ["model.pretrained=x"], typed={"model": FinetuneModel})
    with pytest.raises(SystemExit, match=r"model.overrides must be a mapping or null; got 3"):
        read_run_config(path, ["model.overrides=3"], typed={"model": PretrainingModel})
    path.write_text("model: {overrides: {}}\ndata: {}\ntrain: {output_dir: out, max_steps: 2, save_every: 1}\n")
    with pytest.raises(SystemExit, match=r"The model section needs model.preset"):
        read_run_config(path, [], typed={"model": PretrainingModel})


def test_each_model_override_can_be_set_by_itself_and_an_unknown_one_is_named(tmp_path, capsys):
    """``--set model.overrides.<field>`` reaches one Beit3Config field, whether or not the file has an overrides
    dict; a misspelt field is refused (a config would take it silently as an attribute of its own)."""
    from beit3.training.finetune import FinetuneModel
    from beit3.training.pretraining import PretrainingModel, run

    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {preset: beit3_tiny_patch16_224}\ndata: {}\ntrain: {output_dir: out, max_steps: 2, save_every: 1}\n"
    )
    for section in (FinetuneModel, PretrainingModel):
        _, _, sections = read_run_config(
            path,
            ["model.overrides.itm_weight=1.0", "model.overrides.drop_path_rate=0.1"],
            typed={"model": section},
        )
        assert sections["model"].overrides == {"itm_weight": 1.0, "drop_path_rate": 0.1}
    with pytest.raises(SystemExit, match=r"has no field 'model.overrides.itm_wieght'; known here: .*itm_weight"):
        read_run_config(path, ["model.overrides.itm_wieght=1"], typed={"model": PretrainingModel})
    with pytest.raises(SystemExit, match=r"model.overrides has unknown keys \['drop_path'\]; known: .*drop_path_rate"):
        read_run_config(path, ["model.overrides={drop_path: 0.1}"], typed={"model": PretrainingModel})
    with pytest.raises(SystemExit, match=r"unknown keys \['drop_path_rate:0.1'\].*a space after the colon"):
        read_run_config(path, ["model.overrides={drop_path_rate:0.1}"], typed={"model": PretrainingModel})
    with pytest.raises(SystemExit) as stopped:  # the README's example, on the packaged tiny config
        run(["--config", "configs/pretrain/tiny.yaml", "--set", "model.overrides.itm_weight=1.0", "--print-config"])
    assert stopped.value.code == 0 and "itm_weight: 1.0" in capsys.readouterr().out


def test_the_top_level_is_a_typed_section_too(tmp_path, capsys):
    """The keys beside the sections (a pretraining config's tokenizers) are declared, checked and --set-able; a
    misspelt one is refused instead of leaving the real one unset."""
    from beit3.training.pretraining import SECTIONS

    path = tmp_path / "run.yaml"
    path.write_text(
        "text_tokenizer: tok\nmodel: {preset: beit3_tiny_patch16_224}\ndata: {sources: {}, batch_size: {image: 1}}\n"
        "train: {output_dir: out, max_steps: 2, save_every: 1}\n"
    )
    _, _, sections = read_run_config(path, ["visual_tokenizer=vq"], typed=SECTIONS)
    assert (sections["top"].text_tokenizer, sections["top"].visual_tokenizer) == ("tok", "vq")
    with pytest.raises(SystemExit, match=r"has no field 'visual_tokeniser'; known here: .*visual_tokenizer"):
        read_run_config(path, ["visual_tokeniser=vq"], typed=SECTIONS)
    path.write_text(path.read_text().replace("text_tokenizer", "text_tokeniser"))
    with pytest.raises(SystemExit, match=r"Unknown top-level settings \['text_tokeniser'\]; known: .*'text_tokenizer'"):
        read_run_config(path, [], typed=SECTIONS)
    path.write_text(path.read_text().replace("text_tokeniser", "text_tokenizer"))
    with pytest.raises(SystemExit) as stopped:
        read_run_config(path, [], typed=SECTIONS, show=True)
    printed = capsys.readouterr().out
    assert stopped.value.code == 0 and "visual_tokenizer: null" in printed and "# top-level:" in printed


def test_a_split_with_a_key_its_task_does_not_read_is_named_with_the_known_ones(tmp_path):
    """``--set "data.train={questions:/a,annotations:/b}"``: without a space after each colon YAML reads two keys
    and no values; the error says so instead of failing later on a missing file or answer labels."""
    from beit3.training.tasks import TASKS

    vqa = {"data": TASKS["vqa"].Data}
    with pytest.raises(
        SystemExit,
        match=r"data.train has unknown keys \['annotations:/b', 'questions:/a'\]; known: "
        r"annotations, data_root, image_root, index, questions\. .*space after the colon",
    ):
        read_run_config(_config(tmp_path), ["data.train={questions:/a,annotations:/b}"], typed=vqa)
    _, _, sections = read_run_config(_config(tmp_path), ["data.train={questions: /a, annotations: /b}"], typed=vqa)
    assert sections["data"].train == {"questions": "/a", "annotations": "/b"}
    for task, task_class in TASKS.items():  # every packaged config's splits hold only what its task reads
        for path in (ROOT / "configs" / "tasks").glob(f"{task}_*.yaml"):
            task_class.Data.from_config(yaml.safe_load(path.read_text())["data"])


def test_loaders_pin_their_batches_on_a_gpu_machine_only(tmp_path, monkeypatch):
    settings = TrainSettings(output_dir=str(tmp_path), max_steps=1, save_every=1, num_workers=0)
    assert not step_loader(settings, [1, 2], batch_size=None).pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert step_loader(settings, [1, 2], batch_size=None).pin_memory  # so the non_blocking copy overlaps
