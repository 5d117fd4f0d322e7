"""The package's programs as installed commands: ``beit3 <command> [options]``, from any directory.

    beit3 pretrain --config configs/pretrain/tiny.yaml             # = python tasks/pretrain.py ...
    beit3 finetune vqa --config configs/tasks/vqa_base.yaml        # = python tasks/vqa.py ... (vqa, nlvr2, retrieval, captioning, classification)
    beit3 train-tokenizer --kind vqkd --config configs/tokenizers/vqkd_tiny.yaml
    beit3 export --checkpoint-dir runs/x --output beit3-x          # = python -m beit3.export
    beit3 convert ... ; beit3 predict ...                          # = python -m beit3.convert / beit3.predict
    deepspeed --num_gpus 8 $(which beit3-pretrain) --config ...    # many processes: the launcher runs the script

Each command is also installed on its own: ``beit3-pretrain``, ``beit3-finetune <task>``, ``beit3-train-tokenizer``,
``beit3-export``, ``beit3-convert``, ``beit3-predict``. A config path that is not a file here names a packaged one
(``configs/...`` ships inside the package). ``beit3 <command> --help`` gives a command's options.
"""

from __future__ import annotations

import sys


def pretrain(argv: list[str] | None = None, prog: str = "beit3-pretrain") -> None:
    from .training.pretraining import run

    run(argv, prog=prog)


def finetune(argv: list[str] | None = None, prog: str = "beit3-finetune") -> None:
    from .training.finetune import run
    from .training.tasks import TASKS

    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: {prog} {{{','.join(TASKS)}}} --config CONFIG [options]"
    if argv and argv[0] in ("-h", "--help"):
        print(
            f"{usage}\n\nFine-tunes, evaluates or predicts with one task's head: {', '.join(TASKS)}.\n"
            f"A task's options and config sections: {prog} <task> --help"
        )
        sys.exit(0)
    if not argv or argv[0] not in TASKS:
        sys.exit(
            f"{usage}\nerror: the first argument names the task, one of {', '.join(TASKS)}"
            + (f"; got {argv[0]!r}" if argv else "")
        )
    run(argv[0], argv[1:], prog=f"{prog} {argv[0]}")


def train_tokenizer(argv: list[str] | None = None, prog: str = "beit3-train-tokenizer") -> None:
    from .training.tokenizer_training import run

    run(argv, prog=prog)


def export(argv: list[str] | None = None, prog: str = "beit3-export") -> None:
    from .export import main

    main(argv, prog=prog)


def convert(argv: list[str] | None = None, prog: str = "beit3-convert") -> None:
    from .convert import main

    main(argv, prog=prog)


def predict(argv: list[str] | None = None, prog: str = "beit3-predict") -> None:
    from .predict import main

    main(argv, prog=prog)


COMMANDS = {
    "pretrain": pretrain,
    "finetune": finetune,
    "train-tokenizer": train_tokenizer,
    "export": export,
    "convert": convert,
    "predict": predict,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        sys.exit(f"error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} (beit3 --help)")
    COMMANDS[argv[0]](argv[1:], prog=f"beit3 {argv[0]}")


if __name__ == "__main__":
    main()
