"""Fine-tuning, evaluation and prediction of the task heads: the one runner behind
``tasks/{vqa,nlvr2,retrieval,captioning,classification}.py``.

    python tasks/vqa.py --config configs/tasks/vqa_base.yaml [--mode train|evaluate|predict] [--set key=value ...]
    deepspeed --num_gpus 8 tasks/vqa.py --config configs/tasks/vqa_base.yaml

A run config has these sections (``--set`` overrides any field, e.g. ``--set train.lr=1e-4``):

    model:     init: a ``from_pretrained`` folder (ours: pretrained, exported or fine-tuned) or an official
                     ``.pth``; null trains from random weights of ``preset``.
               preset, overrides: the Beit3Config preset and fields to change (image_size resamples the
                     position table; drop_path_rate; ...).
    tokenizer: a tokenizer folder or ``beit3.spm``; null: the init folder's (classification reads no text and
               needs none).
    data:      train / eval / predict: where each split is (the task's readers; see ``tasks/<task>.py``),
               and the task's options (max_text_length, augment, ...): ``tasks.TaskData`` and the
               task's own (``VqaData``, ``CaptioningData``, ``ClassificationData``).
    train:     the engine's settings (``beit3.training.settings.TrainSettings``): output_dir, max_steps,
               save_every, seed, lr, warmup_steps, layer_decay, micro_batch_size, precision, zero_stage, ...
    eval:      batch_size, precision, and the task's decoding options (``tasks.EvalOptions``).

Every declared field of these sections may be ``--set``, listed in the YAML or not; ``--print-config`` shows the
resolved config with each field's default and doc.

Modes: ``train`` fine-tunes (a restart resumes from output_dir), exports ``output_dir/final`` (a
``from_pretrained`` folder) and scores it on ``data.eval``; ``evaluate`` scores ``--model`` (default
``output_dir/final``) on ``data.eval``; ``predict`` writes the predictions on ``data.predict`` in
the official submission format. Scores go to ``<output>/eval_results.json``; ``evaluate --blind`` scores with
every example's image(s) swapped for another's (``<output>/blind_eval_results.json``; ``train --blind`` adds it
after training), the control that tells a
model reading the image from one answering from the text.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers.utils import logging as transformers_logging

from ..configuration_beit3 import Beit3Config
from ..convert import model_from_official
from ..data.common import ReplaceUnreadable, counted
from ..data.sampling import StepBatchSampler
from ..export import export
from ..io import write_json_atomic
from ..log import get_logger
from ..sections import Section, doc
from ..tokenization_beit3 import check_tokenizer_matches, load_tokenizer
from .distributed import end_distributed
from .run_log import read_run_log
from .runner import command_line, read_run_config, save_model_folder, start_engine, step_loader
from .tasks import EvalOptions, FinetuneTask, task_named

logger = get_logger(__name__)

MODES = ("train", "evaluate", "predict")


@dataclass
class FinetuneTokenizer(Section):
    """The top level of a task config: its text tokenizer."""

    section: ClassVar[str] = ""
    tokenizer: str | None = doc(
        "a tokenizer folder or beit3.spm (null: the init folder's; classification reads no text and needs none)", None
    )


@dataclass
class FinetuneModel(Section):
    section: ClassVar[str] = "model"
    init: str | None = doc(
        "a from_pretrained folder or an official .pth to start from (null: random weights of preset + overrides)", None
    )
    preset: str | None = doc(
        "the architecture for random weights (beit3.list_presets()); with init, only its overrides apply", None
    )
    overrides: dict | None = doc(
        "Beit3Config fields over the preset's or the init's, e.g. {image_size: 480, drop_path_rate: 0.1}",
        None,
        keys=Beit3Config.field_names(),
    )


def sections_of(task_class) -> dict[str, type[Section]]:
    """The typed sections of ``task_class``'s config (the docs' configuration reference reads them too)."""
    return {"top": FinetuneTokenizer, "model": FinetuneModel, "data": task_class.Data, "eval": EvalOptions}


def initial_model(
    task_class: type[FinetuneTask], section: FinetuneModel, tokenizer, task_overrides: dict, with_head: bool = False
) -> torch.nn.Module:
    """The ``task_class.model_class`` a run starts from (``section``: the config's ``model``; see the module
    docstring).

    ``task_overrides``: config fields the task sets (num_labels, id2label, label_smoothing).
    ``with_head``: an official ``.pth`` is a fine-tuned checkpoint of this task (evaluate, predict),
    not a pretrained backbone.
    """
    model_class = task_class.model_class
    overrides = {**(section.overrides or {}), **task_overrides}
    image_size = overrides.pop("image_size", None)
    init = section.init
    if init is None:
        if not section.preset:
            raise ValueError(
                "model.init is null (random weights), so model.preset must name the architecture (beit3.list_presets())."
            )
        config = Beit3Config.from_preset(
            section.preset, **overrides, **({"image_size": image_size} if image_size else {})
        )
        if tokenizer is not None:  # (a task without text keeps the preset's text tower)
            if "vocab_size" not in (section.overrides or {}):  # a vocabulary of our own: size the embeddings
                config.vocab_size = len(tokenizer)
            config.mask_token_id = tokenizer.mask_token_id
        return model_class(config)
    if Path(init).is_dir():
        config = Beit3Config.from_pretrained(init)
        for key, value in overrides.items():  # the task's fields (labels, label smoothing) on the loaded config
            setattr(config, key, value)
        return _from_folder(model_class, init, config, image_size)
    if not Path(init).is_file():
        raise FileNotFoundError(
            f"model.init {init} does not exist: give a from_pretrained folder or an official .pth file."
        )
    if with_head:
        model = model_from_official(init, task=task_class.name)
    else:
        backbone = model_from_official(init)
        model = model_class(Beit3Config.from_dict({**backbone.config.to_dict(), **overrides}))
        state = backbone.state_dict()
        state.pop("embeddings.mask_token", None)  # pretraining's; a task model has none
        model.beit3.load_state_dict(state)
    if image_size:
        model.set_image_size(image_size)
    return model


def _from_folder(model_class: type, init: str, config: Beit3Config, image_size: int | None) -> torch.nn.Module:
    """``model_class`` from a ``from_pretrained`` folder, saying in one line which parts start fresh (a head the
    folder lacks) and which of its tensors go unused (another head): transformers' load report would list each
    tensor as MISSING or UNEXPECTED, though that is the point of starting a task from a pretrained model. A
    backbone tensor the folder lacks stays an error."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(init, config=config, image_size=image_size, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    prefix = model_class.base_model_prefix + "."
    backbone = sorted(key for key in info["missing_keys"] if key.startswith(prefix))
    if backbone:
        raise ValueError(
            f"model.init {init} lacks {len(backbone)} backbone tensors (e.g. {', '.join(backbone[:3])}): it is not a "
            "BEiT-3 of this configuration."
        )

    def parts(keys) -> str:
        counts = Counter(key.split(".")[0] for key in keys)
        return ", ".join(f"{part}.* ({count})" for part, count in sorted(counts.items())) or "none"

    logger.info(
        f"{model_class.__name__} from {init}: the backbone loaded; starting fresh: {parts(info['missing_keys'])}; "
        f"not used: {parts(info['unexpected_keys'])}"
    )
    return model


