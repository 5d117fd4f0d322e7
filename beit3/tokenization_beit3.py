"""The BEiT-3 text tokenizer: a SentencePiece unigram model read with XLM-R's (fairseq's) id layout.

BEiT-3 ships its vocabulary as a SentencePiece model, ``beit3.spm``, and reads it the way XLM-R does:

    <s> = 0, <pad> = 1, </s> = 2, <unk> = 3,
    a piece with sentencepiece id i > 0 -> i + 1 (an unknown piece, sentencepiece id 0, -> 3),
    <mask> = len(spm) + 1,

and a text becomes ``[0] + pieces + [2]``, right-padded with 1 (64 tokens in the released tasks).
``Beit3Tokenizer.from_spm`` converts the ``.spm`` once into a ``tokenizers``-backed tokenizer and
checks it against the ``sentencepiece`` package; ``save_pretrained`` then writes a folder that
``AutoTokenizer.from_pretrained`` loads without the ``.spm``. ``train_sentencepiece`` trains a new
vocabulary with the same layout.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import XLMRobertaTokenizer

# Texts that exercise the normalizer (NFKC, full-width forms, ligatures, runs of spaces), digits,
# punctuation and unknown characters; none holds a literal special token such as "<mask>", which the
# tokenizer (like the transformers 4.x one unilm used) keeps whole while sentencepiece splits it.
CHECK_TEXTS = (
    "A man riding a horse on the beach.",
    "What color is the bus?  Two   dogs play in the snow!",
    "The left image contains exactly two dogs, and the right one has none.",
    "Ｆｕｌｌ-width ｆｉｓｈ, ﬁne ligatures, café naïve résumé.",
    "数字 123 and emoji 🙂, tabs\tand\nnewlines.",
    "  leading and trailing spaces  ",
    "",
)
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


class Beit3Tokenizer(XLMRobertaTokenizer):
    """XLM-R's tokenizer (backed by the ``tokenizers`` library) holding BEiT-3's vocabulary.

    In transformers 5 ``XLMRobertaTokenizer`` is the fast, ``tokenizers``-backed class
    (``XLMRobertaTokenizerFast`` is an alias of it). Build one from a SentencePiece model with
    ``Beit3Tokenizer.from_spm(path)``, or load a saved folder with ``AutoTokenizer.from_pretrained``.
    Do not pass the ``.spm`` as ``vocab_file``: transformers 5 then silently builds a 5-token vocabulary.

    Calling it gives ``input_ids`` (B, T) and ``attention_mask`` (B, T), 1 for real tokens, 0 for
    padding. ``model_max_length`` is 64 as in the released tasks, so ``truncation=True`` and
    ``padding="max_length"`` give unilm's fixed-length sequences.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # XLM-R's class builds a stand-in of its special tokens alone when it is given no vocabulary (a folder without
        # tokenizer.json, AutoTokenizer on a converted checkpoint): every word would become <unk>.
        if len(self) <= len(SPECIAL_TOKENS) + 1:
            raise ValueError(
                f"This Beit3Tokenizer has no vocabulary ({len(self)} ids: the special tokens alone), so every word "
                "would be <unk>. Load a folder that holds tokenizer.json (save_pretrained writes one), or build the "
                "tokenizer from its SentencePiece model: Beit3Tokenizer.from_spm('beit3.spm'). A folder converted "
                "from an official checkpoint holds no tokenizer."
            )

    @classmethod
    def from_spm(
        cls, spm_path: str | os.PathLike, model_max_length: int = 64, check_texts: Iterable[str] = CHECK_TEXTS, **kwargs
    ) -> Beit3Tokenizer:
        """Converts a SentencePiece model (``beit3.spm``) and checks the result against ``sentencepiece``.

        Args:
            spm_path: the SentencePiece model file.
            model_max_length: the default length for truncation and ``padding="max_length"``.
            check_texts: texts whose ids must equal sentencepiece's under the BEiT-3 id map.
            kwargs: passed on to the tokenizer (e.g. ``padding_side``).
        Raises:
            FileNotFoundError, ValueError: the file is missing, is not a SentencePiece model, has
            another special-piece layout, or the converted tokenizer disagrees with sentencepiece.
        """
        import sentencepiece
        from tokenizers.models import Unigram
        from transformers.convert_slow_tokenizer import SentencePieceExtractor, XLMRobertaConverter

        spm_path = Path(spm_path)
        if not spm_path.is_file():
            raise FileNotFoundError(
                f"No SentencePiece model at {spm_path}. Pass the path of beit3.spm (or of a model "
                "trained with tokenizers/train_text_tokenizer.py)."
            )
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{spm_path} is not a SentencePiece model that sentencepiece can load: {error}") from error
        _check_spm_layout(sp, spm_path)

        # transformers' XLM-R converter puts <s> <pad> </s> <unk> first, then pieces 3.. of the model, then
        # <mask>; with the sentencepiece default layout (unk 0, <s> 1, </s> 2) that is exactly the id map.
        extracted = SentencePieceExtractor(str(spm_path)).extract(Unigram)
        vocab = XLMRobertaConverter.convert_from_spm(vocab=extracted["vocab"])["vocab"]
        tokenizer = cls(
            vocab=vocab,
            _spm_precompiled_charsmap=extracted["_spm_precompiled_charsmap"],
            model_max_length=model_max_length,
            **kwargs,
        )
        verify_against_sentencepiece(tokenizer, sp, check_texts)
        return tokenizer

    def save_pretrained(self, *args, **kwargs):
        # The backend keeps the padding and truncation of the last call and tokenizer.json would store
        # them: a tokenizer saved after tokenizer(..., max_length=6) would load with max_length 6.
        self.backend_tokenizer.no_truncation()
        self.backend_tokenizer.no_padding()
        return super().save_pretrained(*args, **kwargs)


def load_tokenizer(path: str | os.PathLike) -> Beit3Tokenizer:
    """A tokenizer folder (``AutoTokenizer``) or a SentencePiece ``.spm``/``.model`` file (``Beit3Tokenizer.from_spm``).

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without tokenizer files (a converted checkpoint's).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file():
        return Beit3Tokenizer.from_spm(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No tokenizer at {path}: give a tokenizer folder or a SentencePiece .spm file.")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no tokenizer (no tokenizer.json; a folder converted from an official checkpoint has none): "
            "give a tokenizer folder (Beit3Tokenizer.from_spm('beit3.spm').save_pretrained(folder) makes one) or the "
            "SentencePiece .spm file itself."
        )
    return AutoTokenizer.from_pretrained(path)


def _check_spm_layout(sp, spm_path) -> None:
    """The id map needs <unk> at 0 and control pieces (<s>, </s> by default) at 1 and 2, which encoding never
    gives, since it sends ids 1..3 to <pad>, </s>, <unk>; and no later piece may reuse a special token's name."""
    size = sp.get_piece_size()
    clashes = sorted({sp.id_to_piece(i) for i in range(3, size)} & {*SPECIAL_TOKENS, "<mask>"})
    if size < 4 or sp.unk_id() != 0 or not (sp.is_control(1) and sp.is_control(2)) or clashes:
        found = f"unk_id {sp.unk_id()}, pieces 1 and 2 {[sp.id_to_piece(i) for i in (1, 2) if i < size]}"
        raise ValueError(
            f"{spm_path} does not fit BEiT-3's id map, which needs <unk> at id 0, control pieces (<s>, </s>) "
            f"at ids 1 and 2 and no other piece named {', '.join((*SPECIAL_TOKENS, '<mask>'))}; it has {found}"
            f"{f' and pieces named {clashes}' if clashes else ''}. Train one with train_sentencepiece "
            "(tokenizers/train_text_tokenizer.py), which uses that layout."
        )


def beit3_ids_from_sentencepiece(sp, text: str) -> list[int]:
    """The official BEiT-3 ids of ``text``: ``[0] + [i + 1, or 3 for unknown] + [2]`` from sentencepiece ids i."""
    return [0] + [i + 1 if i > 0 else 3 for i in sp.encode(text)] + [2]


def verify_against_sentencepiece(tokenizer: Beit3Tokenizer, sp, texts: Iterable[str] = CHECK_TEXTS) -> None:
    """Raises ValueError unless ``tokenizer`` gives the official ids of every text and the special ids.

    ``sp`` is a ``sentencepiece.SentencePieceProcessor`` loaded from the same model.
    """
    size = sp.get_piece_size()
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": size + 1}
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    if got != specials or len(tokenizer) != size + 2:
        raise ValueError(
            f"The converted tokenizer has special ids {got} and {len(tokenizer)} ids; BEiT-3's layout "
            f"for a {size}-piece model is {specials} and {size + 2} ids."
        )
    for text in texts:
        expected, actual = beit3_ids_from_sentencepiece(sp, text), tokenizer(text, verbose=False)["input_ids"]
        if actual != expected:
            raise ValueError(
                f"The converted tokenizer disagrees with sentencepiece on {text!r}: it gives {actual}, "
                f"sentencepiece plus the BEiT-3 id map gives {expected} (pieces "
                f"{sp.encode(text, out_type=str)}). The .spm uses a feature the conversion does not "
                "reproduce; please report it with the model file."
            )


def check_tokenizer_matches(tokenizer, config) -> None:
    """Raises ValueError if ``tokenizer`` can give ids the model described by ``config`` does not hold.

    The model's embedding table may be larger than the vocabulary (the released models have 64010 rows
    for 64002 ids) but not smaller, and the special ids the model relies on must agree.
    """
    problems = []
    if len(tokenizer) > config.vocab_size:
        problems.append(
            f"the tokenizer has {len(tokenizer)} ids but the model's vocab_size is {config.vocab_size}, so ids "
            f"{config.vocab_size}..{len(tokenizer) - 1} have no embedding (use the model's own tokenizer, or "
            f"build the model with vocab_size >= {len(tokenizer)})"
        )
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
        wanted = getattr(config, name, None)
        if wanted is not None and getattr(tokenizer, name) != wanted:
            problems.append(f"config.{name} is {wanted} but the tokenizer's is {getattr(tokenizer, name)}")
    if problems:
        raise ValueError("Tokenizer and model do not match: " + "; ".join(problems) + ".")


def train_sentencepiece(
    output_dir: str | os.PathLike,
    vocab_size: int,
    files: Sequence[str | os.PathLike] = (),
    dataset: str | os.PathLike | None = None,
    column: str = "text",
    split: str | None = None,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    model_max_length: int = 64,
    seed: int = 0,
    quiet: bool = False,
) -> Beit3Tokenizer:
    """Trains a SentencePiece unigram model (like XLM-R's) and saves a BEiT-3 tokenizer folder.

    Args:
        output_dir: written with ``tokenizer.json`` and ``tokenizer_config.json`` (what
            ``AutoTokenizer.from_pretrained`` reads) and ``beit3.spm``, the trained model.
        vocab_size: pieces in the SentencePiece model, three specials included (the released model has
            64000); the tokenizer then has ``vocab_size + 2`` ids, ``<mask>`` being the last.
        files: text files, one sentence per line.
        dataset: a ``datasets`` dataset saved with ``save_to_disk``; ``column`` holds the text and
            ``split`` picks a split of a ``DatasetDict`` (``train`` by default).
        character_coverage: share of characters the pieces must cover; the rest become ``<unk>``.
        input_sentence_size: train on this many randomly sampled sentences (0: all of them).
        model_max_length: the tokenizer's default length for truncation and padding.
        seed: seeds sentencepiece's sampling, so the same text gives the same vocabulary.
        quiet: hide sentencepiece's training log.
    Returns:
        the tokenizer, checked against sentencepiece like ``Beit3Tokenizer.from_spm``.
    """
    import sentencepiece

    if not files and dataset is None:
        raise ValueError("Nothing to train on: give text files (one sentence per line) or a dataset saved on disk.")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"Text file(s) not found: {', '.join(missing)}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def sentences():
        for name in files:
            with open(name, encoding="utf-8") as lines:
                yield from (line.rstrip("\r\n") for line in lines)
        if dataset is not None:
            yield from _dataset_texts(dataset, column, split)

    with tempfile.TemporaryDirectory() as scratch:
        prefix = os.path.join(scratch, "beit3")
        options = dict(
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="unigram",
            # sentencepiece's default specials, the layout the BEiT-3 id map is defined on
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2 if quiet else 0,
        )
        sentencepiece.set_random_generator_seed(seed)  # sampling of input sentences, for a repeatable vocabulary
        try:
            sentencepiece.SentencePieceTrainer.train(sentence_iterator=(s for s in sentences() if s.strip()), **options)
        except RuntimeError as error:
            hint = " Lower --vocab-size or give more text." if "too high" in str(error) else ""
            raise ValueError(f"SentencePiece training failed: {error}{hint}") from error
        spm_path = output_dir / "beit3.spm"
        spm_path.write_bytes(Path(prefix + ".model").read_bytes())
    tokenizer = Beit3Tokenizer.from_spm(spm_path, model_max_length=model_max_length)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def _dataset_texts(path, column: str, split: str | None) -> Iterable[str]:
    """The ``column`` strings of a dataset saved with ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        split = split or ("train" if "train" in data else None)
        if split not in data:
            raise ValueError(f"{path} holds the splits {list(data)}; choose one with split=... (--split).")
        data = data[split]
    elif split is not None:
        raise ValueError(f"{path} is a single dataset, not a DatasetDict; leave out split={split!r}.")
    if column not in data.column_names:
        raise ValueError(
            f"{path} has no column {column!r}; its columns are {data.column_names} (choose one with --column)."
        )
    for batch in data.iter(batch_size=1000):
        for text in batch[column]:
            if text is not None:
                yield str(text)
