"""Memory and start-up against corpus size: peak RSS of a pretraining process and seconds to its first step,
for generated pair corpora in webdataset shards, streamed and (for the smaller ones) copied to Arrow.

    python benchmarks/corpus_scale.py [--pairs 10000,100000,1000000] [--copied-up-to 100000] [--folder /tmp/corpus-scale]

Each corpus is written once (tiny 16 px PNGs, 10,000 pairs a shard) with ``beit3.data.streaming.write_shards``
and kept in --folder for the next call. Each measurement is a fresh ``tasks/pretrain.py`` process (tiny
config, one process, 1 loader worker, 3 steps) in a fresh wrapper, so ``ru_maxrss`` of its children is that
run's peak (the largest single process: the trainer or its loader worker). The copied runs start from an
empty ``datasets`` cache, so their start-up includes the copy; the streamed runs have nothing to copy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WRAPPER = """
import os, resource, subprocess, sys, time
start = time.time()
child = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
metrics = sys.argv[1]
first = None
while child.poll() is None:
    if first is None and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
        first = time.time() - start
    time.sleep(0.05)
if first is None and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
    first = time.time() - start
print(child.returncode, first, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def write_corpus(folder: Path, pairs: int) -> str:
    """Shards of ``pairs`` generated pairs under ``folder``; returns their brace pattern."""
    from PIL import Image

    from beit3.data.streaming import write_shards

    shard_size = 10000
    count = -(-pairs // shard_size)
    pattern = f"{folder}/pairs-{{000000..{count - 1:06d}}}.tar"
    if (folder / "COMPLETE").is_file():
        return pattern
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(0)
    colors, kinds, places = (
        ["red", "green", "blue", "yellow"],
        ["circle", "square", "triangle"],
        ["left", "right", "top", "bottom"],
    )
    images = []
    for index in range(64):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(buffer, "PNG")
        images.append(buffer.getvalue())

    def samples():
        for index in range(pairs):
            text = f"a {rng.choice(colors)} {rng.choice(kinds)} on the {rng.choice(places)}"
            yield {"__key__": f"{index:09d}", "png": images[index % len(images)], "txt": text}

    write_shards(samples(), f"{folder}/pairs-%06d.tar", shard_size)
    (folder / "COMPLETE").write_text(str(pairs))
    return pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="10000,100000,1000000")
    parser.add_argument("--copied-up-to", type=int, default=100000, help="also measure the Arrow copy up to this size")
    parser.add_argument("--folder", default="/tmp/corpus-scale")
    args = parser.parse_args()

    import torch

    from beit3 import train_sentencepiece
    from beit3.data.streaming import expand_shards
    from beit3.visual_tokenizers import VQKD, VQKDConfig

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = folder / "captions.txt"
    captions.write_text(
        "\n".join(
            f"a {c} {k} on the {p}"
            for c in ["red", "green", "blue", "yellow"]
            for k in ["circle", "square", "triangle"]
            for p in ["left", "right", "top", "bottom"]
        )
        + "\n"
    )
    if not (folder / "tok").is_dir():
        train_sentencepiece(folder / "tok", vocab_size=30, files=[captions], model_max_length=32, quiet=True)
        torch.manual_seed(0)
        VQKD(VQKDConfig.from_preset("vqkd_tiny", image_size=64)).save_pretrained(folder / "vqkd")
    rows = []
    for pairs in map(int, args.pairs.split(",")):
        begin = time.time()
        pattern = write_corpus(folder / f"corpus-{pairs}", pairs)
        written = time.time() - begin
        for streaming in (True, False):
            if not streaming and pairs > args.copied_up_to:
                continue
            run = folder / "run"
            cache = folder / "hf-cache"
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            sets = [
                f"text_tokenizer={folder / 'tok'}",
                f"visual_tokenizer={folder / 'vqkd'}",
                "data.sources.images=null",
                f"data.sources.texts=[{captions}]",
                "data.sources.pairs=" + json.dumps([pattern] if streaming else expand_shards(pattern)),
                f"data.streaming={str(streaming).lower()}",
                "data.batch_size={text: 8, pair: 8}",
                f"train.output_dir={run}",
                "train.max_steps=3",
                "train.save_every=3",
                "train.log_every=1",
                "train.num_workers=1",
            ]
            command = [
                sys.executable,
                "tasks/pretrain.py",
                "--config",
                "configs/pretrain/tiny.yaml",
                *(a for s in sets for a in ("--set", s)),
            ]
            env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
            result = subprocess.run(
                [sys.executable, "-c", WRAPPER, str(run / "metrics.jsonl"), *command],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            code, first, rss_kb = int(result[0]), result[1], int(result[2])
            row = {
                "pairs": pairs,
                "streaming": streaming,
                "exit": code,
                "seconds_to_first_step": None if first == "None" else round(float(first), 1),
                "peak_rss_mb": round(rss_kb / 1024),
                "corpus_mb": round(sum(p.stat().st_size for p in (folder / f"corpus-{pairs}").glob("*.tar")) / 2**20),
                "write_seconds": round(written, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| pairs | read as | seconds to first step | peak RSS of one process (MB) |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['pairs']:,} | {'stream' if row['streaming'] else 'Arrow copy'} | {row['seconds_to_first_step']} | {row['peak_rss_mb']} |"
        )


if __name__ == "__main__":
    main()