def _task_options(parser) -> None:
    parser.add_argument("--mode", choices=MODES, default="train")
    parser.add_argument(
        "--model", help="evaluate/predict: a fine-tuned folder or official .pth (default: output_dir/final)"
    )
    parser.add_argument(
        "--output", help="evaluate/predict: where scores and predictions go (default: train.output_dir)"
    )
    parser.add_argument(
        "--blind",
        action="store_true",
        help="evaluate: a control with every example's image(s) swapped for another example's; a model that reads "
        "the image falls to chance. Scores go to blind_eval_results.json. With --mode train: after the held-out "
        "scores, the blind control of the trained model too",
    )


def run(task_name: str, argv: list[str] | None = None, prog: str | None = None) -> dict | None:
    """The command line of ``tasks/<task_name>.py`` (or ``prog``); returns the scores (train on rank 0, evaluate) or None."""
    args = command_line(__doc__, argv, prog=prog or f"tasks/{task_name}.py", add_arguments=_task_options)
    task_class = task_named(task_name)
    config, settings, sections = read_run_config(
        args.config,
        args.set,
        sections=("model", "data", "train"),
        typed=sections_of(task_class),
        show=args.print_config,
    )
    task = task_class(sections["data"], sections["eval"])
    output_dir = Path(args.output or settings.output_dir)
    if args.blind and args.mode == "predict":
        raise ValueError("--blind is a control for --mode evaluate (or train, scoring after training).")
    if args.mode == "train":
        return train(task, config, settings, sections, blind=args.blind)
    task.blind = args.blind
    model_path = args.model or str(Path(settings.output_dir) / "final")
    model = initial_model(task_class, FinetuneModel(init=model_path), None, {}, with_head=True)
    tokenizer = task_tokenizer(
        task,
        sections["top"].tokenizer,
        model_path if Path(model_path).is_dir() else None,
        "An official .pth holds no tokenizer: set tokenizer: to beit3.spm (or a tokenizer folder).",
    )
    task.setup(tokenizer, model.config)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if args.mode == "evaluate":
        return evaluate_and_save(task, model, output_dir)
    path = task.predict(model, output_dir)
    logger.info(f"{task_name}: wrote predictions to {path}")
    return None


