"""Try a converted or fine-tuned BEiT-3 on local images, from the command line.

    python -m beit3.predict caption  --model beit3-base-cap --images cat.jpg dog.jpg [--num-beams 3]
    python -m beit3.predict vqa      --model beit3-base-vqa --images cat.jpg --text "what color is the cat?"
    python -m beit3.predict nlvr2    --model beit3-base-nlvr2 --images left.jpg right.jpg --text "there are two dogs"
    python -m beit3.predict retrieve --model beit3-base-coco --images a.jpg b.jpg --texts "a cat" "a dog on grass"
    python -m beit3.predict classify --model beit3-base-in1k --images cat.jpg [--top 5]

The tokenizer is read from ``--tokenizer``, a tokenizer folder or the SentencePiece ``.spm`` (default: the model
folder); a folder converted from an official checkpoint has none, so pass ``beit3.spm`` there.
Answer and class names come from the model config's ``id2label``. A task's name works as well as its verb
(``captioning`` for ``caption``), and every task of the catalogue (``beit3.task_catalogue``) is here, one
registered by another package too: what a task prints is its ``predict_examples``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from .data.common import load_rgb
from .task_catalogue import all_specs, task_spec
from .tokenization_beit3 import load_tokenizer


def load_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            images.append(load_rgb(path))  # (a decompression bomb too: a clear error, not a traceback)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: cannot read image {path}: {error}") from error
    return images


def predict(
    task: str,
    model_dir: str,
    images: list[str],
    texts: list[str] | None = None,
    tokenizer_dir: str | None = None,
    num_beams: int = 1,
    max_length: int = 32,
    top: int = 5,
) -> list[str]:
    """Runs one task (its name or its ``predict_verb``) and returns the lines it would print."""
    task_class = task_spec(task)
    try:
        model = load_task_model(task, model_dir)
    except (OSError, ValueError) as error:  # no config.json, a damaged weights file, a config of wrong types
        raise SystemExit(f"error: {error}") from error
    image_processor = task_class.example_image_processor(model.config.image_size)
    tokenizer = None
    if task_class.reads_text:
        try:
            tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: {error}" + ("" if tokenizer_dir else " Pass it with --tokenizer.")) from error
    pictures = dict(zip(images, load_images(images)))
    options = {"top": top, "max_length": max_length, "num_beams": num_beams}
    try:
        with torch.no_grad():
            return task_class.predict_examples(model, image_processor, tokenizer, pictures, texts, options)
    except ValueError as error:  # input the task cannot take
        raise SystemExit(f"error: {error}") from error


def load_task_model(task: str, model_dir: str):
    """The folder's model as ``task``'s head, refused when the folder holds another task's model (or none): its
    head would start from random weights and print confident nonsense."""
    model_class = task_spec(task).model_class
    model, info = model_class.from_pretrained(model_dir, output_loading_info=True)
    saved = getattr(model.config, "architectures", None) or []  # as the folder's config.json has them
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(model_class.base_model_prefix + "."))
    if missing or (saved and model_class.__name__ not in saved):
        holds = " / ".join(saved) if saved else "a model without this head"
        fitting = [t.predict_verb for t in all_specs().values() if t.model_class.__name__ in saved]
        hint = f" (try `{fitting[0]}`)" if fitting else ""
        raise SystemExit(
            f"error: {model_dir} holds {holds}{hint}, but `{task}` needs a {model_class.__name__}: "
            f"{len(missing)} of its head's tensors are not in the folder ({', '.join(missing[:3]) or 'none'}"
            f"{', ...' if len(missing) > 3 else ''}). Fine-tune one or convert one with python -m beit3.convert --task ..."
        )
    return model.eval()


def main(argv: list[str] | None = None, prog: str = "python -m beit3.predict") -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    specs = all_specs()
    parser.add_argument(
        "task",
        choices=[word for t in specs.values() for word in dict.fromkeys((t.predict_verb, t.name))],
        help="a task's verb or its name: "
        + ", ".join(f"{t.predict_verb} ({t.name})" if t.predict_verb != t.name else t.name for t in specs.values()),
    )
    parser.add_argument("--model", required=True, help="a from_pretrained folder of the task's model")
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument(
        "--text",
        "--texts",
        dest="texts",
        nargs="+",
        help="question (vqa), statement (nlvr2) or candidate texts (retrieve)",
    )
    parser.add_argument(
        "--tokenizer", help="a tokenizer folder or the SentencePiece .spm (default: --model, if it holds one)"
    )
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        raise SystemExit(
            f"error: no model folder at {args.model} (convert one with python -m beit3.convert --task ...)."
        )
    for line in predict(
        args.task, args.model, args.images, args.texts, args.tokenizer, args.num_beams, args.max_length, args.top
    ):
        print(line)


if __name__ == "__main__":
    main()
