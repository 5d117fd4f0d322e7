"""The configuration reference, ``docs/configuration.md``, written from the typed sections that the programs read, so
that it cannot drift from them (``tests/test_docs.py`` checks that the file is what this module writes).

    python -m beit3.training.config_docs            # writes docs/configuration.md
    python -m beit3.training.config_docs --check    # exit status 1 when the file differs from the code's sections
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..io import write_text_atomic
from ..sections import Section, allowed
from .finetune import sections_of
from .pretraining import SECTIONS as PRETRAINING_SECTIONS
from .settings import TrainSettings
from .tasks import TASKS, TaskData
from .tokenizer_training import SECTIONS as TOKENIZER_SECTIONS

DEFAULT_OUTPUT = Path("docs/configuration.md")


def _value(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`[{', '.join(map(str, value))}]`"
    return f"`{value}`"


def _table(fields: list[dataclasses.Field]) -> list[str]:
    rows = ["| field | default | allowed | what it is |", "|---|---|---|---|"]
    for field in fields:
        keys = field.metadata.get("keys")
        what = field.metadata.get("doc", "").replace("|", "\\|")  # a bar inside a cell would end it
        if keys:
            what += f"; keys: {', '.join(f'`{key}`' for key in sorted(keys))}"
        rows.append(f"| `{field.name}` | {_value(field.default)} | {allowed(field)} | {what} |")
    return rows


def _section(cls: type[Section], title: str | None = None, fields: list[dataclasses.Field] | None = None) -> list[str]:
    name = title or (f"`{cls.section}`" if cls.section else "top level (beside the sections)")
    doc = (cls.__doc__ or "").strip().splitlines()[0].replace("``", "`") if cls.__doc__ else ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses write for a class without a docstring
        doc = ""
    source = f"`{cls.__module__}.{cls.__qualname__}`"
    return [
        f"### {name}",
        "",
        f"{doc + ' ' if doc else ''}({source})",
        "",
        *_table(fields or dataclasses.fields(cls)),
        "",
    ]


def _program(title: str, commands: str, example: str, sections: dict[str, type[Section]]) -> list[str]:
    lines = [f"## {title}", "", f"{commands}; a complete example: `{example}`.", ""]
    for cls in sections.values():
        lines += _section(cls)
    return lines


def render() -> str:
    """The whole of ``docs/configuration.md``."""
    lines = [
        "# Configuration reference",
        "",
        "Every field of every run config, with its default, what it takes and what it is. This file is written by",
        "`python -m beit3.training.config_docs` from the typed sections the programs read",
        "(`beit3.sections.Section`), and a test checks that it is up to date: do not edit it by hand.",
        "",
        "A run config is a YAML file (`--config`). `--set section.field=value` sets any field listed here, in the",
        "file or not (`--set train.lr=1e-4`, `--set model.overrides.drop_path_rate=0.1`; values are read as YAML);",
        "a field no section declares is refused, naming the known ones, and every value is checked before any",
        "work. `--print-config` prints a run's resolved config, defaults filled in, and exits. A restart in the same",
        "`train.output_dir` must keep the config (`train.max_steps`, `save_every`, `log_every`, `keep_last`,",
        "`max_nonfinite_steps` and `num_workers` may change).",
        "",
        "## Every program: `train`",
        "",
        *_section(TrainSettings)[2:],
        *_program(
            "Pretraining",
            "`beit3 pretrain`, `python tasks/pretrain.py`",
            "configs/pretrain/tiny.yaml",
            PRETRAINING_SECTIONS,
        ),
        *_program(
            "Visual tokenizer training",
            "`beit3 train-tokenizer --kind vqkd|dvae`, `python tokenizers/train_visual_tokenizer.py`",
            "configs/tokenizers/vqkd_tiny.yaml",
            TOKENIZER_SECTIONS,
        ),
    ]
    common = sections_of(next(iter(TASKS.values())))
    lines += [
        "## Fine-tuning",
        "",
        f"`beit3 finetune <task>`, `python tasks/<task>.py` for {', '.join(TASKS)}; a complete example: "
        "`configs/tasks/vqa_base.yaml`. Every task reads the same `model`, `eval` and top level, and a `data` "
        "section of the fields below plus its own.",
        "",
    ]
    for name in ("top", "model", "eval"):
        lines += _section(common[name])
    lines += _section(TaskData, "`data`: every task")
    shared = {field.name: field for field in dataclasses.fields(TaskData)}
    for task, task_class in TASKS.items():
        own = [
            field
            for field in dataclasses.fields(task_class.Data)
            if field.name not in shared
            or (field.default, field.metadata) != (shared[field.name].default, shared[field.name].metadata)
        ]
        keys = ", ".join(f"`{key}`" for key in task_class.Data.split_keys)
        lines += [f"### `data`: {task}", "", f"A split (`train`, `eval`, `predict`) holds: {keys}.", ""]
        if own:
            lines += _section(task_class.Data, f"`data`: {task} adds or changes", own)[2:]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: docs/configuration.md")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when they differ")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output.is_file() or args.output.read_text() != text:
            sys.exit(f"error: {args.output} is out of date: run python -m beit3.training.config_docs")
        return
    write_text_atomic(args.output, text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
