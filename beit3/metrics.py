"""Task metrics, as the official evaluations compute them, and the prediction files they take.

Every score is a percentage (0..100), as papers and the official logs report them (CIDEr 133.6 = 1.336).

| task | function | what |
|---|---|---|
| VQAv2 | ``vqa_accuracy`` | official accuracy: per question, mean over the 10 leave-one-out sets of min(matches / 3, 1) |
| VQAv2 | ``vqa_score`` | the training-time proxy: soft score of the arg-max label |
| NLVR2, ImageNet | ``classification_accuracy`` | top-1 / top-5 (timm's ``accuracy``) |
| retrieval | ``retrieval_recall`` | R@1/5/10 image->text and text->image, similarities in chunks |
| captioning | ``caption_scores`` | BLEU-1..4, CIDEr (and METEOR, SPICE on request) with pycocoevalcap |
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch

from .data.vqa_answers import normalize_answer, process_punctuation
from .io import write_json_atomic

# --------------------------------------------------------------------------------------------- VQA


def vqa_answer_accuracy(answer: str, annotator_answers: Sequence[str]) -> float:
    """The official accuracy (0..1) of one answer against the 10 annotators' answers.

    For each annotator, the answer scores min(1, number of the *other* 9 annotators who gave it / 3);
    the 10 scores are averaged. As in the official vqaEval.py, the prediction is fully normalized and
    the annotators' answers get the punctuation step only, and only when they disagree (the released
    annotations are normalized already).
    """
    if not annotator_answers:
        raise ValueError("A question needs its annotators' answers to be scored; got none.")
    predicted = normalize_answer(answer)
    truth = list(annotator_answers)
    if len(set(truth)) > 1:
        truth = [process_punctuation(a) for a in truth]
    matches = sum(a == predicted for a in truth)
    # Leaving out an annotator who gave the answer removes one match; leaving out another keeps all.
    return sum(min(1.0, (matches - (a == predicted)) / 3) for a in truth) / len(truth)


def vqa_accuracy(predictions: Mapping[int, str], annotator_answers: Mapping[int, Sequence[str]]) -> float:
    """Official VQA accuracy (%) over the questions of ``annotator_answers`` (question_id -> the 10 raw answers,
    e.g. ``beit3.data.vqa.answers_from_records``); every one of them needs a prediction."""
    missing = [q for q in annotator_answers if q not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} questions have no prediction (e.g. question_id {missing[:3]}); predict every question."
        )
    if not annotator_answers:
        raise ValueError("No questions to score.")
    return (
        100.0
        * sum(vqa_answer_accuracy(predictions[q], answers) for q, answers in annotator_answers.items())
        / len(annotator_answers)
    )


def vqa_accuracy_per_type(
    predictions: Mapping[int, str], annotator_answers: Mapping[int, Sequence[str]], question_types: Mapping[int, str]
) -> dict[str, float]:
    """Official VQA accuracy (%) per question type (question_id -> type, e.g. the annotations' ``question_type``),
    over the questions of ``annotator_answers`` that have a type."""
    groups: dict[str, dict[int, Sequence[str]]] = {}
    for question, answers in annotator_answers.items():
        if question in question_types:
            groups.setdefault(question_types[question], {})[question] = answers
    return {kind: vqa_accuracy(predictions, group) for kind, group in sorted(groups.items())}


def answer_prior(typed_answers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The most frequent answer of each question type, from (question_type, answer) pairs of the training data:
    the constant baseline that a model answering from the question's wording alone reaches."""
    counts: dict[str, Counter] = {}
    for kind, answer in typed_answers:
        counts.setdefault(kind, Counter())[answer] += 1
    return {kind: counter.most_common(1)[0][0] for kind, counter in counts.items()}


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The VQAScore proxy (%) used for validation during training: the soft score (B, num_labels) of the
    arg-max label of ``logits`` (B, num_labels), averaged over questions. Questions without an answer in
    the vocabulary are not in the training data, so this overestimates the official accuracy."""
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and soft-score targets {tuple(targets.shape)} must have the same shape."
        )
    chosen = targets.gather(1, logits.argmax(dim=-1, keepdim=True))
    return 100.0 * chosen.float().mean().item()


def vqa_predictions(
    logits: torch.Tensor, question_ids: Sequence[int] | torch.Tensor, answers: Sequence[str]
) -> list[dict]:
    """``[{"question_id", "answer"}]`` from logits (B, num_labels) and ``answers`` indexed by label
    (``beit3.data.vqa.label_to_answer``), the EvalAI submission format."""
    ids = question_ids.tolist() if isinstance(question_ids, torch.Tensor) else list(question_ids)
    return [{"question_id": int(q), "answer": answers[label]} for q, label in zip(ids, logits.argmax(dim=-1).tolist())]


# ---------------------------------------------------------------------------------- classification


def classification_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` from logits (B, C) and labels (B,); a k above C counts as C (always a hit)."""
    from timm.utils import accuracy

    values = accuracy(logits.detach().float(), labels, topk=tuple(topk))
    return {f"top{k}": float(v) for k, v in zip(topk, values)}


# --------------------------------------------------------------------------------------- retrieval


def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_ids: Sequence[int] | torch.Tensor,
    image_ids: Sequence[int] | torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K (%) both ways, as the official evaluation: ``tr_r{K}`` (image -> text) counts an image as a
    hit if any of its K best texts is one of its captions; ``ir_r{K}`` (text -> image) counts a text as a
    hit if its image is among its K best images. ``average_score`` is the mean of all of them (the
    official model-selection key).

    Args:
        image_embeds: (N_images, D), one row per distinct image; text_embeds: (N_texts, D). Similarity is
            their dot product (cosine for the normalized embeddings of ``Beit3ForImageTextRetrieval``).
        text_image_ids: (N_texts,) the id of each text's image.
        image_ids: (N_images,) the id of each image row; None: 0..N_images-1.
        chunk_size: rows of the similarity matrix computed at once (chunk_size x N at most in memory).
    Ties rank the true match first: an item's rank is the number of items scoring strictly higher.
    """
    device = image_embeds.device
    image_ids = torch.arange(len(image_embeds)) if image_ids is None else torch.as_tensor(image_ids)
    text_image_ids = torch.as_tensor(text_image_ids)
    if len(set(image_ids.tolist())) != len(image_ids):
        raise ValueError(
            "image_ids has duplicates; give one image_embeds row per distinct image (drop repeated images first)."
        )
    row_of = {int(i): r for r, i in enumerate(image_ids.tolist())}
    unknown = sorted({int(i) for i in text_image_ids.tolist()} - set(row_of))
    if unknown:
        raise ValueError(f"Texts refer to images {unknown[:5]} that have no row in image_embeds.")
    text_rows = torch.tensor([row_of[int(i)] for i in text_image_ids.tolist()], dtype=torch.long, device=device)
    if len(text_rows) != len(text_embeds):
        raise ValueError(f"{len(text_embeds)} text embeddings but {len(text_rows)} text_image_ids.")
    without_text = sorted(set(range(len(image_embeds))) - set(text_rows.tolist()))
    if without_text:
        raise ValueError(
            f"Images {image_ids[without_text[:5]].tolist()} have no text; every image needs at least one caption."
        )

    image_ranks, text_ranks = [], []
    for start in range(0, len(image_embeds), chunk_size):  # image -> text: best-ranked caption of each image
        scores = image_embeds[start : start + chunk_size] @ text_embeds.t()
        own = text_rows[None, :] == torch.arange(start, start + len(scores), device=device)[:, None]
        best_own = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        image_ranks.append((scores > best_own).sum(dim=1).cpu())
    for start in range(0, len(text_embeds), chunk_size):  # text -> image: rank of the text's image
        scores = text_embeds[start : start + chunk_size] @ image_embeds.t()
        true = scores.gather(1, text_rows[start : start + chunk_size, None])
        text_ranks.append((scores > true).sum(dim=1).cpu())
    image_ranks, text_ranks = torch.cat(image_ranks), torch.cat(text_ranks)
    result = {}
    for k in ks:
        result[f"tr_r{k}"] = 100.0 * (image_ranks < k).float().mean().item()
    for k in ks:
        result[f"ir_r{k}"] = 100.0 * (text_ranks < k).float().mean().item()
    result["average_score"] = sum(result.values()) / len(result)
    return result


# -------------------------------------------------------------------------------------- captioning

# What PTBTokenizer drops after tokenizing.
_PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def simple_caption_tokenize(text: str) -> str:
    """A stand-in for the PTB tokenizer without Java: lower-case, split words from punctuation, drop punctuation."""
    tokens = re.findall(r"[\w]+(?:'[\w]+)?|[^\w\s]", text.lower().replace("\n", " "))
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATION and re.search(r"\w", t))


def _tokenize_captions(captions: Mapping, tokenize: str) -> dict:
    """id -> list of tokenized captions, with the PTB tokenizer (Java) or the simple one."""
    if tokenize == "simple":
        return {key: [simple_caption_tokenize(c) for c in texts] for key, texts in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({key: [{"caption": c} for c in texts] for key, texts in captions.items()})


def caption_scores(
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    tokenize: str = "auto",
    meteor: bool = False,
    spice: bool = False,
) -> dict[str, float]:
    """COCO caption metrics (%) with pycocoevalcap, as COCOEvalCap computes them: PTB tokenization of
    predictions and references, then BLEU-1..4 (``Bleu_1``..``Bleu_4``) and CIDEr-D (``CIDEr``); ``METEOR``
    and ``SPICE`` when asked (both run Java; SPICE also downloads Stanford CoreNLP models on first use).

    Args:
        predictions: image_id -> the generated caption; references: image_id -> the reference captions.
            Every image of ``references`` needs a prediction. CIDEr's document frequencies come from these
            references, so score the whole split at once.
        tokenize: "ptb" (Stanford PTB tokenizer, needs Java, the official numbers), "simple" (no Java;
            close but not equal), or "auto" (PTB if ``java`` is on the PATH, else simple with a warning).
    """
    if tokenize not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenize must be 'auto', 'ptb' or 'simple'; got {tokenize!r}.")
    missing = [i for i in references if i not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} images have no predicted caption (e.g. image_id {missing[:3]}); caption every image."
        )
    if not references:
        raise ValueError("No references to score against.")
    has_java = shutil.which("java") is not None
    if not has_java and (meteor or spice or tokenize == "ptb"):
        asked = ", ".join(
            n for n, on in (("the PTB tokenizer", tokenize == "ptb"), ("METEOR", meteor), ("SPICE", spice)) if on
        )
        raise RuntimeError(
            f"{asked} need(s) Java, but no 'java' is on the PATH. Install a JRE (e.g. apt-get install "
            "default-jre-headless), or use tokenize='simple' without METEOR/SPICE."
        )
    if tokenize == "auto":
        tokenize = "ptb" if has_java else "simple"
        if not has_java:
            warnings.warn(
                "No 'java' on the PATH: captions are tokenized with a simple whitespace/punctuation tokenizer instead "
                "of pycocoevalcap's PTB tokenizer, so BLEU and CIDEr differ slightly from the official numbers. "
                "Install a JRE for the official scores.",
                stacklevel=2,
            )
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = list(references)
    gts = _tokenize_captions({i: list(references[i]) for i in ids}, tokenize)
    res = _tokenize_captions({i: [predictions[i]] for i in ids}, tokenize)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
    scores["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = 100.0 * float(Meteor().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = 100.0 * float(Spice().compute_score(gts, res)[0])
    return scores


# -------------------------------------------------------------------------------- prediction files


def write_vqa_predictions(path: str | os.PathLike, predictions: Mapping[int, str] | Sequence[dict]) -> None:
    """The VQA test-dev / test-std submission file: ``[{"question_id": int, "answer": str}]``."""
    items = (
        [{"question_id": int(q), "answer": str(a)} for q, a in predictions.items()]
        if isinstance(predictions, Mapping)
        else [{"question_id": int(p["question_id"]), "answer": str(p["answer"])} for p in predictions]
    )
    write_json_atomic(path, items)


def write_caption_results(path: str | os.PathLike, predictions: Mapping[int, str] | Sequence[dict]) -> None:
    """The COCO caption results file: ``[{"image_id": int, "caption": str}]``."""
    items = (
        [{"image_id": int(i), "caption": str(c)} for i, c in predictions.items()]
        if isinstance(predictions, Mapping)
        else [{"image_id": int(p["image_id"]), "caption": str(p["caption"])} for p in predictions]
    )
    write_json_atomic(path, items)