def task_tokenizer(task, given: str | None, fallback: str | None, missing: str):
    """The run's text tokenizer: ``given`` (the config's ``tokenizer``), else ``fallback`` (the model's folder);
    None for a task that reads no text and was given none. Raises ValueError(``missing``) when there is neither."""
    if not (task.reads_text or given):
        return None
    if not (given or fallback):
        raise ValueError(missing)
    return load_tokenizer(given or fallback)


def evaluate_and_save(task, model, output_dir: Path) -> dict:
    scores = task.evaluate(model, output_dir)
    path = output_dir / task.eval_file("eval_results.json")
    write_json_atomic(
        path, {"task": task.name, "metric": task.metric, **({"blind": True} if task.blind else {}), **scores}
    )
    logger.info(
        f"{task.name}{' (blind)' if task.blind else ''}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, float))
        + (f"; {scores['evaluation']}" if "evaluation" in scores else "")
        + f" (in {path})"
    )
    return scores


def train(task, config: dict, settings, sections: dict, blind: bool = False) -> dict | None:
    """Fine-tunes on rank 0 and the others, exports ``final`` and scores it on the held-out data (and, ``blind``,
    with the images swapped between examples too); returns the held-out scores on rank 0, else None. ``config`` is
    the run's config as written (what the resume check compares), ``sections`` its typed sections."""
    model_section = sections["model"]
    tokenizer = task_tokenizer(
        task,
        sections["top"].tokenizer,
        model_section.init,
        "Training from random weights needs tokenizer: (a tokenizer folder or beit3.spm).",
    )
    torch.manual_seed(settings.seed)  # the same initial head on every rank
    model = initial_model(type(task), model_section, tokenizer, task.config_overrides())
    task.setup(tokenizer, model.config)  # (the config_overrides, labels and label smoothing, come from the data alone)
    task.prepare_model(model, model_section.init)
    if tokenizer is not None:
        check_tokenizer_matches(tokenizer, model.config)
    dataset, collate = task.train_dataset(), task.collate
    if task.data.skip_unreadable_images:
        dataset, collate = ReplaceUnreadable(dataset), counted(collate)
    engine = start_engine(model, config, settings)
    save_model_folder(engine, model.config, tokenizer)

    def make_loader(first: int, count: int):
        sampler = StepBatchSampler(
            len(dataset),
            settings.micro_batch_size,
            seed=settings.seed,
            rank=engine.rank,
            world_size=engine.world_size,
            start_step=first,
            num_steps=count,
        )
        return step_loader(settings, dataset, batch_sampler=sampler, collate_fn=collate)

    records = engine.fit(task.step, make_loader, samples_per_step=settings.micro_batch_size)
    end_distributed()
    if engine.rank != 0:
        return None
    final = export(engine.output_dir, engine.output_dir / "final")
    if records:
        last = records[-1]
        logger.info(
            f"{task.name}: trained to step {last['step']}, loss {last['loss']:.4f}, {last['samples_per_s']:.1f} samples/s; "
            f"model in {final}"
        )
    scores = {}
    if task.data.eval:
        model = initial_model(type(task), FinetuneModel(init=str(final)), None, {}).to(engine.device).eval()
        scores = evaluate_and_save(task, model, engine.output_dir)
        if blind:
            task.blind = True
            evaluate_and_save(task, model, engine.output_dir)
            task.blind = False
    if records:
        _save_curves(task, engine.output_dir, scores)
    return scores


def _save_curves(task, output_dir: Path, scores: dict) -> None:
    """``loss_curves.png``: the training loss and the learning rate, the held-out score in the title."""
    try:
        from ..visualization import save_loss_curves
    except ImportError:  # matplotlib is optional for a run
        return
    score = scores.get(task.metric)
    title = f"{task.name}: {output_dir.name}" + (
        f", held-out {task.metric} {score:.2f}" if isinstance(score, float) else ""
    )
    save_loss_curves(
        read_run_log(output_dir / "metrics.jsonl"),
        output_dir / "loss_curves.png",
        title=title,
        panels={"loss": ["loss"], "learning rate": ["lr"]},
    )
