"""The one shape of every training program here (pretraining, fine-tuning, the visual tokenizer):

    args = command_line(__doc__, argv)                       # --config, --set, --print-config (and a program's own)
    config, settings, sections = read_run_config(args.config, args.set, typed={"data": Data}, show=args.print_config)
    ...build the model...                                     # after torch.manual_seed(settings.seed): same weights on every rank
    engine = start_engine(model, config, settings)           # processes, DeepSpeed, the resume check
    save_model_folder(engine, model.config, tokenizer)       # rank 0: what beit3.export rebuilds the model from
    records = engine.fit(step, lambda first, count: step_loader(settings, batches(first, count)), samples_per_step)
    end_distributed()                                        # every rank: no communication after training

A bad config or input ends the program with ``error: <what was wrong and what to do>`` (``fail``), not a traceback.
Below the runners and the tasks: ``autocast`` and ``ordered_batches``, which evaluation shares.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from ..data.common import split_batch
from ..io import loader_worker_init
from ..log import for_rank
from ..sections import Section
from .config import load_config, print_config, record_run_config
from .distributed import setup_distributed
from .engine import Engine, load_deepspeed_json
from .settings import TrainSettings


def fail(error: BaseException | str) -> NoReturn:
    """Ends the program with ``error: ...`` (exit status 1)."""
    sys.exit(f"error: {error.args[0] if isinstance(error, KeyError) and error.args else error}")


def command_line(
    description: str, argv: list[str] | None, prog: str | None = None, add_arguments=None
) -> argparse.Namespace:
    """The options every training program takes (``--config``, ``--set``, the deepspeed launcher's ``--local_rank``),
    plus those ``add_arguments(parser)`` adds."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the run's YAML")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (every section's fields, defaults filled in, each with its doc) and exit",
    )
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    for_rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))  # set by the deepspeed launcher
    return args


def read_run_config(
    path: str | Path,
    overrides: list[str],
    sections: tuple[str, ...] = ("data", "train"),
    typed: dict[str, type[Section]] | None = None,
    show: bool = False,
) -> tuple[dict, TrainSettings, dict[str, Section]]:
    """The YAML with its ``--set`` overrides, its checked ``train`` settings and its ``typed`` sections ({name: Section
    class}, e.g. ``{"data": PretrainingData}``: their defaults filled in, unknown keys refused; a class of section
    ``""`` holds the top-level keys beside the sections, e.g. ``{"top": PretrainingTokenizers}``). Every declared
    field may be ``--set``, listed in the file or not. A config that cannot run ends the program here, before any
    work; ``show`` (``--print-config``) prints the resolved config with each field's doc and ends it.

    Returns (the config as written plus its overrides: what ``record_run_config`` compares on resume, the train
    settings, {name: typed section})."""
    typed = typed or {}
    try:
        config = load_config(
            path,
            overrides,
            declared={
                path: names for cls in (TrainSettings, *typed.values()) for path, names in cls.settable().items()
            },
        )
        missing = [section for section in sections if section not in config]
        if missing:
            raise ValueError(
                f"{path} has no {', '.join(map(repr, missing))} section; see configs/ for complete examples."
            )
        settings = TrainSettings.from_config(config["train"])
        named = {"train", *sections, *(cls.section for cls in typed.values())}
        top = {key: value for key, value in config.items() if key not in named}
        parsed = {name: cls.from_config(config.get(cls.section) if cls.section else top) for name, cls in typed.items()}
    except (KeyError, ValueError, OSError, TypeError) as error:
        fail(error)
    if show:
        print(print_config(config, {"train": settings, **parsed}))
        sys.exit(0)
    return config, settings, parsed


def start_engine(model: torch.nn.Module, config: dict, settings: TrainSettings) -> Engine:
    """The engine of a run: the processes (``setup_distributed``), the DeepSpeed JSON of ``train.deepspeed`` (or
    of ``train.zero_stage``), and the resume check, which refuses another config before anything is rewritten."""
    try:
        deepspeed_json = load_deepspeed_json(settings)
    except (OSError, ValueError) as error:
        fail(error)
    engine = Engine(model, settings, deepspeed_json, distributed=setup_distributed(settings.num_workers))
    try:
        record_run_config(engine.output_dir, config, bool(engine.complete_checkpoints()), engine.rank)
    except ValueError as error:
        fail(error)
    return engine


def save_model_folder(engine: Engine, model_config, tokenizer=None) -> None:
    """Rank 0 writes ``output_dir/model``: the model's config (with its class in ``architectures``) and the
    tokenizer, which ``beit3.export`` puts beside the weights of a checkpoint."""
    if engine.rank != 0:
        return
    model_config.architectures = [type(engine.module.module).__name__]
    model_config.save_pretrained(engine.output_dir / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(engine.output_dir / "model")


def step_loader(settings: TrainSettings, dataset, **options) -> torch.utils.data.DataLoader:
    """The DataLoader of a run's steps, with its ``train.num_workers`` (4 batches ahead per worker); ``options`` say
    how ``dataset`` gives batches (``batch_size=None`` for step-indexed batches, or a ``batch_sampler``).

    On a GPU machine the batches come in pinned memory: only from there is the engine's ``non_blocking`` copy to the
    GPU asynchronous (from pageable memory it waits for the copy)."""
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=settings.num_workers,
        prefetch_factor=4 if settings.num_workers else None,
        worker_init_fn=loader_worker_init(settings.num_workers),
        pin_memory=torch.cuda.is_available(),
        **options,
    )


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast on ``device``, or nothing for fp32."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def ordered_batches(dataset, batch_size: int, num_workers: int = 0, collate_fn=None):
    """One ordered pass over ``dataset`` for evaluation: (model inputs, metadata) per batch."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        worker_init_fn=loader_worker_init(num_workers),
        pin_memory=torch.cuda.is_available(),
    )
    for batch in loader:
        yield split_batch(batch)
