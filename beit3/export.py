"""A pretraining or fine-tuning run's DeepSpeed checkpoint -> a ``from_pretrained`` folder.

    python -m beit3.export --checkpoint-dir runs/tiny/pretrain --output beit3-tiny-pretrained [--tag step00000100]

``--checkpoint-dir`` is the run's output_dir (or its ``checkpoints/`` folder). The newest complete
checkpoint is used unless ``--tag`` names one. ZeRO shards of any stage are consolidated with
DeepSpeed's ``zero_to_fp32``; without ZeRO (stage 0) the weights are read as they are. The folder holds the config, ``model.safetensors``, the tokenizer and
the processor. The model class is the one the run's config names (``architectures``; pretraining:
``Beit3ForMaskedDataModeling``): ``from_pretrained(folder)`` continues from it, and ``Beit3Model``
or any task head loads the backbone from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoints import (
    COMPLETE,
    check_weights_only,
    complete_checkpoints,
    load_state_dict_checked,
    read_checkpoint,
    weights_only_loads,
)
from .configuration_beit3 import Beit3Config
from .convert import architecture_class
from .image_processing_beit3 import Beit3ImageProcessor
from .io import atomic_folder
from .log import get_logger
from .modeling_heads import Beit3ForMaskedDataModeling
from .processing_beit3 import Beit3Processor
from .tokenization_beit3 import load_tokenizer

logger = get_logger(__name__)


def find_checkpoint(checkpoint_dir: str | Path, tag: str | None = None) -> tuple[Path, Path, str]:
    """(run output_dir, checkpoints folder, tag) of the checkpoint to export."""
    path = Path(checkpoint_dir)
    if (path / COMPLETE).is_file():  # a tag folder itself
        path, tag = path.parent, tag or path.name
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    run = checkpoints.parent
    complete = [p.name for p in complete_checkpoints(checkpoints)]
    if tag is None:
        if not complete:
            raise FileNotFoundError(
                f"No complete checkpoint under {checkpoints} (a checkpoint counts once its {COMPLETE} marker exists)."
            )
        tag = complete[-1]
    elif tag not in complete:
        raise FileNotFoundError(
            f"{checkpoints / tag} is not a complete checkpoint; complete ones: {complete or 'none'}."
        )
    return run, checkpoints, tag


def export(checkpoint_dir: str | Path, output: str | Path, tag: str | None = None) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run, checkpoints, tag = find_checkpoint(checkpoint_dir, tag)
    if not (run / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"{run / 'model'} has no config.json: export reads the model config and tokenizer that tasks/pretrain.py "
            "and the fine-tuning scripts save there at the start of a run."
        )

    config = Beit3Config.from_pretrained(run / "model")
    model = architecture_class(config, default=Beit3ForMaskedDataModeling)(config)
    check_weights_only(checkpoints / tag)
    if any((checkpoints / tag).glob("*optim_states.pt")):  # ZeRO: consolidate the fp32 partitions
        with weights_only_loads():  # zero_to_fp32 itself loads with weights_only=False
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    else:  # no ZeRO (stage 0): the module's weights are whole in the model file
        state = read_checkpoint(checkpoints / tag / "mp_rank_00_model_states.pt")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # The engine trains 0-dim parameters as (1,) (see Engine); they get their own shape back here.
    state = {
        k: v.reshape(shapes[k]) if k in shapes and v.numel() == 1 and shapes[k] == () else v for k, v in state.items()
    }
    load_state_dict_checked(model, state, f"checkpoint {checkpoints / tag}")
    image_processor = Beit3ImageProcessor(size=config.image_size)
    with atomic_folder(output) as folder:  # the model and its processor appear together, or neither does
        model.save_pretrained(folder)
        if (run / "model" / "tokenizer.json").is_file():  # every run that reads text saved its tokenizer there
            Beit3Processor(image_processor=image_processor, tokenizer=load_tokenizer(run / "model")).save_pretrained(
                folder
            )
        else:  # a run on images alone (classification)
            image_processor.save_pretrained(folder)
    return Path(output)


def main(argv: list[str] | None = None, prog: str = "python -m beit3.export") -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint-dir",
        required=True,
        help="the run's output_dir, its checkpoints/ folder, or one checkpoint folder",
    )
    parser.add_argument("--output", required=True, help="the from_pretrained folder to write")
    parser.add_argument("--tag", help="a checkpoint such as step00000100 (default: the newest complete one)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint_dir, args.output, args.tag)
    except (OSError, ValueError) as error:  # no complete checkpoint, an output folder with other files, ...
        raise SystemExit(f"error: {error}") from error
    logger.info(f"wrote {path}: config, model.safetensors, tokenizer and processor")


if __name__ == "__main__":
    main()
