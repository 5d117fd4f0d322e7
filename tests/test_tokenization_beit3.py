"""Beit3Tokenizer: BEiT-3's id layout from a SentencePiece model, save/load through AutoTokenizer, training."""

import random
import runpy
from pathlib import Path

import datasets
import pytest
import sentencepiece
from conftest import tiny_config
from transformers import AutoTokenizer

from beit3 import Beit3Config, Beit3Tokenizer, check_tokenizer_matches, load_tokenizer, train_sentencepiece
from beit3.tokenization_beit3 import beit3_ids_from_sentencepiece, verify_against_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "a the man woman child dog cat horse bus train street park beach snow ball red blue green white two three "
    "is are on in with of riding playing sitting standing next to near under café naïve garçon"
).split()
UNSEEN = (
    "A man riding a horse on the beach.",
    "What color is the bus?",
    "Zebras! 42 QUICK  brown\tfoxes",
    "数字 and emoji 🙂",
    "Ｆｕｌｌ-width ﬁ",
    "  spaces   everywhere  ",
)


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + rng.choice(".!?")
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    """A tiny unigram model trained by sentencepiece itself with its default options."""
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "beit3"),
        vocab_size=80,
        model_type="unigram",
        minloglevel=2,
    )
    return folder / "beit3.model"


@pytest.fixture(scope="module")
def sp(spm_path):
    return sentencepiece.SentencePieceProcessor(model_file=str(spm_path))


@pytest.fixture(scope="module")
def tokenizer(spm_path):
    return Beit3Tokenizer.from_spm(spm_path)


def test_special_ids_and_size_follow_the_fairseq_layout(tokenizer, sp):
    size = sp.get_piece_size()
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.cls_token_id == 0 and tokenizer.sep_token_id == 2
    assert tokenizer.mask_token_id == size + 1 and len(tokenizer) == size + 2


def test_every_ordinary_piece_is_its_sentencepiece_id_plus_one(tokenizer, sp):
    for i in range(3, sp.get_piece_size()):
        assert tokenizer.convert_tokens_to_ids(sp.id_to_piece(i)) == i + 1


def test_texts_get_sentencepiece_ids_shifted_with_unknowns_as_3(tokenizer, sp):
    for text in corpus(50, seed=1) + list(UNSEEN):
        expected = [0] + [i + 1 if i > 0 else 3 for i in sp.encode(text)] + [2]
        assert tokenizer(text)["input_ids"] == expected, text
    assert 0 in sp.encode("数字") and 3 in tokenizer("数字")["input_ids"]


def test_batches_are_right_padded_with_1_and_truncated_to_64_by_default(tokenizer, sp):
    long_text = " ".join(corpus(40))
    batch = tokenizer(["a dog", long_text], padding="max_length", truncation=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long) == 64 == tokenizer.model_max_length
    assert short == [0] + [i + 1 for i in sp.encode("a dog")] + [2] + [1] * (64 - 2 - len(sp.encode("a dog")))
    assert batch["attention_mask"][0] == [1 if i != 1 else 0 for i in short]
    assert long == [0] + [i + 1 if i else 3 for i in sp.encode(long_text)][:62] + [2]
    longest = tokenizer(["a dog", "a red bus on the street"], padding=True)["input_ids"]
    assert len(longest[0]) == len(longest[1]) < 64 and longest[0][-1] == 1


