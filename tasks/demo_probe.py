"""What the demo measures besides the tasks' own scores, on the files its stages wrote: the export's image-text
matching head against captions with one word swapped, and the captions that name exactly the scene's shapes."""

from __future__ import annotations

import json
import random
from pathlib import Path


def matching_probe(export: Path, coco: Path) -> dict[str, float] | None:
    """How well the image-text matching head of ``export`` tells a held-out caption of ``coco`` (the world's
    Karpathy-format folder) from the same caption with one color (or kind) word swapped: the AUC (0.5: chance) of its
    match probability, per swapped word kind. None when the export has no matching head. Statements such as
    NLVR2's need this attribute check."""
    import torch
    from transformers import AutoTokenizer

    from beit3 import Beit3ForMaskedDataModeling, Beit3ImageProcessor
    from beit3.data.common import load_rgb
    from beit3.data.synthetic import COLORS, SHAPES

    model = Beit3ForMaskedDataModeling.from_pretrained(export).eval()
    if not hasattr(model, "itm_head"):
        return None
    tokenizer = AutoTokenizer.from_pretrained(export)
    size = model.config.image_size
    processor = Beit3ImageProcessor(size={"height": size, "width": size})
    root = coco
    images = [i for i in json.loads((root / "dataset_coco.json").read_text())["images"] if i["split"] == "val"]
    rng, scores = random.Random(0), {"color": ([], []), "kind": ([], [])}
    for image in images:
        words = image["sentences"][0]["raw"].split()
        texts = [" ".join(words)]
        for vocabulary in (COLORS, SHAPES):
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

    return {name: round(auc(*pair), 3) for name, pair in scores.items()}


def auc(positives: list[float], negatives: list[float]) -> float:
    """The chance that a positive scores above a negative (ties count half)."""
    wins = sum((a > b) + 0.5 * (a == b) for a in positives for b in negatives)
    return wins / (len(positives) * len(negatives))


def exact_shapes(karpathy: Path, captions: Path) -> float:
    """The share (%) of the generated ``captions`` (a captions JSON) that name exactly their scene's shapes, each
    with its color and kind, the truth being the first reference caption in ``karpathy`` (dataset_coco.json)."""
    from beit3.data.synthetic import shapes_named

    truth = {
        image["cocoid"]: shapes_named(image["sentences"][0]["raw"])
        for image in json.loads(karpathy.read_text())["images"]
    }
    generated = json.loads(captions.read_text())
    return 100.0 * sum(shapes_named(c["caption"]) == truth[c["image_id"]] for c in generated) / len(generated)
