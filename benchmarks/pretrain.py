"""Pretraining step speed, side by side in one process: DeepSpeed against a plain torch loop, and
bf16 autocast against fp32.

Each side trains its own copy of the same masked data modeling model on the same fixed batch
(images, texts and pairs; the data pipeline is left out, its cost shows as ``data_wait_share`` in
every run's metrics.jsonl). Blocks of steps alternate which side runs first; figures are medians
of samples/s.

    python benchmarks/pretrain.py [--preset beit3_tiny_patch16_224] [--batch 8] [--steps 5] [--reps 3] [--no-bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from beit3 import Beit3Config
from beit3.modeling_heads import Beit3ForMaskedDataModeling
from beit3.training.distributed import setup_distributed
from beit3.training.engine import Engine
from beit3.training.optimizer import build_optimizer
from beit3.training.settings import TrainSettings

warnings.filterwarnings("ignore")


def fixed_batch(config: Beit3Config, batch: int, text: int = 32) -> dict:
    patches = config.num_patches
    ids = torch.randint(3, config.vocab_size, (batch, text))
    labels = torch.where(torch.rand(batch, text) < 0.3, ids, -100)
    return {
        "image": {
            "pixel_values": torch.randn(batch, 3, config.image_size, config.image_size),
            "bool_masked_pos": torch.rand(batch, patches) < 0.4,
            "image_labels": torch.randint(0, config.visual_vocab_size, (batch, patches)),
        },
        "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
        "pair": {
            "pixel_values": torch.randn(batch, 3, config.image_size, config.image_size),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
        },
    }


def loss_of(model, batch) -> torch.Tensor:
    return sum(model(**batch[kind]).loss for kind in ("image", "text", "pair"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="beit3_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=8, help="samples of each kind per step")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output-dir", default="/tmp/beit3-pretrain-benchmark")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 side (slow where bf16 is emulated)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Beit3Config.from_preset(args.preset, visual_vocab_size=8192)
    batch = fixed_batch(config, args.batch)
    samples = 3 * args.batch * args.steps
    settings = TrainSettings(output_dir=args.output_dir, max_steps=10**6, save_every=10**6, num_workers=0)

    base = Beit3ForMaskedDataModeling(config)
    plain_model = copy.deepcopy(base)
    plain_optimizer = build_optimizer(plain_model, settings)
    engine = Engine(copy.deepcopy(base), settings, None, setup_distributed())

    def plain_step(precision: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of(plain_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), settings.gradient_clipping)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    def deepspeed_step() -> None:
        loss = loss_of(engine.module, batch)
        engine.module.backward(loss)
        engine.module.step()

    sides = {"plain fp32": lambda: plain_step("fp32"), "deepspeed fp32": deepspeed_step}
    if not args.no_bf16:
        sides["plain bf16 autocast"] = lambda: plain_step("bf16")
    for run in sides.values():  # warm-up
        run()
    rates = {name: [] for name in sides}
    for rep in range(args.reps):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                sides[name]()
            rates[name].append(samples / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"{args.preset}: {args.batch} images + {args.batch} texts + {args.batch} pairs per step, {torch.get_num_threads()} threads"
    )
    for name, value in median.items():
        print(f"  {name:22s} {value:8.2f} samples/s")
    print(
        f"DeepSpeed (ZeRO-{engine.layout['zero_stage']}, what one process runs) overhead vs plain loop: {100 * (median['plain fp32'] / median['deepspeed fp32'] - 1):+.1f}% (goal <= 10%)"
    )
    if "plain bf16 autocast" in median:
        print(
            f"bf16 autocast vs fp32: {median['plain bf16 autocast'] / median['plain fp32']:.2f}x (goal >= 2x on a CPU with native bf16)"
        )


if __name__ == "__main__":
    main()
