"""The fine-tuning runner (beit3/training/finetune.py) and its tasks (finetune_tasks.py), through the task
scripts. The demo's smoke run (conftest ``demo_run``) has trained every task from scratch and from the
pretrained export on a generated world; these tests reuse its data, tokenizer and models."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit3 import load_tokenizer
from beit3.training.finetune import FinetuneModel, initial_model, run
from beit3.training.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent


def _args(output: Path, task: str, *extra: str, folder: Path | None = None) -> list[str]:
    folder = folder or output / "finetune" / f"{task}_pretrained"
    return [
        "--config",
        str(output / "configs" / f"{task}_demo.yaml"),
        "--set",
        f"train.output_dir={folder}",
        "--set",
        f"tokenizer={output / 'text-tokenizer'}",
        *extra,
    ]


def _train(output: Path, folder: Path, *sets: str) -> None:
    command = [
        sys.executable,
        "tasks/vqa.py",
        *_args(output, "vqa", folder=folder),
        "--set",
        "model.init=null",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.save_every=2",
        "--set",
        "train.log_every=1",
        "--set",
        "train.keep_last=2",
        "--set",
        "train.micro_batch_size=4",
        *[part for s in sets for part in ("--set", s)],
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_a_restarted_run_resumes_exactly(demo_run, tmp_path):
    output, _ = demo_run
    _train(output, tmp_path / "straight")
    _train(output, tmp_path / "restarted")
    restarted = tmp_path / "restarted"
    # Roll the second run back to its step-2 checkpoint, as if it had been killed after saving it.
    shutil.rmtree(restarted / "checkpoints" / "step00000004")
    shutil.rmtree(restarted / "final")
    (restarted / "eval_results.json").unlink()
    lines = (restarted / "metrics.jsonl").read_text().splitlines()
    (restarted / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    _train(output, restarted)
    losses = {
        name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("straight", "restarted")
    }
    assert len(losses["straight"]) == 4
    assert losses["restarted"] == pytest.approx(losses["straight"], rel=1e-5, abs=1e-6)
    scores = [
        json.loads((tmp_path / name / "eval_results.json").read_text())["accuracy"]
        for name in ("straight", "restarted")
    ]
    assert scores[0] == pytest.approx(scores[1])


def test_evaluate_mode_scores_the_exported_model_as_training_did(demo_run, tmp_path):
    output, _ = demo_run
    for task in ("vqa", "nlvr2", "classification"):
        trained = json.loads((output / "finetune" / f"{task}_pretrained" / "eval_results.json").read_text())
        scores = run(task, _args(output, task, "--mode", "evaluate", "--output", str(tmp_path / task)))
        assert scores[trained["metric"]] == pytest.approx(trained[trained["metric"]], abs=1e-6)
        assert json.loads((tmp_path / task / "eval_results.json").read_text())["task"] == task


def test_classification_reads_no_text_and_needs_no_tokenizer(demo_run, tmp_path):
    """ImageNet fine-tuning from weights alone (an official .pth has no tokenizer): no tokenizer to find and pass."""
    output, _ = demo_run
    folder = tmp_path / "classification"
    no_text = ["--set", "tokenizer=null"]
    command = [sys.executable, "tasks/classification.py", *_args(output, "classification", folder=folder), *no_text]
    command += ["--set", "model.init=null", "--set", "train.max_steps=2", "--set", "train.save_every=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (folder / "final" / "preprocessor_config.json").is_file()
    assert not (folder / "final" / "tokenizer.json").exists()
    scores = run("classification", [*_args(output, "classification", "--mode", "evaluate", folder=folder), *no_text])
    assert 0.0 <= scores["top1"] <= 100.0


def test_blind_evaluation_swaps_the_images_and_vqa_reports_each_question_type_with_its_prior(demo_run, tmp_path):
    output, _ = demo_run
    scores = run("vqa", _args(output, "vqa", "--mode", "evaluate", "--blind", "--output", str(tmp_path / "vqa")))
    written = json.loads((tmp_path / "vqa" / "blind_eval_results.json").read_text())
    assert written["blind"] is True and written["accuracy"] == pytest.approx(scores["accuracy"])
    assert (tmp_path / "vqa" / "blind_vqa_eval_predictions.json").is_file() and not (
        tmp_path / "vqa" / "eval_results.json"
    ).exists()
    types = written["per_question_type"]
    assert set(types) <= {"what color is the", "what shape is", "how many", "where is the", "is there a"} and types
    for row in types.values():
        assert 0 <= row["accuracy"] <= 100 and 0 <= row["prior"] <= 100 and row["questions"] > 0
    assert sum(row["questions"] for row in types.values()) == len(
        json.loads((tmp_path / "vqa" / "blind_vqa_eval_predictions.json").read_text())
    )
    run("nlvr2", _args(output, "nlvr2", "--mode", "evaluate", "--blind", "--output", str(tmp_path / "nlvr2")))
    assert json.loads((tmp_path / "nlvr2" / "blind_eval_results.json").read_text())["blind"] is True
    with pytest.raises(ValueError, match="--blind is a control for --mode evaluate"):
        run("nlvr2", _args(output, "nlvr2", "--mode", "predict", "--blind"))


def test_predict_mode_writes_the_official_formats(demo_run, tmp_path):
    output, _ = demo_run
    run("vqa", _args(output, "vqa", "--mode", "predict", "--output", str(tmp_path)))
    predictions = json.loads((tmp_path / "vqa_predictions.json").read_text())
    questions = json.loads((output / "data" / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())[
        "questions"
    ]
    assert sorted(p["question_id"] for p in predictions) == sorted(q["question_id"] for q in questions)
    answers = set(
        json.loads((output / "finetune" / "vqa_pretrained" / "final" / "config.json").read_text())["id2label"].values()
    )
    assert all(set(p) == {"question_id", "answer"} and p["answer"] in answers for p in predictions)

    run("nlvr2", _args(output, "nlvr2", "--mode", "predict", "--output", str(tmp_path)))
    rows = list(csv.reader(open(tmp_path / "nlvr2_predictions.csv")))
    identifiers = [
        json.loads(line)["identifier"]
        for line in (output / "data" / "nlvr2" / "dev.json").read_text().splitlines()
        if line
    ]
    assert [r[0] for r in rows] == identifiers and {r[1] for r in rows} <= {"True", "False"}

    run("classification", _args(output, "classification", "--mode", "predict", "--output", str(tmp_path)))
    rows = json.loads((tmp_path / "classification_predictions.json").read_text())
    classes = json.loads((output / "data" / "world.json").read_text())["classes"]
    assert len(rows) == len(list((output / "data" / "imagenet" / "val").rglob("*.png")))
    assert all(r["label"] in classes and 0 < r["score"] <= 1 for r in rows)

    # The demo's report stage ran captioning and retrieval predict: COCO results JSON, ranked captions.
    captions = json.loads((output / "finetune" / "captioning_pretrained" / "captions.json").read_text())
    test_ids = [
        im["cocoid"]
        for im in json.loads((output / "data" / "coco" / "dataset_coco.json").read_text())["images"]
        if im["split"] == "test"
    ]
    assert sorted(c["image_id"] for c in captions) == sorted(test_ids)
    assert all(set(c) == {"image_id", "caption"} and isinstance(c["caption"], str) for c in captions)
    ranked = json.loads((output / "finetune" / "retrieval_pretrained" / "retrieval_predictions.json").read_text())
    assert len(ranked) == len(test_ids) and all(
        len(r["captions"]) == 5 and r["scores"] == sorted(r["scores"], reverse=True) for r in ranked
    )


def test_retrieval_keeps_its_scalar_temperature_through_deepspeed_and_export(demo_run):
    output, _ = demo_run
    model = initial_model(
        TASKS["retrieval"], FinetuneModel(init=str(output / "finetune" / "retrieval_pretrained" / "final")), None, {}
    )
    assert model.logit_scale.shape == ()
    # It was trained: it moved from its initial value log(1 / 0.07).
    assert model.logit_scale.item() != pytest.approx(2.6593, abs=1e-7)


def test_a_head_of_another_size_is_refused_with_both_shapes(demo_run):
    output, _ = demo_run
    folder = output / "finetune" / "vqa_pretrained" / "final"
    with pytest.raises(Exception, match=r"head\.weight.*\(3, ") as error:
        initial_model(TASKS["vqa"], FinetuneModel(init=str(folder)), None, {"id2label": {0: "a", 1: "b", 2: "c"}})
    assert "torch.Size" in str(error.value) or "(3," in str(error.value)


def test_training_from_random_weights_needs_a_tokenizer(demo_run, tmp_path):
    output, _ = demo_run
    config = (
        (output / "configs" / "nlvr2_demo.yaml")
        .read_text()
        .replace("tokenizer: runs/demo/text-tokenizer", "tokenizer: null")
    )
    (tmp_path / "c.yaml").write_text(config)
    with pytest.raises(ValueError, match="needs tokenizer"):
        run(
            "nlvr2",
            [
                "--config",
                str(tmp_path / "c.yaml"),
                "--set",
                "model.init=null",
                "--set",
                f"train.output_dir={tmp_path / 'out'}",
            ],
        )


def test_a_missing_split_is_named(demo_run):
    output, _ = demo_run
    task = TASKS["nlvr2"]({"train": {"file": "x", "images": "y"}}, {})
    with pytest.raises(KeyError, match="no 'predict' split"):
        task.split("predict")


def test_vqa_vocabulary_comes_from_the_train_annotations(demo_run):
    from beit3.data.vqa_answers import normalize_answer

    output, _ = demo_run
    task = TASKS["vqa"](
        {
            "train": {
                "questions": str(output / "data/vqa/v2_OpenEnded_mscoco_train2014_questions.json"),
                "annotations": str(output / "data/vqa/v2_mscoco_train2014_annotations.json"),
            },
            "answer_min_count": 1,
        },
        {},
    )
    vocabulary = task.answer2label()
    annotations = json.loads((output / "data/vqa/v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    assert set(vocabulary) == {normalize_answer(a["multiple_choice_answer"]) for a in annotations}
    assert sorted(vocabulary.values()) == list(range(len(vocabulary)))


def test_captioning_step_predicts_only_masked_tokens_and_drops_the_worst(demo_run):
    output, _ = demo_run
    task = TASKS["captioning"](
        {"mask_prob": 0.5, "drop_worst_after": 5, "drop_worst_ratio": 0.5, "label_smoothing": 0.0}, {}
    )
    model = initial_model(type(task), FinetuneModel(init=str(output / "pretrained")), None, {})
    tokenizer = load_tokenizer(output / "text-tokenizer")
    task.setup(tokenizer, model.config)

    encoded = tokenizer(
        ["a big red circle on the left", "a small blue square"],
        padding="max_length",
        truncation=True,
        max_length=32,
        return_tensors="pt",
    )
    size = model.config.image_size
    batch = {"pixel_values": torch.randn(2, 3, size, size), **encoded}
    torch.manual_seed(0)
    loss_all, _ = task.step(model, batch, 4)  # before drop_worst_after
    torch.manual_seed(0)
    loss_kept, values = task.step(model, batch, 10)  # the step number the engine passes
    assert loss_kept < loss_all  # the worst half of the masked tokens is left out
    assert 0.0 <= values["accuracy"].item() <= 1.0


def test_an_unreadable_training_image_is_replaced_named_and_counted_or_stops_the_run_when_asked(demo_run, tmp_path):
    output, _ = demo_run
    images = tmp_path / "coco"
    shutil.copytree(output / "data" / "coco", images)
    broken = sorted((images / "train2014").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG: it exists, so only reading it fails
    command = [
        sys.executable,
        "tasks/vqa.py",
        *_args(output, "vqa", folder=tmp_path / "run"),
        "--set",
        "model.init=null",
        "--set",
        "train.max_steps=12",
        "--set",
        "train.save_every=12",
        "--set",
        "train.log_every=12",
        "--set",
        "train.micro_batch_size=16",
        "--set",
        f"data.image_root={images}",
        "--set",
        "data.eval=null",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"Cannot read the image {broken}" in result.stderr and "the next example takes its place" in result.stderr
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_images"] == result.stderr.count("the next example takes its place") > 0
    stopped = subprocess.run(
        [
            *command[:-2],
            "--set",
            "data.eval=null",
            "--set",
            "data.skip_unreadable_images=false",
            "--set",
            f"train.output_dir={tmp_path / 'strict'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert stopped.returncode != 0 and f"Cannot read the image {broken}" in stopped.stderr


def test_the_answer_slot_head_starts_from_the_pretrained_mlm_rows_of_its_answers(demo_run):
    from safetensors.torch import load_file

    from beit3.data.vqa import label_to_answer

    output, _ = demo_run
    data = {
        "train": {
            "questions": str(output / "data/vqa/v2_OpenEnded_mscoco_train2014_questions.json"),
            "annotations": str(output / "data/vqa/v2_mscoco_train2014_annotations.json"),
        },
        "answer_min_count": 1,
        "vqa_head": "answer_slot",
        "image_root": str(output / "data/coco"),
    }
    task = TASKS["vqa"](data, {})
    tokenizer = load_tokenizer(str(output / "text-tokenizer"))
    init = str(output / "pretrained")
    model = initial_model(type(task), FinetuneModel(init=init), tokenizer, task.config_overrides())
    assert model.config.vqa_head == "answer_slot" and model.config.mask_token_id == tokenizer.mask_token_id
    task.setup(tokenizer, model.config)
    task.prepare_model(model, init)
    mlm = load_file(str(output / "pretrained" / "model.safetensors"))
    for label, answer in enumerate(label_to_answer(task.answer2label())):
        pieces = tokenizer(answer, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(model.head.weight[label], mlm["mlm_head.weight"][pieces].mean(0))
    before = model.head.weight.clone()
    task.prepare_model(
        model, str(output / "finetune" / "vqa_pretrained" / "final")
    )  # a VQA model: nothing to take over
    torch.testing.assert_close(model.head.weight, before)
    assert task.dataset("train")[0]["input_ids"].tolist().count(tokenizer.mask_token_id) == 1
