"""The official VQA answer normalization and the annotators' soft scores (beit3/data/vqa_answers.py)."""

from beit3.data.vqa_answers import answer_score, normalize_answer


def test_normalization_follows_the_official_vqa_eval():
    examples = {
        "Two dogs.": "2 dogs",
        "the Cat": "cat",
        "dont": "don't",
        "yes!": "yes",
        "1,000": "1000",
        "3.5": "3.5",
        "a dog, a cat": "dog cat",
        "black-and-white": "black and white",
        "none": "0",
        "  Ten\t": "10",
        "isnt it": "isn't it",
        "(left)": "left",
        "an apple": "apple",
    }
    assert {text: normalize_answer(text) for text in examples} == examples


def test_an_answer_scores_by_how_many_annotators_gave_it():
    assert [answer_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
