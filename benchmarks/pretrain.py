"""Pretraining step speed, side by side in one process: DeepSpeed against a plain torch loop, at each precision
asked for (bf16 autocast in the plain loop, DeepSpeed's bf16/fp16 in the engine), on this process's device (the
GPU of its local rank where there is one, else the CPU).

Each side trains its own copy of the same masked data modeling model on the same fixed batch, on the device
(images, texts and pairs; the data pipeline is left out, its cost shows as ``data_wait_share`` in every run's
metrics.jsonl). Blocks of steps alternate which side runs first; on a GPU each block is timed between
synchronizations. Figures are medians of samples/s.

    python benchmarks/pretrain.py [--preset beit3_tiny_patch16_224] [--batch 8] [--steps 5] [--reps 3]
                                  [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings

import torch

from beit3 import Beit3Config
from beit3.modeling_heads import Beit3ForMaskedDataModeling
from beit3.training.distributed import setup_distributed
from beit3.training.engine import Engine, to_device
from beit3.training.optimizer import build_optimizer
from beit3.training.settings import TrainSettings

warnings.filterwarnings("ignore")


def fixed_batch(config: Beit3Config, batch: int, text: int = 32) -> dict:
    patches = config.num_patches
    ids = torch.randint(3, config.vocab_size, (batch, text))
    labels = torch.where(torch.rand(batch, text) < 0.3, ids, -100)
    masked = torch.rand(batch, patches) < 0.4
    # The masked counts, as PretrainingBatches gives them: the model gathers by them without a host sync.
    text_part = {"input_ids": ids, "labels": labels, "num_masked_text_tokens": int((labels != -100).sum())}
    return {
        "image": {
            "pixel_values": torch.randn(batch, 3, config.image_size, config.image_size),
            "bool_masked_pos": masked,
            "image_labels": torch.randint(0, config.visual_vocab_size, (batch, patches)),
            "num_masked_patches": int(masked.sum()),
        },
        "text": text_part,  # no padding: no attention_mask, as PretrainingBatches gives such a batch
        "pair": {"pixel_values": torch.randn(batch, 3, config.image_size, config.image_size), **text_part},
    }


def loss_of(model, batch) -> torch.Tensor:
    return sum(model(**batch[kind]).loss for kind in ("image", "text", "pair"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="beit3_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=8, help="samples of each kind per step")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--output-dir", help="where the engines write their run folders (default: a temporary folder, removed at exit)"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16", "fp16"),
        default=["fp32"],
        help="the precisions to time (bf16 is emulated, about 0.1x of fp32, on a CPU without native bf16)",
    )
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="beit3-pretrain-benchmark-")  # (its finalizer removes it at exit)
    output_dir = args.output_dir or scratch.name
    torch.manual_seed(0)
    config = Beit3Config.from_preset(args.preset, visual_vocab_size=8192)
    distributed = setup_distributed()
    device = distributed[2]
    batch = to_device(fixed_batch(config, args.batch), device)
    samples = 3 * args.batch * args.steps
    base = Beit3ForMaskedDataModeling(config)

    def synchronize() -> None:  # a GPU runs asynchronously: time what it has done, not what it was given
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sides = {}
    for precision in args.precision:
        settings = TrainSettings(
            output_dir=f"{output_dir}/{precision}",
            max_steps=10**6,
            save_every=10**6,
            num_workers=0,
            precision=precision,
        )
        plain_model = copy.deepcopy(base).to(device)
        plain_optimizer = build_optimizer(plain_model, settings)
        engine = Engine(copy.deepcopy(base), settings, None, distributed)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

        def plain_step(model=plain_model, optimizer=plain_optimizer, low=low, scaler=scaler, settings=settings):
            with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
                loss = loss_of(model, batch)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.gradient_clipping)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        def deepspeed_step(engine=engine):
            loss = loss_of(engine.module, batch)
            engine.module.backward(loss)
            engine.module.step()

        sides[f"plain {precision}"] = plain_step
        sides[f"deepspeed {precision}"] = deepspeed_step
        stage = engine.layout["zero_stage"]
    for run in sides.values():  # warm-up
        run()
    rates = {name: [] for name in sides}
    for rep in range(args.reps):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                sides[name]()
            synchronize()
            rates[name].append(samples / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"{args.preset} on {device} ({threads}): {args.batch} images + {args.batch} texts + {args.batch} pairs per step"
    )
    for name, value in median.items():
        print(f"  {name:22s} {value:8.2f} samples/s")
    for precision in args.precision:
        overhead = 100 * (median[f"plain {precision}"] / median[f"deepspeed {precision}"] - 1)
        print(
            f"DeepSpeed (ZeRO-{stage}, what one process runs) vs plain loop, {precision}: {overhead:+.1f}% (goal <= 10%)"
        )
    for precision in set(args.precision) - {"fp32"}:
        if "fp32" in args.precision:
            ratio = median[f"plain {precision}"] / median["plain fp32"]
            print(f"{precision} autocast vs fp32: {ratio:.2f}x (goal >= 2x where {precision} is native)")


if __name__ == "__main__":
    main()
