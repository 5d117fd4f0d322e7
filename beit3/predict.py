"""Try a converted or fine-tuned BEiT-3 on local images, from the command line.

    python -m beit3.predict caption  --model beit3-base-cap --images cat.jpg dog.jpg [--num-beams 3]
    python -m beit3.predict vqa      --model beit3-base-vqa --images cat.jpg --text "what color is the cat?"
    python -m beit3.predict nlvr2    --model beit3-base-nlvr2 --images left.jpg right.jpg --text "there are two dogs"
    python -m beit3.predict retrieve --model beit3-base-coco --images a.jpg b.jpg --texts "a cat" "a dog on grass"
    python -m beit3.predict classify --model beit3-base-in1k --images cat.jpg [--top 5]

The tokenizer is read from ``--tokenizer``, a tokenizer folder or the SentencePiece ``.spm`` (default: the model
folder); a folder converted from an official checkpoint has none, so pass ``beit3.spm`` there.
Answer and class names come from the model config's ``id2label``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from .data.common import load_rgb
from .data.vqa import insert_answer_slot
from .image_processing_beit3 import Beit3ImageProcessor
from .modeling_heads import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
)
from .processing_beit3 import Beit3Processor
from .tokenization_beit3 import load_tokenizer

TASKS = {
    "caption": Beit3ForCaptioning,
    "vqa": Beit3ForVisualQuestionAnswering,
    "nlvr2": Beit3ForVisualReasoning,
    "retrieve": Beit3ForImageTextRetrieval,
    "classify": Beit3ForImageClassification,
}


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
    """Runs one task and returns the lines it would print."""
    model = load_task_model(task, model_dir)
    size = model.config.image_size
    image_processor = (
        Beit3ImageProcessor.for_imagenet(size=size) if task == "classify" else Beit3ImageProcessor(size=size)
    )
    tokenizer = None
    if task != "classify":
        try:
            tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: {error}" + ("" if tokenizer_dir else " Pass it with --tokenizer.")) from error
    processor = Beit3Processor(image_processor=image_processor, tokenizer=tokenizer) if tokenizer is not None else None
    pictures = load_images(images)
    names = model.config.id2label
    lines = []
    with torch.no_grad():
        if task == "classify":
            probs = model(pixel_values=image_processor(pictures, return_tensors="pt")["pixel_values"]).logits.softmax(
                -1
            )
            for path, row in zip(images, probs):
                best = row.topk(min(top, row.numel()))
                lines.append(
                    f"{path}: "
                    + ", ".join(f"{names.get(int(i), i)} {p:.3f}" for p, i in zip(best.values, best.indices))
                )
        elif task == "caption":
            pixel_values = image_processor(pictures, return_tensors="pt")["pixel_values"]
            ids = model.generate(
                pixel_values, max_length=max_length, num_beams=num_beams, length_penalty=0.6
            )  # the official beam scoring
            lines += [
                f"{path}: {caption}"
                for path, caption in zip(images, tokenizer.batch_decode(ids, skip_special_tokens=True))
            ]
        elif task == "vqa":
            _need_text(texts, len(pictures))
            inputs = processor(images=pictures, text=_repeat(texts, len(pictures)), return_tensors="pt")
            if model.config.vqa_head == "answer_slot":
                inputs.update(
                    insert_answer_slot(inputs["input_ids"], inputs["attention_mask"], model.config.mask_token_id)
                )
            logits = model(**inputs).logits
            probs = logits.softmax(-1) if model.config.vqa_loss == "softmax" else logits.sigmoid()
            for path, question, row in zip(images, _repeat(texts, len(pictures)), probs):
                best = row.topk(min(top, row.numel()))
                lines.append(
                    f"{path} | {question}: "
                    + ", ".join(f"{names.get(int(i), i)} {p:.3f}" for p, i in zip(best.values, best.indices))
                )
        elif task == "nlvr2":
            if len(pictures) != 2 or not texts:
                raise SystemExit("error: nlvr2 takes exactly two --images and one --text statement.")
            pixel_values = image_processor(pictures, return_tensors="pt")["pixel_values"].unsqueeze(0)
            text = processor.tokenizer(texts[:1], padding="max_length", truncation=True, return_tensors="pt")
            prob_true = model(pixel_values=pixel_values, **text).logits.softmax(-1)[0, 1].item()
            lines.append(
                f"{texts[0]!r} about {images[0]} and {images[1]}: {'true' if prob_true >= 0.5 else 'false'} (p(true) = {prob_true:.3f})"
            )
        else:
            _need_text(texts, 1)
            image_embeds = model.get_image_features(image_processor(pictures, return_tensors="pt")["pixel_values"])
            text = processor.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
            scores = image_embeds @ model.get_text_features(text["input_ids"], text["attention_mask"]).t()
            for path, row in zip(images, scores):
                lines.append(
                    f"{path}: best match {texts[int(row.argmax())]!r} ("
                    + ", ".join(f"{s:.3f}" for s in row.tolist())
                    + ")"
                )
    return lines


def load_task_model(task: str, model_dir: str):
    """The folder's model as ``task``'s head, refused when the folder holds another task's model (or none): its
    head would start from random weights and print confident nonsense."""
    model_class = TASKS[task]
    model, info = model_class.from_pretrained(model_dir, output_loading_info=True)
    saved = getattr(model.config, "architectures", None) or []  # as the folder's config.json has them
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(model_class.base_model_prefix + "."))
    if missing or (saved and model_class.__name__ not in saved):
        holds = " / ".join(saved) if saved else "a model without this head"
        wanted = {name: cls.__name__ for name, cls in TASKS.items()}
        fitting = [name for name, cls_name in wanted.items() if cls_name in saved]
        hint = f" (try `{fitting[0]}`)" if fitting else ""
        raise SystemExit(
            f"error: {model_dir} holds {holds}{hint}, but `{task}` needs a {model_class.__name__}: "
            f"{len(missing)} of its head's tensors are not in the folder ({', '.join(missing[:3]) or 'none'}"
            f"{', ...' if len(missing) > 3 else ''}). Fine-tune one or convert one with python -m beit3.convert --task ..."
        )
    return model.eval()


def _repeat(texts: list[str], count: int) -> list[str]:
    return texts if len(texts) == count else texts[:1] * count


def _need_text(texts: list[str] | None, images: int) -> None:
    if not texts or not all(t.strip() for t in texts):
        raise SystemExit("error: this task needs non-empty --text / --texts.")
    if len(texts) not in (1, images) and images > 1:
        raise SystemExit(f"error: give one text, or one per image ({images}); got {len(texts)}.")


def main(argv: list[str] | None = None, prog: str = "python -m beit3.predict") -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=tuple(TASKS))
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