def test_save_pretrained_loads_through_auto_tokenizer_without_the_spm(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.spm")) and not list(
        tmp_path.glob("*.model")
    )  # nothing to parse but tokenizer.json
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is Beit3Tokenizer
    assert (
        loaded.model_max_length == 64
        and loaded.mask_token_id == tokenizer.mask_token_id
        and len(loaded) == len(tokenizer)
    )
    texts = corpus(20, seed=2) + list(UNSEEN)
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    # With a model config in the folder, AutoTokenizer finds the class through the registered config too.
    Beit3Config(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is Beit3Tokenizer


def test_no_vocabulary_is_an_error_not_a_tokenizer_of_unknowns(tokenizer, tmp_path):
    """transformers' XLM-R class makes a stand-in of its five special tokens when it finds no vocabulary, as in a
    folder converted from an official checkpoint (weights and config only)."""
    Beit3Config(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    for build in (Beit3Tokenizer, lambda: AutoTokenizer.from_pretrained(tmp_path)):
        with pytest.raises(ValueError, match=r"has no vocabulary \(5 ids.*Beit3Tokenizer.from_spm"):
            build()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer .*beit3.spm"):
        load_tokenizer(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("a dog")["input_ids"] == tokenizer("a dog")["input_ids"]


def test_a_call_before_saving_does_not_leak_its_padding_into_the_saved_folder(tokenizer, tmp_path):
    tokenizer(["a dog", "a man riding a horse"], max_length=4, truncation=True, padding="max_length")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 64 and "max_length" not in loaded.init_kwargs
    assert loaded("a man riding a horse")["input_ids"] == tokenizer("a man riding a horse")["input_ids"]
    assert len(loaded("a man riding a horse")["input_ids"]) > 4


def test_from_spm_rejects_a_missing_file_garbage_and_another_special_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.spm"):
        Beit3Tokenizer.from_spm(tmp_path / "no-such.spm")
    (tmp_path / "garbage.spm").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.spm is not a SentencePiece model"):
        Beit3Tokenizer.from_spm(tmp_path / "garbage.spm")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus(100)), encoding="utf-8")
    for name, layout in (("padded", dict(pad_id=0, unk_id=3)), ("no_bos_eos", dict(bos_id=-1, eos_id=-1))):
        sentencepiece.SentencePieceTrainer.train(
            input=str(tmp_path / "corpus.txt"),
            model_prefix=str(tmp_path / name),
            vocab_size=60,
            minloglevel=2,
            **layout,
        )
        with pytest.raises(ValueError, match=f"{name}.model does not fit BEiT-3's id map"):
            Beit3Tokenizer.from_spm(tmp_path / f"{name}.model")


def test_verification_catches_a_tokenizer_that_disagrees_with_sentencepiece(tokenizer, tmp_path):
    (tmp_path / "other.txt").write_text(
        "\n".join(corpus(200, seed=5)[::-1] + ["zebra xylophone quartz"] * 20), encoding="utf-8"
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "other.txt"), model_prefix=str(tmp_path / "other"), vocab_size=80, minloglevel=2
    )
    other = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "other.model"))
    with pytest.raises(ValueError, match="disagrees with sentencepiece"):
        verify_against_sentencepiece(tokenizer, other, ["zebra xylophone quartz", "a man riding a horse"])


def test_check_tokenizer_matches_flags_a_vocabulary_larger_than_the_model(tokenizer):
    check_tokenizer_matches(
        tokenizer, tiny_config(vocab_size=len(tokenizer) + 8, mask_token_id=tokenizer.mask_token_id)
    )
    with pytest.raises(ValueError, match=f"the tokenizer has {len(tokenizer)} ids but the model's vocab_size is 50"):
        check_tokenizer_matches(tokenizer, tiny_config(vocab_size=50))
    with pytest.raises(ValueError, match="mask_token_id"):
        check_tokenizer_matches(tokenizer, tiny_config(vocab_size=len(tokenizer), mask_token_id=5))


def test_train_sentencepiece_from_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(corpus(150, seed=3)), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(corpus(150, seed=4)), encoding="utf-8")
    tokenizer = train_sentencepiece(tmp_path / "out", 70, files=[tmp_path / "a.txt", tmp_path / "b.txt"], quiet=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "out" / "beit3.spm"))
    assert sp.get_piece_size() == 70 and len(tokenizer) == 72 and tokenizer.mask_token_id == 71
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in UNSEEN:
        assert loaded(text)["input_ids"] == beit3_ids_from_sentencepiece(sp, text)


def test_train_sentencepiece_from_a_saved_dataset_and_its_errors(tmp_path):
    datasets.Dataset.from_dict({"caption": corpus(300, seed=6)}).save_to_disk(tmp_path / "data")
    tokenizer = train_sentencepiece(tmp_path / "out", 60, dataset=tmp_path / "data", column="caption", quiet=True)
    assert len(tokenizer) == 62 and (tmp_path / "out" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match=r"no column 'text'.*\['caption'\]"):
        train_sentencepiece(tmp_path / "bad", 60, dataset=tmp_path / "data", quiet=True)
    with pytest.raises(ValueError, match="Lower --vocab-size"):
        train_sentencepiece(tmp_path / "big", 5000, dataset=tmp_path / "data", column="caption", quiet=True)
    with pytest.raises(ValueError, match="Nothing to train on"):
        train_sentencepiece(tmp_path / "none", 60)


def test_the_training_script_writes_a_folder_auto_tokenizer_loads(tmp_path, capsys):
    assert not (ROOT / "tokenizers" / "__init__.py").exists()
    (tmp_path / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    main = runpy.run_path(str(ROOT / "tokenizers" / "train_text_tokenizer.py"))["main"]
    main(["--files", str(tmp_path / "corpus.txt"), "--vocab-size", "64", "--output", str(tmp_path / "tok"), "--quiet"])
    assert "66 ids (<mask> = 65)" in capsys.readouterr().out
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert type(loaded) is Beit3Tokenizer and loaded.convert_ids_to_tokens([0, 1, 2, 3, 65]) == [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        "<mask>",
    ]
