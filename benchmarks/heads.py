"""Task-head speed, measured side by side in one process.

Captioning: greedy decoding of 32 tokens with the key/value cache against recomputing the whole
sequence at every step (goal: >= 5x, identical output). ``</s>`` is pushed down in the random
head so that every caption runs the full 32 tokens. Retrieval: images/s and texts/s to embed.
Calls alternate which side runs first; the figures are medians.

    python benchmarks/heads.py [--preset beit3_base_patch16_224] [--reps 3] [--batch 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from beit3 import Beit3Config
from beit3.modeling_heads import Beit3ForCaptioning, Beit3ForImageTextRetrieval

warnings.filterwarnings("ignore")


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="beit3_base_patch16_224")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Beit3Config.from_preset(args.preset)
    print(f"{args.preset}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")

    captioner = Beit3ForCaptioning(config).eval()
    with torch.no_grad():
        captioner.mlm_head.bias[config.eos_token_id] = -1e4
    images = torch.randn(args.batch, 3, config.image_size, config.image_size)
    max_length = args.tokens + 2  # <s> + tokens + </s>
    times = {True: [], False: []}
    outputs = {}
    for rep in range(args.reps):
        for use_cache in (True, False) if rep % 2 == 0 else (False, True):
            seconds, outputs[use_cache] = timed(
                lambda: captioner.generate(images, max_length=max_length, use_cache=use_cache)
            )
            times[use_cache].append(seconds)
    cached, recomputed = statistics.median(times[True]), statistics.median(times[False])
    identical = torch.equal(outputs[True], outputs[False])
    print(
        f"captioning, greedy {args.tokens} tokens, batch {args.batch}: cache {cached:.2f} s, recompute {recomputed:.2f} s, "
        f"speedup {recomputed / cached:.1f}x, identical output: {identical}"
    )

    retriever = Beit3ForImageTextRetrieval(config).eval()
    batch = 16
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size)
    input_ids = torch.randint(3, 60000, (batch, 64))
    with torch.no_grad():
        retriever.get_image_features(pixel_values[:2])
        image_times, text_times = [], []
        for rep in range(args.reps):
            for kind in ("image", "text") if rep % 2 == 0 else ("text", "image"):
                if kind == "image":
                    image_times.append(timed(lambda: retriever.get_image_features(pixel_values))[0])
                else:
                    text_times.append(timed(lambda: retriever.get_text_features(input_ids))[0])
    print(
        f"retrieval embedding, batch {batch}: {batch / statistics.median(image_times):.1f} images/s ({config.image_size} px), "
        f"{batch / statistics.median(text_times):.1f} texts/s (64 tokens)"
    )


if __name__ == "__main__":
    main()
