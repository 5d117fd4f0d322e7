"""How much padding the pretraining's text and pair batches carry, with and without ``data.group_by_length``.

For each window size (0: off), over the first --steps steps of rank 0: the batches that need no attention mask
(every text of one length: SDPA may take its flash kernel on a GPU) and the padded share of their tokens (compute
spent on nothing). Batch sizes and the text length are the config's (the demo's by default).

    python benchmarks/text_padding.py                      # a generated shapes world of --images images
    python benchmarks/text_padding.py --world runs/demo    # the demo's own captions, pairs and tokenizer
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore")


def main() -> None:
    from transformers import AutoTokenizer

    from beit3 import train_sentencepiece
    from beit3.data.pretraining import BatchOptions, PretrainingBatches
    from beit3.data.sources import load_sources
    from beit3.data.synthetic import write_shapes_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain/demo.yaml", help="batch sizes and text length from here")
    parser.add_argument("--world", help="the demo's run folder (runs/demo) instead of a generated world")
    parser.add_argument("--images", type=int, default=1024, help="generated images (and captions, and pairs)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--windows", default="0,16,64", help="group_by_length values to compare")
    args = parser.parse_args()
    data = yaml.safe_load((ROOT / args.config).read_text())["data"]
    sizes = {kind: data["batch_size"][kind] for kind in ("text", "pair")}
    with tempfile.TemporaryDirectory() as tmp:
        if args.world:
            folder = Path(args.world) / "data" / "pretrain"
            texts, pairs = folder / "captions.txt", folder / "pairs.jsonl"
            tokenizer = AutoTokenizer.from_pretrained(Path(args.world) / "text-tokenizer")
        else:
            paths = write_shapes_world(Path(tmp) / "data", args.images)
            texts, pairs = paths["texts"], paths["pairs"]
            tokenizer = train_sentencepiece(Path(tmp) / "tok", vocab_size=36, files=[texts], quiet=True)
        sources = load_sources(texts=[texts], pairs=[pairs])
        print(f"text {sizes['text']}, pair {sizes['pair']} a batch, at most {data['max_text_length']} tokens a text")
        for window in map(int, args.windows.split(",")):
            options = BatchOptions(sizes, 64, 8, max_text_length=data["max_text_length"], group_by_length=window)
            batches = PretrainingBatches(sources, tokenizer, options, num_steps=args.steps)
            unmasked, padded = {kind: 0 for kind in sizes}, {kind: [] for kind in sizes}
            for step in range(args.steps):
                batch = batches[step]
                for kind in sizes:
                    mask = batch[kind].get("attention_mask")
                    unmasked[kind] += mask is None
                    padded[kind].append(0.0 if mask is None else 1 - mask.float().mean().item())
            print(
                f"group_by_length {window:3d}: "
                + ", ".join(
                    f"{kind} batches without a mask {unmasked[kind]}/{args.steps}, padding "
                    f"{statistics.mean(padded[kind]):.1%} of tokens"
                    for kind in sizes
                )
            )


if __name__ == "__main__":
    main()
