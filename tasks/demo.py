"""The embedded default: BEiT-3 end to end on a generated world of shapes, no downloads.

    make demo                   # about 15 minutes on a 2-core CPU
    make demo FULL=1            # longer pretraining and fine-tuning: larger gains
    python tasks/demo.py [--output runs/demo] [--profile smoke|default|full] [--native-kernels]

Stages (each skips when its outputs exist, so a rerun is fast; delete a stage's folder to redo it):
  1. data        a seeded world of 64 px images with captions, VQA questions, NLVR2 statements and class
                 labels, in the datasets' standard formats (beit3.data.synthetic.write_task_world)
  2. tokenizers  a SentencePiece text tokenizer and a VQ-KD visual tokenizer, trained on the world
  3. pretrain    masked data modeling on images, captions and pairs, plus image-text matching on the pairs:
                 a tiny BEiT-3 in the paper layout, through the deepspeed launcher (2 CPU processes, ZeRO-2),
                 exported with beit3.export; then the image-text contrastive stage on the same pairs that
                 BEiT-3's retrieval models start from
  4. finetune    VQA, NLVR2, retrieval, captioning and classification, from the pretrained model and from
                 random weights with the same budget, each scored on held-out data, and again with the
                 images swapped between examples (the blind control)
  5. report      results.md, results.json and PNGs in the output folder: the table, the blind controls, VQA per
                 question type against each type's prior, the captions that name exactly the scene's shapes,
                 and a warning for any model whose predictions are constant
Every stage runs the same command a user would (the scripts under tokenizers/ and tasks/).

The figures are the same to the digit on any x86-64 machine with AVX2, given requirements/lock.txt: the demo limits
PyTorch's, oneDNN's and MKL's CPU kernels to AVX2 (REPRODUCIBLE_KERNELS; --native-kernels lets them use what the CPU
has) and fixes every stage's torch threads (DEMO_THREADS), whatever the machine's cores. A wider instruction set or
another thread count sums in another order, and the rounding carries through 1500 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINETUNE_TASKS = ("vqa", "nlvr2", "retrieval", "captioning", "classification")
MULTIMODAL_TASKS = ("vqa", "nlvr2", "retrieval", "captioning")
# A gain counts as clear from 5 points on the 0-100 scale of every metric here: about 1.5 standard errors of
# a difference between two accuracies near 50% on the 250 held-out examples of each task.
CLEAR_MARGIN = 5.0
METRIC_NAMES = {
    "vqa": "VQA accuracy (%)",
    "nlvr2": "accuracy (%)",
    "retrieval": "image->text R@1 (%)",
    "captioning": "CIDEr",
    "classification": "top-1 (%)",
}

# The widest instruction set every x86-64 CPU of the last decade has; a variable the user set wins. Measured on an
# AVX-512 machine (2026-12-03, requirements/lock.txt): the native kernels moved the pretrained VQA score from 50.00 to
# 47.47 (scratch 44.13 both ways), retrieval from 52.00 to 47.60, CIDEr from 251.42 to 246.96.
REPRODUCIBLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# Thread counts move the figures too (they split every sum differently), so the demo fixes them rather than taking
# the machine's cores or the engine's rule: the torch threads of the 2-core machine the figures come from, shared by
# the processes a stage runs at once (a lone command 2, two side by side or two ranks 1 each). Measured: the visual
# tokenizer trained with 1 thread instead of 2 moved the pretrained VQA score from 50.00 to 48.93.
DEMO_THREADS = 2

# Sizes and budgets. "default" fits the 15 minutes of `make demo` on a 2-core CPU; "smoke" is the test suite's.
PROFILES = {
    "smoke": {
        "world": dict(
            pretrain_images=96,
            train_images=48,
            val_images=16,
            test_images=16,
            nlvr2_train=32,
            nlvr2_dev=16,
            classification_train=36,
            classification_val=18,
        ),
        "vqkd_steps": 4,
        "pretrain_steps": 4,
        "contrastive_steps": 3,
        "finetune_steps": {t: 3 for t in FINETUNE_TASKS},
        "batch": 8,
    },
    # VQA takes batches of 16: twice the updates in the same time, and both inits sit on the answer prior for the
    # first ~100 updates (measured: 300 x 16 gave scratch 18.4 and pretrained 34.9; 150 x 32 gave 10.7 and 18.9).
    "default": {
        "world": {},
        "vqkd_steps": 120,
        "pretrain_steps": 1500,
        "contrastive_steps": 300,
        "finetune_steps": {"vqa": 300, "nlvr2": 60, "retrieval": 150, "captioning": 300},
        "batch": 32,
        "task_batch": {"vqa": 16},
    },
    "full": {
        "world": dict(
            pretrain_images=20000, train_images=3000, val_images=500, test_images=500, nlvr2_train=2000, nlvr2_dev=500
        ),
        "vqkd_steps": 400,
        "pretrain_steps": 2000,
        "contrastive_steps": 600,
        "finetune_steps": {"vqa": 600, "nlvr2": 300, "retrieval": 300, "captioning": 300, "classification": 150},
        "batch": 32,
        "task_batch": {"vqa": 16},
    },
}


def run(command: list[str], log: Path, processes: int = 1) -> None:
    """Runs one stage's command (of ``processes`` processes: the deepspeed launcher's ranks); its progress bars show
    on the terminal, and everything goes to ``log`` too."""
    run_side_by_side([command], log, processes)


def run_side_by_side(commands: list[list[str]], log: Path, processes: int = 1) -> None:
    """Runs ``commands`` at the same time (each of ``processes`` processes), sharing ``DEMO_THREADS`` out as torch
    threads. The first one's progress shows on the terminal; every line of each goes to ``log``, prefixed by the
    command's number when there are several.

    On a small CPU two 1-thread runs get more done than one 2-thread run after the other (small matmuls do
    not split well over threads), and the two inits of a task then train under the same conditions.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = str(max(1, DEMO_THREADS // (len(commands) * processes)))
    lock = threading.Lock()
    with open(log, "a") as handle:
        processes = []
        for command in commands:
            handle.write("$ " + " ".join(command) + "\n")
            processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
                )
            )
        handle.flush()

        def forward(number: int, process: subprocess.Popen) -> None:
            prefix = f"[{number}] " if len(commands) > 1 else ""
            for line in process.stdout:
                with lock:
                    handle.write(prefix + line)
                    # Launcher chatter stays in the log
                    if number == 0 and (not line.startswith(("[", "W1", "I1")) or "%|" in line):
                        sys.stderr.write(line)

        readers = [threading.Thread(target=forward, args=(n, p)) for n, p in enumerate(processes)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
    for command, process in zip(commands, processes):
        if process.wait() != 0:
            raise SystemExit(
                f"error: this stage failed (exit {process.returncode}): {' '.join(command)}\nIts output is in {log}."
            )


class Demo:
    def __init__(self, output: Path, profile: str):
        self.output, self.profile, self.settings = output, profile, PROFILES[profile]
        self.python = sys.executable
        self.log = output / "demo.log"
        self.timings: dict[str, float] = {}

    def stage(self, name: str, done: bool, work) -> None:
        start = time.perf_counter()
        if done:
            print(f"[{name}] already done; skipped", flush=True)
            return
        print(f"[{name}] ...", flush=True)
        summary = work()
        self.timings[name] = time.perf_counter() - start
        print(f"[{name}] {summary} ({self.timings[name]:.0f} s)", flush=True)

    # -- 1. data ---------------------------------------------------------------------------------
    def data(self) -> str:
        from beit3.data.synthetic import write_task_world

        paths = write_task_world(self.output / "data", seed=0, **self.settings["world"])
        world = json.loads((self.output / "data" / "world.json").read_text())
        corpus = self.output / "data" / "corpus.txt"  # every text of the world: the text tokenizer's training data
        texts = paths["pretrain_texts"].read_text().splitlines()
        for key in ("vqa_train_questions", "vqa_val_questions"):
            texts += [q["question"] for q in json.loads(paths[key].read_text())["questions"]]
        for key in ("nlvr2_train", "nlvr2_dev"):
            texts += [json.loads(line)["sentence"] for line in paths[key].read_text().splitlines() if line.strip()]
        for image in json.loads(paths["karpathy"].read_text())["images"]:
            texts += [s["raw"] for s in image["sentences"]]
        corpus.write_text("\n".join(texts) + "\n")
        counts = world.get("counts", world)
        return f"wrote the shapes world: {', '.join(f'{k} {v}' for k, v in counts.items() if isinstance(v, int))}"

    # -- 2. tokenizers ---------------------------------------------------------------------------
    def text_tokenizer(self) -> str:
        from beit3 import train_sentencepiece

        corpus = (self.output / "data" / "corpus.txt").read_text()
        words = sorted(set(corpus.split()))
        # sentencepiece seeds its pieces with substrings that are followed by more than one character; in
        # this small world every word is always followed by a space, so without help no word becomes a piece
        # ("purple" was 5 tokens, half the captions overflowed 32 positions). Each word once on a line of its
        # own gives it an end, and the texts become one token per word (10 ids at the median with <s> and
        # </s>, 25 at most).
        training_text = self.output / "text-tokenizer-corpus.txt"
        training_text.write_text(corpus + "\n".join(words) + "\n")
        # Room for a piece per word besides the characters; sentencepiece says how many pieces this small
        # text can give at most, and that is what it gets then.
        train = lambda size: train_sentencepiece(
            self.output / "text-tokenizer", size, files=[training_text], model_max_length=32, quiet=True
        )
        try:
            tokenizer = train(len(words) + 40)
        except ValueError as error:
            most = re.search(r"<= (\d+)", str(error))
            if most is None:
                raise
            tokenizer = train(int(most.group(1)))
        lengths = sorted(map(len, tokenizer(corpus.splitlines())["input_ids"]))
        return (
            f"SentencePiece tokenizer with {len(tokenizer)} ids for {len(words)} words; "
            f"texts are {lengths[len(lengths) // 2]} tokens (median), {lengths[-1]} at most"
        )

    def visual_tokenizer(self) -> str:
        batch = 32 if self.profile != "smoke" else 8
        import yaml

        # One code per patch of the model: the tokenizer sees the images at the pretraining config's size.
        image_size = yaml.safe_load((ROOT / "configs/pretrain/demo.yaml").read_text())["model"]["overrides"][
            "image_size"
        ]
        run(
            [
                self.python,
                "tokenizers/train_visual_tokenizer.py",
                "--kind",
                "vqkd",
                "--config",
                "configs/tokenizers/vqkd_tiny.yaml",
                "--set",
                f"overrides.image_size={image_size}",
                "--set",
                f"data.images={self.output / 'data/pretrain/images'}",
                "--set",
                f"data.batch_size={batch}",
                "--set",
                f"train.output_dir={self.output / 'vqkd'}",
                "--set",
                f"train.max_steps={self.settings['vqkd_steps']}",
                "--set",
                f"train.save_every={self.settings['vqkd_steps']}",
            ],
            self.log,
        )
        from beit3.training.engine import read_run_log

        last = read_run_log(self.output / "vqkd" / "metrics.jsonl")[-1]
        return f"VQ-KD: codebook usage {last['codebook_usage']:.2f}, perplexity {last['perplexity']:.1f}"

    # -- 3. pretraining ----------------------------------------------------------------------------
    def pretrain(self) -> str:
        steps = self.settings["pretrain_steps"]
        overrides = [
            f"text_tokenizer={self.output / 'text-tokenizer'}",
            f"visual_tokenizer={self.output / 'vqkd/tokenizer'}",
            f"data.sources.images={self.output / 'data/pretrain/images'}",
            f"data.sources.texts=[{self.output / 'data/pretrain/captions.txt'}]",
            f"data.sources.pairs=[{self.output / 'data/pretrain/pairs.jsonl'}]",
            f"train.output_dir={self.output / 'pretrain'}",
            f"train.max_steps={steps}",
            f"train.save_every={max(1, steps // 3)}",
        ]
        if self.profile == "smoke":
            overrides += ["data.batch_size={image: 4, text: 4, pair: 4}", "train.warmup_steps=1", "train.log_every=2"]
        deepspeed = shutil.which("deepspeed", path=str(Path(self.python).parent)) or "deepspeed"
        run(
            [
                deepspeed,
                "--num_gpus",
                "2",
                "tasks/pretrain.py",
                "--config",
                "configs/pretrain/demo.yaml",
                *[part for o in overrides for part in ("--set", o)],
            ],
            self.log,
            processes=2,
        )
        run(
            [
                self.python,
                "-m",
                "beit3.export",
                "--checkpoint-dir",
                str(self.output / "pretrain"),
                "--output",
                str(self.output / "pretrained"),
            ],
            self.log,
        )
        from beit3.training.engine import read_run_log

        last = read_run_log(self.output / "pretrain" / "metrics.jsonl")[-1]
        return (
            "pretrained {step} steps: masked accuracy image {image_accuracy:.2f}, text {text_accuracy:.2f}, pair {pair_accuracy:.2f}; "
            "{samples_per_s:.0f} samples/s"
        ).format(**last)

    def contrastive(self) -> str:
        """The image-text contrastive (ITC) stage on the pretraining pairs, from the pretrained export: BEiT-3's
        retrieval models are fine-tuned from such a checkpoint (the paper's intermediate fine-tuning; the recipes'
        "itc" init), so the pretrained arm of the retrieval task starts here. It sees no task data."""
        steps = self.settings["contrastive_steps"]
        run(
            self.training_command(
                "retrieval",
                self.output / "pretrained",
                self.output / "contrastive",
                steps,
                self.settings["batch"],
                (f"data.train={{pairs: [{self.output / 'data/pretrain/pairs.jsonl'}]}}",),
            ),
            self.log,
        )
        recall = json.loads((self.output / "contrastive" / "eval_results.json").read_text())["tr_r1"]
        return f"image-text contrastive stage on the pretraining pairs, {steps} steps: held-out image->text R@1 {recall:.2f} before fine-tuning"

    def pretrained_init(self, task: str) -> Path:
        return self.output / "contrastive" / "final" if task == "retrieval" else self.output / "pretrained"

    # -- 4. fine-tuning ----------------------------------------------------------------------------
    def finetune(self, task: str) -> str:
        """Fine-tunes ``task`` from the pretrained export and from random weights, side by side (one thread each)."""
        steps = self.settings["finetune_steps"][task]
        batch = self.settings.get("task_batch", {}).get(task, self.settings["batch"])
        run_side_by_side(
            [
                self.training_command(
                    task,
                    self.pretrained_init(task) if init == "pretrained" else None,
                    self.output / "finetune" / f"{task}_{init}",
                    steps,
                    batch,
                    flags=("--blind",),  # after training, both models scored again with the images swapped
                )
                for init in ("pretrained", "scratch")
                if not self.finetuned(task, init)
            ],
            self.log,
        )
        scores = {init: self.score(task, init) for init in ("scratch", "pretrained")}
        return (
            f"{task} ({scores['pretrained'][0]}): from scratch {scores['scratch'][1]:.2f}, pretrained {scores['pretrained'][1]:.2f} "
            f"(images swapped: {self.score(task, 'pretrained', blind=True)[1]:.2f})"
        )

    def training_command(
        self,
        task: str,
        init: Path | None,
        output_dir: Path,
        steps: int,
        batch: int,
        extra: tuple[str, ...] = (),
        flags: tuple[str, ...] = (),
    ) -> list[str]:
        """``tasks/<task>.py`` on its demo config from ``init`` (None: random weights) for ``steps`` of ``batch``, plus
        ``extra`` --sets and the command-line ``flags``."""
        sets = [
            f"model.init={init or 'null'}",
            f"tokenizer={self.output / 'text-tokenizer'}",
            f"train.output_dir={output_dir}",
            f"train.max_steps={steps}",
            f"train.save_every={steps}",
            f"train.warmup_steps={max(1, steps // 10)}",
            f"train.micro_batch_size={batch}",
            *extra,
        ]
        return [
            self.python,
            f"tasks/{task}.py",
            "--config",
            str(self.task_config(task)),
            *flags,
            *[part for s in sets for part in ("--set", s)],
        ]

    def trained_model_command(self, task: str, run: Path, mode: str) -> list[str]:
        """``tasks/<task>.py --mode <mode>`` on the fine-tuned model of ``run`` (its ``final`` folder), writing into ``run``."""
        return [
            self.python,
            f"tasks/{task}.py",
            "--config",
            str(self.task_config(task)),
            "--mode",
            mode,
            "--set",
            f"train.output_dir={run}",
            "--set",
            f"tokenizer={self.output / 'text-tokenizer'}",
        ]

    def task_config(self, task: str) -> Path:
        """The task's demo config, pointed at this run's world (which may live elsewhere than runs/demo)."""
        local = self.output / "configs" / f"{task}_demo.yaml"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(
            (ROOT / "configs" / "tasks" / f"{task}_demo.yaml")
            .read_text()
            .replace("runs/demo/data", str(self.output / "data"))
        )
        return local

    def finetuned(self, task: str, init: str) -> bool:
        run = self.output / "finetune" / f"{task}_{init}"
        return (run / "eval_results.json").is_file() and (run / "blind_eval_results.json").is_file()

    def scores(self, task: str, init: str, blind: bool = False) -> dict:
        """The eval_results.json (or, ``blind``, blind_eval_results.json) of a finished fine-tuning run."""
        return json.loads(
            (self.output / "finetune" / f"{task}_{init}" / f"{'blind_' if blind else ''}eval_results.json").read_text()
        )

    def score(self, task: str, init: str, blind: bool = False) -> tuple[str, float]:
        """(metric name, value) of a finished fine-tuning run."""
        scores = self.scores(task, init, blind)
        return scores["metric"], scores[scores["metric"]]

    def distinct_predictions(self, task: str, init: str) -> int | None:
        """How many different predictions a run made on the held-out data (1: a constant model); None where the
        task's predictions are rankings (retrieval, classification)."""
        run = self.output / "finetune" / f"{task}_{init}"
        if task == "vqa":
            return len({p["answer"] for p in json.loads((run / "vqa_eval_predictions.json").read_text())})
        if task == "nlvr2":
            return len(
                {
                    line.rsplit(",", 1)[-1]
                    for line in (run / "nlvr2_eval_predictions.csv").read_text().splitlines()
                    if line
                }
            )
        if task == "captioning":
            return len({p["caption"] for p in json.loads((run / "captions_eval.json").read_text())})
        return None

    def exact_shapes(self, init: str) -> float:
        """The share (%) of held-out generated captions that name exactly the scene's shapes, each with its color and kind."""
        from beit3.data.synthetic import shapes_named

        truth = {
            image["cocoid"]: shapes_named(image["sentences"][0]["raw"])
            for image in json.loads((self.output / "data" / "coco" / "dataset_coco.json").read_text())["images"]
        }
        captions = json.loads((self.output / "finetune" / f"captioning_{init}" / "captions_eval.json").read_text())
        return 100.0 * sum(shapes_named(c["caption"]) == truth[c["image_id"]] for c in captions) / len(captions)

    def matching_probe(self) -> dict[str, float] | None:
        """How well the export's image-text matching head tells a held-out caption from the same caption with one
        color (or kind) word swapped: the AUC (0.5: chance) of its match probability, per swapped word kind. None when
        the export has no matching head. Statements such as NLVR2's need this attribute check."""
        import random

        import torch
        from transformers import AutoTokenizer

        from beit3 import Beit3ForMaskedDataModeling, Beit3ImageProcessor
        from beit3.data.common import load_rgb
        from beit3.data.synthetic import COLORS, KINDS

        export = self.output / "pretrained"
        model = Beit3ForMaskedDataModeling.from_pretrained(export).eval()
        if not hasattr(model, "itm_head"):
            return None
        tokenizer = AutoTokenizer.from_pretrained(export)
        size = model.config.image_size
        processor = Beit3ImageProcessor(size={"height": size, "width": size})
        root = self.output / "data" / "coco"
        images = [i for i in json.loads((root / "dataset_coco.json").read_text())["images"] if i["split"] == "val"]
        rng, scores = random.Random(0), {"color": ([], []), "kind": ([], [])}
        for image in images:
            words = image["sentences"][0]["raw"].split()
            texts = [" ".join(words)]
            for vocabulary in (COLORS, KINDS):
                at = rng.choice([i for i, w in enumerate(words) if w in vocabulary])
                swapped = list(words)
                swapped[at] = rng.choice([w for w in vocabulary if w != words[at]])
                texts.append(" ".join(swapped))
            pixels = processor(images=load_rgb(root / image["filepath"] / image["filename"]), return_tensors="pt")
            encoded = tokenizer(texts, padding=True, return_tensors="pt")
            with torch.no_grad():  # the one image against its caption and the two swapped ones
                out = model(
                    pixel_values=pixels["pixel_values"].expand(3, -1, -1, -1),
                    **encoded,
                    itm_labels=torch.ones(3, dtype=torch.long),
                )
            match, color, kind = out.itm_logits.softmax(-1)[:, 1].tolist()
            for name, value in (("color", color), ("kind", kind)):
                scores[name][0].append(match)
                scores[name][1].append(value)

        def auc(positives: list[float], negatives: list[float]) -> float:
            wins = sum((a > b) + 0.5 * (a == b) for a in positives for b in negatives)
            return wins / (len(positives) * len(negatives))

        return {name: round(auc(*pair), 3) for name, pair in scores.items()}

    # -- 5. report -----------------------------------------------------------------------------------
    def results(self) -> dict:
        tasks = {}
        for task in self.settings["finetune_steps"]:
            metric = METRIC_NAMES.get(task, self.score(task, "scratch")[0])
            tasks[task] = {
                "metric": metric,
                **{init: round(self.score(task, init)[1], 2) for init in ("scratch", "pretrained")},
                "blind": round(self.score(task, "pretrained", blind=True)[1], 2),
                "scratch_blind": round(self.score(task, "scratch", blind=True)[1], 2),
                "distinct_predictions": {
                    init: self.distinct_predictions(task, init) for init in ("scratch", "pretrained")
                },
            }
        if "vqa" in tasks:
            kinds = {init: self.scores("vqa", init).get("per_question_type", {}) for init in ("scratch", "pretrained")}
            tasks["vqa"]["per_kind"] = {
                kind: {
                    "scratch": round(kinds["scratch"][kind]["accuracy"], 2),
                    "pretrained": round(row["accuracy"], 2),
                    "prior": None if row["prior"] is None else round(row["prior"], 2),
                }
                for kind, row in kinds["pretrained"].items()
            }
        if "captioning" in tasks:
            tasks["captioning"]["exact_shapes"] = {
                init: round(self.exact_shapes(init), 2) for init in ("scratch", "pretrained")
            }
        contrastive = json.loads((self.output / "contrastive" / "eval_results.json").read_text())
        return {
            "tasks": tasks,
            "pretraining": {"matching_swap_auc": self.matching_probe()},
            "profile": self.profile,
            "kernels": {name: os.environ.get(name, "native") for name in REPRODUCIBLE_KERNELS},
            "seconds": {k: round(v, 1) for k, v in self.timings.items()},
            "contrastive_stage": {"steps": self.settings["contrastive_steps"], "tr_r1": round(contrastive["tr_r1"], 2)},
        }

    def report(self) -> str:
        from beit3.metrics import write_json_atomic

        results = self.results()
        write_json_atomic(self.output / "results.json", results)
        lines = [
            "# BEiT-3 demo: fine-tuning from the pretrained model vs from random weights",
            "",
            f"Profile `{self.profile}`, CPU kernels {', '.join(f'{k}={v}' for k, v in results['kernels'].items())}; "
            "the same fine-tuning budget for both; scores on held-out data (higher is better). "
            "Images swapped: the same model scored with every example's image(s) swapped for another example's, the "
            "control that tells reading the image from answering from the text.",
            "",
            "| task | metric | from scratch | pretrained | gain | pretrained, images swapped | scratch, images swapped |",
            "|---|---|---|---|---|---|---|",
        ]
        for task, row in results["tasks"].items():
            gain = row["pretrained"] - row["scratch"]
            verdict = "clear gain" if gain >= CLEAR_MARGIN else "gain within noise" if gain > 0 else "no gain"
            lines.append(
                f"| {task} | {row['metric']} | {row['scratch']:.2f} | {row['pretrained']:.2f} | {gain:+.2f} ({verdict}) "
                f"| {row['blind']:.2f} | {row['scratch_blind']:.2f} |"
            )
        warnings = [
            f"**Warning: the {init} {task} model gives the same prediction for every held-out example**: it reads neither "
            "the image nor the text."
            for task, row in results["tasks"].items()
            for init, count in row["distinct_predictions"].items()
            if count == 1
        ]
        if warnings:
            lines += [""] + warnings
        if "vqa" in results["tasks"]:
            lines += [
                "",
                "VQA accuracy per question type; prior: always the type's most frequent training answer.",
                "",
                "| question type | prior | from scratch | pretrained |",
                "|---|---|---|---|",
            ]
            for kind, row in results["tasks"]["vqa"]["per_kind"].items():
                prior = "-" if row["prior"] is None else f"{row['prior']:.2f}"
                lines.append(f"| {kind} | {prior} | {row['scratch']:.2f} | {row['pretrained']:.2f} |")
        if "captioning" in results["tasks"]:
            exact = results["tasks"]["captioning"]["exact_shapes"]
            lines += [
                "",
                f"Generated captions that name exactly the scene's shapes (each with its color and kind): "
                f"{exact['scratch']:.1f}% from scratch, {exact['pretrained']:.1f}% pretrained.",
            ]
        probe = results["pretraining"]["matching_swap_auc"]
        if probe:
            lines += [
                "",
                "The export's image-text matching head, a held-out caption against the same caption with one word "
                f"swapped (AUC; 0.5 is chance): color {probe['color']:.3f}, kind {probe['kind']:.3f}.",
            ]
        wins = sum(
            results["tasks"][t]["pretrained"] - results["tasks"][t]["scratch"] >= CLEAR_MARGIN for t in MULTIMODAL_TASKS
        )
        summary = f"pretrained beats scratch by {CLEAR_MARGIN:g} points or more on {wins} of the {len(MULTIMODAL_TASKS)} multimodal tasks"
        lines += [
            "",
            summary[0].upper() + summary[1:] + ".",
            "",
            f"The pretrained arm of retrieval starts from the image-text contrastive stage on the pretraining pairs "
            f"({results['contrastive_stage']['steps']} steps; image->text R@1 {results['contrastive_stage']['tr_r1']:.2f} before "
            "fine-tuning), as BEiT-3's retrieval models do; the other tasks start from the masked data modeling export.",
            "",
            "Pictures: `pretraining_loss.png`, `visual_tokens.png`, `captions.png`, `retrieval.png`.",
        ]
        (self.output / "results.md").write_text("\n".join(lines) + "\n")
        self.pictures()
        return f"{summary}; see {self.output / 'results.md'}"

    def pictures(self) -> None:
        import torch

        from beit3.data.common import load_rgb
        from beit3.visualization import save_captioned_images

        shutil.copy(self.output / "pretrain" / "loss_curves.png", self.output / "pretraining_loss.png")
        shutil.copy(self.output / "vqkd" / "code_maps.png", self.output / "visual_tokens.png")
        to_tensor = lambda path: torch.from_numpy(
            __import__("numpy").asarray(load_rgb(path), dtype="float32") / 255
        ).permute(2, 0, 1)
        pictures = (("captioning", "captions.png"), ("retrieval", "retrieval.png"))
        folders = {task: self.output / "finetune" / f"{task}_pretrained" for task, _ in pictures}
        run_side_by_side([self.trained_model_command(task, folders[task], "predict") for task, _ in pictures], self.log)
        references = {}
        for image in json.loads((self.output / "data" / "coco" / "dataset_coco.json").read_text())["images"]:
            references[image["cocoid"]] = (
                self.output / "data" / "coco" / image["filepath"] / image["filename"],
                image["sentences"][0]["raw"],
            )
        for task, picture in pictures:
            folder = folders[task]
            if task == "captioning":
                items = json.loads((folder / "captions.json").read_text())[:12]
                images = [references[i["image_id"]][0] for i in items]
                texts = [f"generated: {i['caption']}\ntruth: {references[i['image_id']][1]}" for i in items]
                title = "Captions generated by the fine-tuned model (held-out images)"
            else:
                items = json.loads((folder / "retrieval_predictions.json").read_text())[:12]
                images = [i["image"] for i in items]
                texts = [f"best caption: {i['captions'][0]}" for i in items]
                title = "Image -> text retrieval over held-out captions"
            save_captioned_images(
                torch.stack([to_tensor(p) for p in images]), texts, self.output / picture, title=title
            )

    # -- all -------------------------------------------------------------------------------------------
    def main(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self.stage(
            "data",
            (self.output / "data" / "world.json").is_file() and (self.output / "data" / "corpus.txt").is_file(),
            self.data,
        )
        self.stage(
            "text tokenizer", (self.output / "text-tokenizer" / "tokenizer_config.json").is_file(), self.text_tokenizer
        )
        self.stage(
            "visual tokenizer", (self.output / "vqkd" / "tokenizer" / "config.json").is_file(), self.visual_tokenizer
        )
        self.stage("pretrain", (self.output / "pretrained" / "model.safetensors").is_file(), self.pretrain)
        self.stage("contrastive", (self.output / "contrastive" / "eval_results.json").is_file(), self.contrastive)
        for task in self.settings[
            "finetune_steps"
        ]:  # the default profile leaves classification out to stay within 15 minutes
            done = self.finetuned(task, "scratch") and self.finetuned(task, "pretrained")
            self.stage(f"finetune {task}", done, lambda task=task: self.finetune(task))
        self.stage("report", False, self.report)
        print(f"demo done in {time.perf_counter() - start:.0f} s: {self.output / 'results.md'}")
        print((self.output / "results.md").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="where everything is written (default runs/demo)")
    parser.add_argument("--profile", choices=tuple(PROFILES), default=os.environ.get("DEMO_PROFILE", "default"))
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help="let PyTorch, oneDNN and MKL use the CPU's widest instruction set (faster on some machines; other figures)",
    )
    args = parser.parse_args(argv)
    if not args.native_kernels:  # before this process or its stages start torch, which reads them once
        for name, value in REPRODUCIBLE_KERNELS.items():
            os.environ.setdefault(name, value)
    os.environ["OMP_NUM_THREADS"] = str(DEMO_THREADS)  # this process's own model work (the report's probe)
    Demo(Path(args.output).resolve(), args.profile).main()


if __name__ == "__main__":
    main()
