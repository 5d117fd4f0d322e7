"""The embedded default: BEiT-3 end to end on a generated world of shapes, no downloads.

    make demo                   # 10 to 24 minutes on a 2-core CPU, as fast as the machine is
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
Every stage runs the same command a user would (the scripts under tokenizers/ and tasks/). The stages are in
demo_stages.py, the report in demo_report.py (with demo_probe.py, what it measures beyond the tasks' scores), the
kernels, threads and processes in demo_processes.py; the tasks, their metrics and files come from the registry,
beit3.training.tasks.

A run repeats to the digit on the same machine with requirements/lock.txt: the demo limits PyTorch's, oneDNN's and
MKL's CPU kernels to AVX2 (REPRODUCIBLE_KERNELS; --native-kernels lets them use what the CPU has) and fixes every
stage's torch threads (DEMO_THREADS), whatever the machine's cores, since a wider instruction set or another thread
count sums in another order and the rounding carries through 1500 steps. Another CPU vendor's MKL and oneDNN still
take other code paths, so the figures move by a few points across CPU models: the report names the CPU, and a gain
near the bar is measured over three fine-tuning seeds before it is called clear.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from demo_processes import DEMO_THREADS, REPRODUCIBLE_KERNELS
from demo_stages import PROFILES


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
    from demo_stages import Demo  # (its stages import torch after the variables are set: torch reads them once)

    Demo(Path(args.output).resolve(), args.profile).main()


if __name__ == "__main__":
    main()
