"""Does the pretraining data pipeline keep up with the model? Side by side in one process.

For a model config and its batch sizes (the demo's by default), on a generated shapes world:
  data      samples/s of the pipeline alone in this process, i.e. one loader worker: decode, two views,
            block masks, tokenization, MLM masking, hard negatives (``PretrainingBatches``)
  model     samples/s of the masked data modeling step alone (forward, backward, AdamW) on batches
            already in memory, with the visual tokenizer's codes computed as in training
  end2end   samples/s of the same step fed by a DataLoader with --workers workers, and the share of
            step time spent waiting for data
Blocks of steps alternate which of model and end2end runs first; figures are medians. The ratio
end2end / model is the pipeline's cost: 1.0 means the model never waits.

    python benchmarks/data.py                                   # the demo's model and batches
    python benchmarks/data.py --preset beit3_base_patch16_224 --image-size 224 --batch 8,8,8 --steps 3
    python benchmarks/data.py --streaming                       # the same world read from webdataset shards
    python benchmarks/data.py --processes 2                     # as the demo runs: 2 ranks of 1 thread, 1 worker each
    python benchmarks/data.py --preset beit3_base_patch16_224 --image-size 224 --precision bf16   # on a GPU node

On a machine with a GPU the model steps run there (rank r of --processes on GPU r), the pipeline on the CPU as in
training; the last lines say how many loader workers per process keep up with the model's rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def world(folder: Path, images: int, size: int, streaming: bool) -> dict:
    from beit3 import train_sentencepiece
    from beit3.data.synthetic import write_shapes_world

    paths = write_shapes_world(folder / "data", images, size=size)
    train_sentencepiece(folder / "tok", vocab_size=36, files=[paths["texts"]], model_max_length=32, quiet=True)
    sources = {"images": str(paths["images"]), "texts": [str(paths["texts"])], "pairs": [str(paths["pairs"])]}
    if streaming:
        for kind, flag, path in (("pairs", "--pairs", paths["pairs"]), ("images", "--images", paths["images"])):
            printed = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "tasks/make_shards.py"),
                    flag,
                    str(path),
                    "--output",
                    str(folder / f"shards/{kind}-%03d.tar"),
                    "--shard-size",
                    "64",
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            pattern = printed.split(": ", 1)[1].split()[0]
            sources[kind] = [pattern] if kind == "pairs" else pattern
    return sources


def measure(args, sources_paths: dict, tokenizer_path: Path, rank: int = 0, barrier=None) -> dict:
    """One process's figures {data, model, end2end, wait: [per block]}; with ``barrier`` (a function), one of
    ``args.processes`` ranks that start every timed block together, so that they share the cores as training does."""
    from transformers import AutoTokenizer

    from beit3.data.pretraining import PretrainingBatches, StreamingPretrainingBatches
    from beit3.data.sources import Shards, load_sources
    from beit3.modeling_heads import Beit3ForMaskedDataModeling
    from beit3.training.engine import to_device
    from beit3.training.pretraining import PretrainingData, masked_data_modeling_step
    from beit3.training.runner import autocast
    from beit3.visual_tokenizers import VQKD, VQKDConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    config = yaml.safe_load((ROOT / args.config).read_text())
    model_section, data = config["model"], config["data"]
    model_config, sizes = model_setup(args, model_section, data)
    itm = float(data.get("itm_negatives", 0.0)) if model_config.itm_weight else 0.0
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    visual = VQKD(
        VQKDConfig.from_preset("vqkd_tiny", image_size=model_config.image_size, patch_size=model_config.patch_size)
    ).eval()
    model_config.visual_vocab_size, model_config.vocab_size = visual.codebook_size, len(tokenizer)
    model_config.mask_token_id = tokenizer.mask_token_id
    sources = load_sources(**sources_paths, streaming=args.streaming)
    kind = StreamingPretrainingBatches if any(isinstance(s, Shards) for s in sources.values()) else PretrainingBatches
    section = PretrainingData.from_config({**data, "batch_size": sizes, "itm_negatives": itm})
    options = section.batch_options(model_config, visual.image_size)

    def batches(workers: int, start: int, count: int):
        extra = {"num_workers": workers} if kind is StreamingPretrainingBatches else {}
        return kind(
            sources,
            tokenizer,
            options,
            start_step=start,
            num_steps=count,
            rank=rank,
            world_size=args.processes,
            **extra,
        )

    samples_per_step = sum(sizes.values())

    def together():
        if barrier is not None:
            barrier()

    def train_step(batch):
        batch = to_device({k: v for k, v in batch.items() if k not in ("counts", "data_state")}, device)
        with autocast(args.precision, device):
            loss, _ = step(model, batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            loss.item()  # the step's kernels are done before the clock reads

    def data_only(start):
        source = iter(torch.utils.data.DataLoader(batches(0, start, args.steps), batch_size=None, num_workers=0))
        together()
        begin = time.perf_counter()
        cached = [next(source) for _ in range(args.steps)]
        return samples_per_step * args.steps / (time.perf_counter() - begin), cached

    def model_only(cached):
        together()
        begin = time.perf_counter()
        for batch in cached:
            train_step(batch)
        return samples_per_step * len(cached) / (time.perf_counter() - begin)

    def end_to_end(start):
        loader = torch.utils.data.DataLoader(
            batches(args.workers, start, args.steps + 2),
            batch_size=None,
            num_workers=args.workers,
            prefetch_factor=4 if args.workers else None,
        )
        source = iter(loader)
        train_step(next(source))  # the workers' start-up is not a step
        train_step(next(source))
        together()
        waited, begin = 0.0, time.perf_counter()
        for _ in range(args.steps):
            before = time.perf_counter()
            batch = next(source)
            waited += time.perf_counter() - before
            train_step(batch)
        seconds = time.perf_counter() - begin
        return samples_per_step * args.steps / seconds, waited / seconds

    _, warm = data_only(0)
    if args.data_only:
        return {"data": [data_only(1000 * (rep + 1))[0] for rep in range(args.reps)]}
    # The model comes only now: --data-only needs none.
    device = (
        torch.device(f"cuda:{rank % torch.cuda.device_count()}") if torch.cuda.is_available() else torch.device("cpu")
    )
    model = Beit3ForMaskedDataModeling(model_config).train().to(device)
    visual = visual.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = masked_data_modeling_step(visual)
    model_only(warm[:2])
    figures = {"data": [], "model": [], "end2end": [], "wait": []}
    for rep in range(args.reps):
        rate, cached = data_only(1000 * (rep + 1))
        figures["data"].append(rate)
        sides = [("model", lambda: model_only(cached)), ("end2end", lambda: end_to_end(1000 * (rep + 1) + 500))]
        for name, side in sides if rep % 2 == 0 else sides[::-1]:
            result = side()
            if name == "end2end":
                figures["end2end"].append(result[0])
                figures["wait"].append(result[1])
            else:
                figures["model"].append(result)
    return figures


def model_setup(args, model_section: dict, data: dict):
    from beit3 import Beit3Config

    overrides = dict(model_section.get("overrides", {})) if not args.preset else {}
    if args.image_size:
        overrides["image_size"] = args.image_size
    model_config = Beit3Config.from_preset(args.preset or model_section["preset"], **overrides)
    sizes = dict(zip(("image", "text", "pair"), map(int, args.batch.split(",")))) if args.batch else data["batch_size"]
    return model_config, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default="configs/pretrain/demo.yaml", help="model, batch sizes and data options from here"
    )
    parser.add_argument("--preset", help="another model preset (with --image-size)")
    parser.add_argument(
        "--image-size", type=int, help="the model's image size (and the generated images' with --preset)"
    )
    parser.add_argument("--batch", help="image,text,pair samples per step (default: the config's)")
    parser.add_argument("--images", type=int, default=512, help="generated images")
    parser.add_argument(
        "--world",
        help="the demo's run folder (runs/demo): its pretraining data and tokenizer instead of generated ones",
    )
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers of the end2end side (per process)")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run this many copies at once, as the ranks of a run on this machine (the demo: 2); rates are their sums",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads per process (default: torch's; with --processes, cores / processes)"
    )
    parser.add_argument("--streaming", action="store_true", help="read images and pairs from webdataset shards")
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast of the model step (bf16 on GPU)"
    )
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="only the pipeline's rate (e.g. a base model's, which a CPU trains slowly)",
    )
    parser.add_argument(
        "--model-rate",
        type=float,
        help="samples/s a process's model trains at elsewhere (e.g. on a GPU, from benchmarks/pretrain.py): "
        "also print the loader workers it needs",
    )
    parser.add_argument(
        "--rank-of", nargs=2, metavar=("FOLDER", "RANK"), help=argparse.SUPPRESS
    )  # (a rank of --processes)
    args = parser.parse_args()
    if args.processes > 1 and not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // args.processes)
    if args.rank_of:
        folder, rank = Path(args.rank_of[0]), int(args.rank_of[1])
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=args.processes
        )
        saved = json.loads((folder / "sources.json").read_text())
        figures = measure(args, saved["sources"], Path(saved["tokenizer"]), rank, barrier=torch.distributed.barrier)
        (folder / f"rank{rank}.json").write_text(json.dumps(figures))
        torch.distributed.destroy_process_group()
        return

    config = yaml.safe_load((ROOT / args.config).read_text())
    model_config, sizes = model_setup(args, config["model"], config["data"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.world:  # what tasks/demo.py wrote: the demo's own images, captions, pairs and tokenizer
            pretrain = Path(args.world) / "data" / "pretrain"
            sources_paths = {
                "images": str(pretrain / "images"),
                "texts": [str(pretrain / "captions.txt")],
                "pairs": [str(pretrain / "pairs.jsonl")],
            }
            tokenizer = Path(args.world) / "text-tokenizer"
        else:
            sources_paths = world(tmp, args.images, max(64, model_config.image_size), args.streaming)
            tokenizer = tmp / "tok"
        (tmp / "sources.json").write_text(json.dumps({"sources": sources_paths, "tokenizer": str(tokenizer)}))
        if args.processes == 1:
            per_rank = [measure(args, sources_paths, tokenizer)]
        else:  # N copies of this script as the ranks of one run, meeting at gloo barriers
            command = [sys.executable, __file__, *sys.argv[1:], "--rank-of", str(tmp)]
            ranks = [subprocess.Popen([*command, str(rank)]) for rank in range(args.processes)]
            if any(process.wait() for process in ranks):
                sys.exit(f"a benchmark process failed (exit codes {[process.returncode for process in ranks]})")
            per_rank = [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(args.processes)]
    # Rates add up over the ranks block by block (their blocks ran at the same time); the wait is their mean.
    figures = {
        name: [sum(values) / (len(per_rank) if name == "wait" else 1) for values in zip(*(r[name] for r in per_rank))]
        for name in per_rank[0]
    }
    median = {name: statistics.median(values) for name, values in figures.items()}
    print(
        json.dumps(
            {
                "preset": args.preset or config["model"]["preset"],
                "image_size": model_config.image_size,
                "batch": sizes,
                "streaming": args.streaming,
                "processes": args.processes,
                "workers": args.workers,
                "torch_threads": args.threads or torch.get_num_threads(),
                **{k: round(v, 3) for k, v in median.items()},
            }
        )
    )
    per_worker = median["data"] / args.processes
    if args.data_only:
        print(f"data alone {per_worker:.0f} samples/s per worker (median of {args.reps})")
    else:
        print(
            f"data alone {per_worker:.0f} samples/s per worker; model alone {median['model']:.0f}; end to end "
            f"{median['end2end']:.0f} with {args.workers} worker(s) per process x {args.processes} process(es) = "
            f"{median['end2end'] / median['model']:.2f} of the model-only rate, {100 * median['wait']:.0f}% of step time waiting "
            f"for data (medians of {args.reps})"
        )
    # The workers run the pipeline in parallel, each at about the one-worker rate, while the model trains.
    for label, rate in (("the model here", median.get("model", 0) / args.processes), ("--model-rate", args.model_rate)):
        if rate:
            print(f"loader workers per process to feed {label} ({rate:.0f} samples/s): {math.ceil(rate / per_worker)}")


if __name__ == "__main__":
    main()
