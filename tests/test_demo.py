"""`make demo` runs tasks/demo.py (with its stages, report and probe in tasks/demo_*.py): the whole pipeline on
generated data. Here at its smoke size."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

import beit3  # noqa: F401  (registers the tokenizer class with AutoTokenizer)

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("vqa", "nlvr2", "retrieval", "captioning")
REPRODUCIBLE_KERNELS = runpy.run_path(str(ROOT / "tasks" / "demo_processes.py"))["REPRODUCIBLE_KERNELS"]


def test_every_stage_writes_its_outputs(demo_run):
    output, stdout = demo_run
    for path in (
        "data/world.json",
        "data/coco/dataset_coco.json",
        "text-tokenizer/tokenizer_config.json",
        "vqkd/tokenizer/config.json",
        "pretrain/metrics.jsonl",
        "pretrained/model.safetensors",
        "pretrained/config.json",
        "contrastive/final/model.safetensors",
        "contrastive/eval_results.json",
    ):
        assert (output / path).is_file(), path
    for task in (*TASKS, "classification"):
        for init in ("scratch", "pretrained"):
            folder = output / "finetune" / f"{task}_{init}"
            assert (folder / "final" / "model.safetensors").is_file()
            assert json.loads((folder / "eval_results.json").read_text())["task"] == task
    for picture in ("pretraining_loss.png", "visual_tokens.png", "captions.png", "retrieval.png"):
        assert (output / picture).stat().st_size > 10_000, picture
    for stage in (
        "[data]",
        "[text tokenizer]",
        "[visual tokenizer]",
        "[pretrain]",
        "[contrastive]",
        "[finetune vqa]",
        "[report]",
    ):
        assert stage in stdout


def test_results_file_has_the_documented_shape(demo_run):
    output, _ = demo_run
    results = json.loads((output / "results.json").read_text())
    assert set(TASKS) <= set(results["tasks"])
    # the reproducible kernels by default (a value set by the caller wins), recorded beside the figures
    assert results["kernels"] == {name: os.environ.get(name, value) for name, value in REPRODUCIBLE_KERNELS.items()}
    for task, row in results["tasks"].items():
        assert isinstance(row["metric"], str) and row["metric"]
        for init in ("scratch", "pretrained"):
            assert isinstance(row[init], float) and 0.0 <= row[init] <= 1000.0, (task, row)
            score = json.loads((output / "finetune" / f"{task}_{init}" / "eval_results.json").read_text())
            assert row[init] == round(score[score["metric"]], 2)
    for task in TASKS:  # the blind controls: the models scored with the images swapped between examples
        row = results["tasks"][task]
        blind = json.loads((output / "finetune" / f"{task}_pretrained" / "blind_eval_results.json").read_text())
        assert (
            blind["blind"] is True
            and row["blind"] == round(blind[blind["metric"]], 2)
            and isinstance(row["scratch_blind"], float)
        )
        assert set(row["distinct_predictions"]) == {"scratch", "pretrained"}
    # VQA, the task the smoke profile fine-tunes with a second seed: both seeds' scores, the gain over them, the verdict
    vqa = results["tasks"]["vqa"]
    assert len(vqa["over_seeds"]["scratch"]) == len(vqa["over_seeds"]["pretrained"]) == vqa["gain"]["seeds"] == 2
    assert vqa["over_seeds"]["pretrained"][0] == vqa["pretrained"] and isinstance(vqa["gain"]["sd"], float)
    second = json.loads((output / "finetune" / "vqa_pretrained_seed1" / "run_config.json").read_text())
    assert second["train"]["seed"] == 1 and second["model"]["init"] == str(output / "pretrained")
    assert results["tasks"]["nlvr2"]["gain"]["seeds"] == 1 and results["tasks"]["nlvr2"]["gain"]["sd"] is None
    assert results["cpu"]["model"] and results["cpu"]["cores"] >= 1
    for kind, row in results["tasks"]["vqa"]["per_kind"].items():
        assert set(row) == {"scratch", "pretrained", "prior"} and 0 <= row["prior"] <= 100, kind
    assert set(results["tasks"]["captioning"]["exact_shapes"]) == {"scratch", "pretrained"}
    probe = results["pretraining"]["matching_swap_auc"]  # the demo pretrains with image-text matching
    assert set(probe) == {"color", "kind"} and all(0.0 <= auc <= 1.0 for auc in probe.values())
    table = (output / "results.md").read_text()
    for task in TASKS:
        assert f"| {task} |" in table
    assert "vqa: vqaEval.py 2021: " in table and results["tasks"]["captioning"]["evaluation"].startswith(
        "pycocoevalcap"
    )
    assert (
        "2 seeds" in table
        and "vqa per seed, scratch -> pretrained: seed 0 " in table
        and results["cpu"]["model"] in table
    )
    assert (
        "images swapped" in table
        and "| question type | prior |" in table
        and "name exactly the scene's shapes" in table
        and "one word swapped" in table
    )


def test_pretrained_runs_start_from_the_export_and_scratch_runs_do_not(demo_run):
    from safetensors.torch import load_file

    output, _ = demo_run
    pretrained = load_file(output / "pretrained" / "model.safetensors")
    run_configs = {
        init: json.loads((output / "finetune" / f"vqa_{init}" / "run_config.json").read_text())
        for init in ("scratch", "pretrained")
    }
    assert run_configs["scratch"]["model"]["init"] is None
    assert run_configs["pretrained"]["model"]["init"] == str(output / "pretrained")
    # The <mask> embedding is trained in pretraining (masked tokens are its input) but never used in NLVR2, and AdamW
    # leaves a row with no gradient and no weight decay (embeddings have none) exactly where it was. So it is the
    # export's row after fine-tuning from the export, and the random init's row after fine-tuning from scratch.
    mask_id = AutoTokenizer.from_pretrained(output / "text-tokenizer").mask_token_id
    key = "beit3.embeddings.text_embeddings.weight"
    assert pretrained[key].shape[0] == mask_id + 1
    rows = {
        init: load_file(output / "finetune" / f"nlvr2_{init}" / "final" / "model.safetensors")[key][mask_id]
        for init in ("scratch", "pretrained")
    }
    assert torch.equal(rows["pretrained"], pretrained[key][mask_id])
    assert not torch.allclose(rows["scratch"], pretrained[key][mask_id])


def test_retrieval_starts_from_the_contrastive_stage_which_starts_from_the_export(demo_run):
    output, _ = demo_run
    config = lambda folder: json.loads((output / folder / "run_config.json").read_text())
    assert config("contrastive")["model"]["init"] == str(output / "pretrained")
    assert config("contrastive")["data"]["train"] == {"pairs": [str(output / "data" / "pretrain" / "pairs.jsonl")]}
    assert config("finetune/retrieval_pretrained")["model"]["init"] == str(output / "contrastive" / "final")
    assert config("finetune/retrieval_scratch")["model"]["init"] is None
    results = json.loads((output / "results.json").read_text())
    assert results["contrastive_stage"]["tr_r1"] == round(
        json.loads((output / "contrastive" / "eval_results.json").read_text())["tr_r1"], 2
    )


def test_a_rerun_skips_the_finished_stages(demo_run):
    output, _ = demo_run
    result = subprocess.run(
        [sys.executable, "tasks/demo.py", "--output", str(output), "--profile", "smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("data", "text tokenizer", "visual tokenizer", "pretrain", "contrastive", "finetune captioning"):
        assert f"[{stage}] already done; skipped" in result.stdout


def test_a_gain_is_clear_beyond_the_bar_and_twice_its_spread_over_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tasks"))  # demo_report imports its sibling modules
    gain_over_seeds = runpy.run_path(str(ROOT / "tasks" / "demo_report.py"))["gain_over_seeds"]
    assert gain_over_seeds([40.0], [46.0])["verdict"] == "clear gain"  # one seed: the bar alone
    steady = gain_over_seeds([40.0, 41.0, 42.0], [46.0, 47.5, 47.5])
    assert steady == {
        "seeds": 3,
        "scratch_mean": 41.0,
        "pretrained_mean": 47.0,
        "mean": 6.0,
        "sd": 0.5,
        "per_seed": [6.0, 6.5, 5.5],
        "verdict": "clear gain",
    }
    # The same mean gain, but one seed flips it: within noise. Below the bar, or at zero, as before.
    assert gain_over_seeds([40.0, 41.0, 42.0], [50.0, 47.0, 44.0])["verdict"] == "gain within noise"
    assert gain_over_seeds([40.0, 41.0], [43.0, 44.0])["verdict"] == "gain within noise"
    assert gain_over_seeds([50.0, 50.0], [50.0, 50.0])["verdict"] == "no gain"
