"""Train a BEiT-3 text tokenizer: a SentencePiece unigram model (like XLM-R's) with BEiT-3's id layout.

    python tokenizers/train_text_tokenizer.py --files captions.txt more.txt --vocab-size 64000 --output my-tokenizer
    python tokenizers/train_text_tokenizer.py --dataset data/captions --column text --vocab-size 32000 --output my-tokenizer

Text files hold one sentence per line; a dataset is one saved with ``datasets``' ``save_to_disk``.
The output folder loads with ``AutoTokenizer.from_pretrained(folder)`` after ``import beit3``, and
keeps the trained model as ``beit3.spm``. Ids: <s> 0, <pad> 1, </s> 2, <unk> 3, piece i -> i + 1,
<mask> = vocab-size + 1, so a model needs ``vocab_size >= vocab-size + 2``.
"""

import argparse

from beit3.tokenization_beit3 import train_sentencepiece


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=[], help="text files, one sentence per line")
    parser.add_argument("--dataset", help="a datasets dataset saved on disk (save_to_disk)")
    parser.add_argument("--column", default="text", help="the dataset column that holds the text")
    parser.add_argument("--split", help="the split of a DatasetDict (default: train)")
    parser.add_argument(
        "--vocab-size", type=int, required=True, help="SentencePiece pieces, three specials included (BEiT-3: 64000)"
    )
    parser.add_argument("--output", required=True, help="folder to write the tokenizer to")
    parser.add_argument(
        "--character-coverage", type=float, default=0.9995, help="share of characters covered by pieces"
    )
    parser.add_argument(
        "--input-sentence-size", type=int, default=0, help="sample this many sentences to train on (0: all)"
    )
    parser.add_argument("--max-length", type=int, default=64, help="the tokenizer's model_max_length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="hide SentencePiece's training log")
    args = parser.parse_args(argv)
    if not args.files and not args.dataset:
        parser.error("give --files or --dataset")

    tokenizer = train_sentencepiece(
        args.output,
        args.vocab_size,
        files=args.files,
        dataset=args.dataset,
        column=args.column,
        split=args.split,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        model_max_length=args.max_length,
        seed=args.seed,
        quiet=args.quiet,
    )
    print(
        f"wrote {args.output}: {len(tokenizer)} ids (<mask> = {tokenizer.mask_token_id}); "
        f"a model needs vocab_size >= {len(tokenizer)}"
    )


if __name__ == "__main__":
    main()
