"""Train a visual tokenizer (VQ-KD of BEiT v2, or a BEiT v1 style dVAE) on a folder of images.

    python tokenizers/train_visual_tokenizer.py --kind vqkd --config configs/tokenizers/vqkd_tiny.yaml [--set train.max_steps=500]
    deepspeed --num_gpus 8 tokenizers/train_visual_tokenizer.py --kind vqkd --config configs/tokenizers/vqkd_base.yaml

Progress bar, metrics.jsonl (loss, codebook usage, perplexity), checkpoints and resume come from the
shared engine; the trained tokenizer is written to output_dir/tokenizer (VisualTokenizer.from_pretrained).
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("vqkd", "dvae"), required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from beit3.data.pretraining import PretrainingBatches, load_sources
    from beit3.training.config import load_config
    from beit3.training.engine import Engine, TrainSettings, load_deepspeed_json, record_run_config
    from beit3.training.tokenizer_training import build_visual_tokenizer, visual_tokenizer_step

    try:
        config = load_config(args.config, args.set, declared={"train": TrainSettings.field_names()})
    except (KeyError, ValueError, OSError) as error:
        sys.exit(f"error: {error.args[0] if isinstance(error, KeyError) else error}")
    settings = TrainSettings.from_config(config["train"])
    data = config["data"]
    sources = load_sources(images=data["images"])
    torch.manual_seed(settings.seed)
    model = build_visual_tokenizer(args.kind, config["preset"], config.get("overrides"), config.get("teacher_checkpoint"))
    try:
        deepspeed_json = load_deepspeed_json(data.get("deepspeed"), settings, ROOT)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    engine = Engine(model, settings, deepspeed_json)
    try:
        record_run_config(engine, config)  # a resume with another config stops here
    except ValueError as error:
        sys.exit(f"error: {error}")

    def make_loader(start_step: int, num_steps: int):
        batches = PretrainingBatches(sources, {"image": data["batch_size"]}, None, model.image_size, model.patch_size,
                                     crop_scale=tuple(data.get("crop_scale", (0.08, 1.0))), seed=settings.seed, rank=engine.rank,
                                     world_size=engine.world_size, start_step=start_step, num_steps=num_steps)
        return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=settings.num_workers,
                                           prefetch_factor=4 if settings.num_workers else None)

    records = engine.fit(visual_tokenizer_step(), make_loader, samples_per_step=data["batch_size"])
    if engine.rank == 0:
        tokenizer = engine.module.module
        tokenizer.save_pretrained(engine.output_dir / "tokenizer")
        save_pictures(tokenizer, engine.output_dir, batches_for_pictures(sources, model, settings.seed))
        if records:
            last = records[-1]
            print(f"visual tokenizer done: step {last['step']}, loss {last['loss']:.4f}, codebook usage {last['codebook_usage']:.3f}, "
                  f"perplexity {last['perplexity']:.1f}; saved to {engine.output_dir / 'tokenizer'}")
    if not records and engine.rank == 0:
        print(f"nothing to do: {engine.output_dir} already holds a run of {settings.max_steps} steps", file=sys.stderr)


def batches_for_pictures(sources, model, seed: int) -> torch.Tensor:
    """Eight center views (the tokenizer's [0, 1] input) of the first training images."""
    from beit3.data.common import load_rgb
    from beit3.data.images import tokenizer_transform

    transform = tokenizer_transform(model.image_size)
    return torch.stack([transform(load_rgb(path)) for path in sources["image"]["path"][:8]])


def save_pictures(tokenizer, output_dir: Path, images: torch.Tensor) -> None:
    """code_maps.png, codebook_usage.png and, for a dVAE, reconstructions.png in output_dir."""
    from beit3.training.engine import read_run_log
    from beit3.visualization import save_code_maps, save_codebook_usage, save_reconstructions

    tokenizer.eval()
    images = images.to(next(tokenizer.parameters()).device)
    with torch.no_grad():
        codes = tokenizer.get_codebook_indices(images)
        grid = images.shape[-1] // tokenizer.patch_size
        save_code_maps(images.cpu(), codes.cpu(), grid, output_dir / "code_maps.png", tokenizer.codebook_size)
        if tokenizer.kind == "dvae":
            save_reconstructions(images.cpu(), tokenizer.decode(codes).cpu(), output_dir / "reconstructions.png")
    records = read_run_log(output_dir / "metrics.jsonl")
    save_codebook_usage([r["step"] for r in records], [r["codebook_usage"] for r in records], output_dir / "codebook_usage.png",
                        [r["perplexity"] for r in records])


if __name__ == "__main__":
    main()
