"""Writes what configs/pretrain/tiny.yaml reads: a generated shapes world and two tokenizers, under runs/tiny/.

    python tasks/prepare_tiny.py [--output runs/tiny] [--images 2000]

The text tokenizer is a SentencePiece model trained on the captions. The visual tokenizer is a
tiny VQ-KD at its initialization (its codes are a fixed function of the patches; train one with
the visual tokenizer script for meaningful codes).
"""

import argparse
from pathlib import Path

import torch

from beit3 import train_sentencepiece
from beit3.data.synthetic import write_shapes_world
from beit3.visual_tokenizers import VQKD, VQKDConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/tiny")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output = Path(args.output)
    paths = write_shapes_world(output / "data", args.images, seed=args.seed)
    tokenizer = train_sentencepiece(
        output / "text-tokenizer", vocab_size=36, files=[paths["texts"]], model_max_length=32, quiet=True
    )
    torch.manual_seed(args.seed)
    VQKD(VQKDConfig.from_preset("vqkd_tiny", image_size=64)).save_pretrained(output / "visual-tokenizer")
    print(
        f"wrote {args.images} images with captions to {output / 'data'}, a {len(tokenizer)}-id text tokenizer and a tiny VQ-KD"
    )


if __name__ == "__main__":
    main()
