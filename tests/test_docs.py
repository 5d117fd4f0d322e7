"""The docs' code cannot rot: every ``python`` and ``bash`` block of README.md and docs/ runs, in order, document by
document, in a folder that holds tiny stand-ins of the files the docs name (official checkpoints of the tiny preset
under the released names, a SentencePiece model, images, task folders). A block that cannot run here says why, on
the line before it: ``<!-- not run: needs 8 GPUs -->``; the test counts those, and refuses a bare marker.

The python blocks of one document share one namespace, as a reader's session would; each bash block runs as one
``bash -euo pipefail`` script with the environment's ``python`` and installed commands first on the PATH. And
docs/configuration.md is what ``python -m beit3.training.config_docs`` writes from the code's sections."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run(?::\s*(?P<why>.*?))?\s*-->\s*$")
RUNNABLE = ("python", "bash")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the reason, when marked


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, their indentation (inside a list item) removed."""
    lines, found, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, language = len(opening[1]), opening[2]
        end = next(j for j in range(i + 1, len(lines)) if FENCE.match(lines[j]) and not FENCE.match(lines[j])[2])
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        code = "\n".join(line[indent:] for line in lines[i + 1 : end])
        found.append(Block(path, i + 1, language, code, None if marker is None else (marker["why"] or "")))
        i = end + 1
    return found


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_block_says_its_language_and_every_unrun_block_says_why():
    counted = {"run": 0, "not run": 0}
    for path in DOCUMENTS:
        for block in blocks(path):
            where = f"{_name(path)}:{block.line}"
            assert block.language, f"{where}: a fenced block without a language (python, bash, text, ...)"
            if block.language not in RUNNABLE:
                assert block.not_run is None, f"{where}: a {block.language} block is never run; drop its marker"
                continue
            assert block.not_run is None or len(block.not_run) > 10, f"{where}: say why the block cannot run"
            counted["run" if block.not_run is None else "not run"] += 1
    print(f"docs blocks: {counted['run']} run, {counted['not run']} marked not run")
    assert counted["run"] > counted["not run"] > 0


# Counts that change with every commit: pytest and this test print them; the guides do not copy them (docs/results/
# holds dated measurements, each with its date, commit, lock and machine).
TYPED_COUNTS = re.compile(r"\b\d+ (?:tests|end-to-end tests|blocks run|blocks are marked|are marked)\b|\(\d+ tests")


def test_the_docs_type_no_count_of_tests_or_blocks():
    for path in DOCUMENTS:
        if path.parent.name == "results":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not TYPED_COUNTS.search(line), f"{_name(path)}:{number}: a count typed by hand: {line.strip()}"


def test_the_configuration_reference_is_what_the_code_declares():
    from beit3.training.config_docs import render

    assert (ROOT / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is out of date: run python -m beit3.training.config_docs"
    )


