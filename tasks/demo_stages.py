"""The demo's stages: the world, the tokenizers, pretraining, the contrastive stage and the fine-tuning of every
registered task from both inits, each by the command a user would run (the scripts under tokenizers/ and tasks/),
each skipped when its outputs exist."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

from demo_processes import ROOT, free_port, run, run_side_by_side
from demo_report import INITS, distinct_predictions, near_the_bar, write_report

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
        "finetune_steps": 3,  # every task of the registry
        "batch": 8,
        # the second-seed path on one task, run even though models of 3 steps answer one constant answer
        "seeds": {"count": 2, "near": math.inf, "tasks": ("vqa",), "constant_too": True},
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
        # A task whose first gain lies within `near` points of the bar is fine-tuned again, both arms, with seeds 1
        # and 2: the spread over seeds says whether its verdict holds (demo_report.gain_over_seeds).
        "seeds": {"count": 3, "near": 10.0},
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
        "seeds": {"count": 3, "near": 10.0},
    },
}


class Demo:
    """The stages, each a method that runs the command a user would and returns its one-line summary; ``main`` runs
    those not done yet, then the report (``demo_report``)."""

    def __init__(self, output: Path, profile: str):
        from beit3.training.tasks import TASKS

        self.output, self.profile, self.settings = output, profile, dict(PROFILES[profile])
        if isinstance(self.settings["finetune_steps"], int):  # the same budget for every registered task
            self.settings["finetune_steps"] = dict.fromkeys(TASKS, self.settings["finetune_steps"])
        self.karpathy = output / "data" / "coco" / "dataset_coco.json"  # the captions, retrieval and probe's truth
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
        from beit3.training.run_log import read_run_log

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
                "--master_port",  # a free one: DeepSpeed's default (29500) may be held by another run on this machine
                str(free_port()),
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
        from beit3.training.run_log import read_run_log

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
        """Fine-tunes ``task`` from the pretrained export and from random weights, side by side (one thread each), with
        seed 0 and the blind control; then, when that gain is near the bar, with the profile's other seeds."""
        self.finetune_arms(task, 0, flags=("--blind",))  # after training, both scored again with the images swapped
        for seed in self.extra_seeds(task):
            self.finetune_arms(task, seed)
        scores = {init: self.scores_over_seeds(task, init) for init in INITS}
        seeds = f" ({len(scores['scratch'])} seeds, means)" if len(scores["scratch"]) > 1 else ""
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        return (
            f"{task} ({self.score(task, 'scratch')[0]}){seeds}: from scratch {mean(scores['scratch']):.2f}, pretrained "
            f"{mean(scores['pretrained']):.2f} (seed 0, images swapped: {self.score(task, 'pretrained', blind=True)[1]:.2f})"
        )

    def finetune_arms(self, task: str, seed: int, flags: tuple[str, ...] = ()) -> None:
        """Both arms of ``task`` with fine-tuning seed ``seed`` (the ones not done yet), side by side."""
        steps = self.settings["finetune_steps"][task]
        batch = self.settings.get("task_batch", {}).get(task, self.settings["batch"])
        run_side_by_side(
            [
                self.training_command(
                    task,
                    self.pretrained_init(task) if init == "pretrained" else None,
                    self.run_folder(task, init, seed),
                    steps,
                    batch,
                    extra=(f"train.seed={seed}",) if seed else (),
                    flags=flags,
                )
                for init in ("pretrained", "scratch")
                if not self.finetuned(task, init, seed)
            ],
            self.log,
        )

    def extra_seeds(self, task: str) -> list[int]:
        """The seeds besides 0 that ``task`` is fine-tuned with: the profile's, when its seed-0 gain is near the bar
        (the seed-0 runs must be done), unless both arms gave one constant answer, which reads nothing to vary."""
        from beit3.training.tasks import TASKS

        spec = self.settings["seeds"]
        if task not in spec.get("tasks", (task,)):
            return []
        gain = self.score(task, "pretrained")[1] - self.score(task, "scratch")[1]
        constant = not spec.get("constant_too") and all(
            distinct_predictions(TASKS[task], self.run_folder(task, init)) == 1 for init in INITS
        )
        return list(range(1, spec["count"])) if near_the_bar(gain, spec["near"]) and not constant else []

    def scores_over_seeds(self, task: str, init: str) -> list[float]:
        """The held-out score of each fine-tuning seed of ``task`` from ``init``, seed 0 first."""
        return [self.score(task, init, seed=seed)[1] for seed in (0, *self.extra_seeds(task))]

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

    def run_folder(self, task: str, init: str, seed: int = 0) -> Path:
        """The output folder of ``task``'s fine-tuning run from ``init`` (scratch or pretrained) with ``seed``."""
        return self.output / "finetune" / (f"{task}_{init}" + (f"_seed{seed}" if seed else ""))

    def finetuned(self, task: str, init: str, seed: int = 0) -> bool:
        run = self.run_folder(task, init, seed)
        return (run / "eval_results.json").is_file() and (seed or (run / "blind_eval_results.json").is_file())

    def scores(self, task: str, init: str, blind: bool = False, seed: int = 0) -> dict:
        """The eval_results.json (or, ``blind``, blind_eval_results.json) of a finished fine-tuning run."""
        folder = self.run_folder(task, init, seed)
        return json.loads((folder / f"{'blind_' if blind else ''}eval_results.json").read_text())

    def score(self, task: str, init: str, blind: bool = False, seed: int = 0) -> tuple[str, float]:
        """(metric name, value) of a finished fine-tuning run."""
        scores = self.scores(task, init, blind, seed)
        return scores["metric"], scores[scores["metric"]]

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
            done = done and all(self.finetuned(task, i, s) for s in self.extra_seeds(task) for i in INITS)
            self.stage(f"finetune {task}", done, lambda task=task: self.finetune(task))
        self.stage("report", False, lambda: write_report(self))
        print(f"demo done in {time.perf_counter() - start:.0f} s: {self.output / 'results.md'}")
        print((self.output / "results.md").read_text())