# -- the stand-ins ----------------------------------------------------------------------------------------------
def _official(model, path: Path) -> None:
    """``model`` written as a released file: ``{"model": {"beit3.*": ..., <head keys>}}``, no config beside it."""
    from beit3.convert import beit3_to_official

    torch.save({"model": beit3_to_official(model.state_dict(), model.config)}, path)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A working folder holding what the docs name, at the tiny preset's sizes: the official checkpoints (backbone,
    VQA and captioning heads, one of custom sizes with its YAML), beit3.spm, images, task folders for predict, a
    released-layout VQ-KD file; the repository's scripts and configs are linked in."""
    from PIL import Image
    from test_visual_tokenizers import released_state, save_released

    from beit3 import Beit3Config, Beit3ImageProcessor, Beit3Model, Beit3Processor, Beit3Tokenizer, train_sentencepiece
    from beit3.convert import main as convert
    from beit3.data.synthetic import write_shapes_world, write_task_world
    from beit3.modeling_heads import (
        Beit3ForCaptioning,
        Beit3ForImageClassification,
        Beit3ForImageTextRetrieval,
        Beit3ForVisualQuestionAnswering,
        Beit3ForVisualReasoning,
    )

    folder = tmp_path_factory.mktemp("docs")
    for name in ("tasks", "tokenizers", "benchmarks"):
        (folder / name).symlink_to(ROOT / name)
    _shortened_configs(folder / "configs")
    torch.manual_seed(0)
    world = write_shapes_world(folder / "shapes", 40, size=64)
    words = "a the man woman dog cat horse riding on mat is what color are there two dogs asleep".split()
    corpus = folder / "spm-corpus.txt"
    corpus.write_text(
        world["texts"].read_text() + "\n" + "\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words)))
    )
    train_sentencepiece(folder / "spm", 60, files=[corpus], quiet=True)
    (folder / "beit3.spm").write_bytes((folder / "spm" / "beit3.spm").read_bytes())
    tokenizer = Beit3Tokenizer.from_spm(folder / "beit3.spm")
    tokenizer.save_pretrained(folder / "beit3-tokenizer")
    images = sorted(world["images"].glob("*.png"))
    for name, source in zip(("cat.jpg", "dog.png", "left.jpg", "right.jpg", "a.jpg", "b.jpg"), images):
        Image.open(source).convert("RGB").save(folder / name)
    # Released file names at the tiny preset's sizes (its 2 heads come from the preset of these sizes) with the
    # released vocabulary of 64010 ids (<mask> at 64001), so that the docs' literal ids fit; the stand-in
    # tokenizer's ids are among them.
    _official(Beit3Model(Beit3Config.from_preset("beit3_tiny_patch16_224")), folder / "beit3_base_patch16_224.pth")
    at_480 = Beit3Config.from_preset("beit3_tiny_patch16_480")
    _official(
        Beit3ForVisualQuestionAnswering(Beit3Config(**{**at_480.to_dict(), "id2label": dict(enumerate("abcd"))})),
        folder / "beit3_base_patch16_480_vqa.pth",
    )
    _official(Beit3ForCaptioning(at_480), folder / "beit3_base_patch16_480_coco_captioning.pth")
    custom = Beit3Config(
        hidden_size=96,
        num_attention_heads=3,
        intermediate_size=128,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
    )
    _official(Beit3Model(custom), folder / "my_beit3.pth")
    (folder / "my_beit3.yaml").write_text(
        "hidden_size: 96\nnum_attention_heads: 3\nintermediate_size: 128\nnum_hidden_layers: 2\nimage_size: 32\n"
        "patch_size: 8\n"
    )
    labels = {0: "cat", 1: "dog", 2: "horse"}
    at_224 = Beit3Config.from_preset("beit3_tiny_patch16_224")
    for name, model in (
        (
            "beit3-base-nlvr2",
            Beit3ForVisualReasoning(Beit3Config(**{**at_224.to_dict(), "id2label": {0: "False", 1: "True"}})),
        ),
        ("beit3-base-coco", Beit3ForImageTextRetrieval(at_224)),
        ("beit3-base-in1k", Beit3ForImageClassification(Beit3Config(**{**at_224.to_dict(), "id2label": labels}))),
    ):
        model.save_pretrained(folder / name)
        Beit3Processor(image_processor=Beit3ImageProcessor(size=224), tokenizer=tokenizer).save_pretrained(
            folder / name
        )
    save_released(
        released_state(decoder_depth=3, image=224), folder / "vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth"
    )
    # The folders the quick start converts, for the documents that start from them.
    for checkpoint, task, output in (
        ("beit3_base_patch16_224.pth", None, "beit3-base"),
        ("beit3_base_patch16_480_vqa.pth", "vqa", "beit3-base-vqa"),
        ("beit3_base_patch16_480_coco_captioning.pth", "captioning", "beit3-base-cap"),
    ):
        convert(
            [
                "--checkpoint",
                str(folder / checkpoint),
                "--output",
                str(folder / output),
                *(["--task", task] if task else []),
            ]
        )
    final = folder / "runs" / "vqa_base" / "final"  # what a fine-tuning run leaves: the model and its processor
    shutil.copytree(folder / "beit3-base-vqa", final)
    Beit3Processor(image_processor=Beit3ImageProcessor(size=480), tokenizer=tokenizer).save_pretrained(final)
    # The official dataset formats, as the demo writes them: coco/ (images, Karpathy json), vqa/, nlvr2/, imagenet/.
    write_task_world(
        folder / "world",
        size=32,
        pretrain_images=8,
        train_images=8,
        val_images=4,
        test_images=4,
        nlvr2_train=4,
        nlvr2_dev=4,
        classification_train=6,
        classification_val=6,
        questions_per_image=2,
    )
    for name in ("coco", "vqa", "nlvr2", "imagenet"):
        (folder / name).symlink_to(folder / "world" / name)
    image = sorted((folder / "coco" / "train2014").iterdir())[0]
    (folder / "vqa.train.jsonl").write_text(
        json.dumps(
            {"image_path": f"train2014/{image.name}", "text_segment": [7, 9], "labels": [0], "scores": [1.0], "qid": 1}
        )
        + "\n"
    )
    (folder / "data").mkdir()
    # A corpus with room for the docs' 32000-piece vocabulary: the words above and 60,000 made-up ones.
    rng = random.Random(0)
    made_up = sorted({"".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9))) for _ in range(60000)})
    lines = corpus.read_text().splitlines() + [" ".join(rng.choices(made_up, k=8)) for _ in range(20000)] + made_up
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(str(folder / "data" / "captions"))
    (folder / "photos").mkdir()
    for source in images[:4]:
        shutil.copy(source, folder / "photos" / source.name)
    (folder / "data" / "pairs.jsonl").write_text(
        "".join(
            json.dumps({"image": str(p), "text": t}) + "\n"
            for p, t in zip(images, world["texts"].read_text().splitlines())
        )
    )
    return folder


# The tiny runs the docs start, shortened: every command runs whole (start, steps, checkpoints, logs, the
# tokenizer or model it writes), in a tenth of the steps the docs' readers train for. (The full tiny runs take
# about 3 minutes of the suite's time here; tests/test_pretrain.py and test_train_visual_tokenizer.py train and
# resume the same configs.)
SHORTENED = {
    "pretrain/tiny.yaml": {"max_steps": 10, "save_every": 5, "warmup_steps": 2, "log_every": 2},
    "tokenizers/vqkd_tiny.yaml": {"max_steps": 30, "save_every": 10, "warmup_steps": 2, "log_every": 5},
    "tokenizers/dvae_tiny.yaml": {"max_steps": 30, "save_every": 10, "warmup_steps": 2, "log_every": 5},
}


def _shortened_configs(folder: Path) -> None:
    """The repository's configs, with the train sections of ``SHORTENED`` changed."""
    import yaml

    shutil.copytree(ROOT / "configs", folder)
    for name, train in SHORTENED.items():
        config = yaml.safe_load((folder / name).read_text())
        assert set(train) <= set(config["train"]), f"configs/{name} has no {sorted(set(train) - set(config['train']))}"
        config["train"].update(train)
        (folder / name).write_text(yaml.safe_dump(config, sort_keys=False))


def _environment(folder: Path) -> dict:
    python_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{python_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "HF_DATASETS_CACHE": str(folder / ".datasets-cache"),
    }


def _runnable(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.language in RUNNABLE and b.not_run is None]


@pytest.mark.e2e
@pytest.mark.parametrize("path", [p for p in DOCUMENTS if _runnable(p)], ids=_name)
def test_the_blocks_of_each_document_run(path, sandbox, monkeypatch):
    runnable = _runnable(path)
    monkeypatch.chdir(sandbox)
    namespace: dict = {"__name__": "__docs__"}
    for block in runnable:
        where = f"{_name(path)}:{block.line}"
        if block.language == "python":
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except Exception as error:  # the block's own error, named by its place in the docs
                raise AssertionError(f"{where} failed: {type(error).__name__}: {error}") from error
        else:
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block.code],
                cwd=sandbox,
                env=_environment(sandbox),
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert result.returncode == 0, f"{where} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
