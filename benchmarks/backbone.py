"""Our BEiT-3 backbone against torchscale's BEiT3 (Microsoft's reference), side by side in one process.

Both models hold the same base weights (torchscale's random init, converted with beit3.convert).
Input: batch 8 of a 224 px image + 64 text tokens (some padded). Modes: inference (no_grad) and
training (forward + backward); precisions: fp32 and torch.autocast("cpu", bfloat16). Calls are
interleaved and alternate which model runs first; the figures are medians.

The same run measures this machine's matmul peak with a model-shaped matmul (2088 x 768 by
768 x 3072) in fp32 and bf16, and counts model FLOPs as (8 D^2 + 4 D F + 4 L D) per token per layer
(training = 3x inference), to print each model's share of the peak.

    python benchmarks/backbone.py [--reps 5] [--preset beit3_base_patch16_224] [--device cpu|cuda]
    python benchmarks/backbone.py --profile bf16,inference   # where our model's time goes (torch.profiler)
    python benchmarks/backbone.py --compile                  # torch.compile(ours) against eager ours, inference
    python benchmarks/backbone.py --timm [--batch 8]         # image only: ours against timm's beit3 VisionTransformer

With ``--timm`` the comparison is on images alone, fp32, against timm's ``beit3_*`` VisionTransformer
(``forward_features``) holding the same weights (``beit3.convert.beit3_to_timm``): the released layout without
the final LayerNorm, as timm's classifier is built; inference and training, alternated, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from beit3 import Beit3Config, Beit3Model
from beit3.convert import official_to_beit3

warnings.filterwarnings("ignore")


def torchscale_model(config: Beit3Config):
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    args = EncoderConfig(
        img_size=config.image_size,
        patch_size=config.patch_size,
        vocab_size=config.vocab_size,
        multiway=True,
        layernorm_embedding=False,
        normalize_output=config.final_layernorm,
        no_output_layer=True,
        encoder_embed_dim=config.hidden_size,
        encoder_attention_heads=config.num_attention_heads,
        encoder_ffn_embed_dim=config.intermediate_size,
        encoder_layers=config.num_hidden_layers,
    )
    return BEiT3(args)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str, reps: int) -> float:
    """FLOP/s of a (2088 x 768) @ (768 x 3072) matmul through F.linear (the kernel a Linear layer
    uses), median of ``reps`` timed batches of 10."""
    a = torch.randn(2088, 768, device=device, dtype=dtype)
    weight = torch.randn(3072, 768, device=device, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, weight)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(a, weight)
        sync(device)
        times.append((time.perf_counter() - start) / 10)
    return 2 * 2088 * 768 * 3072 / statistics.median(times)


def model_flops(config: Beit3Config, batch: int, seq: int, training: bool) -> float:
    d, f = config.hidden_size, config.intermediate_size
    per_token_layer = 8 * d * d + 4 * d * f + 4 * seq * d
    return per_token_layer * batch * seq * config.num_hidden_layers * (3 if training else 1)


def compare_compiled(ours: Beit3Model, inputs: dict, device: str, reps: int, precisions: list[str]) -> None:
    """Inference of torch.compile(ours) against eager ours on the same input, interleaved, alternating the order."""
    ours.eval()
    compiled = torch.compile(
        ours, fullgraph=True
    )  # fullgraph: a graph break in the backbone is an error, not a slowdown
    autocast_device = "cuda" if device == "cuda" else "cpu"
    print(f"{'precision':9} {'eager s':>8} {'compiled s':>11} {'speedup':>8} {'compile s':>10} {'max |diff|':>11}")
    for precision in precisions:
        context = lambda: torch.autocast(autocast_device, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731

        def step(model):
            sync(device)
            start = time.perf_counter()
            with torch.no_grad(), context():
                out = model(**inputs).last_hidden_state
            sync(device)
            return time.perf_counter() - start, out

        compile_s, compiled_out = step(compiled)  # the first call compiles
        _, eager_out = step(ours)
        times = {"eager": [], "compiled": []}
        for rep in range(reps):
            for name in ("eager", "compiled") if rep % 2 == 0 else ("compiled", "eager"):
                times[name].append(step(ours if name == "eager" else compiled)[0])
        eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
        diff = (compiled_out.float() - eager_out.float()).abs().max().item()
        print(
            f"{precision:9} {eager_s:8.3f} {compiled_s:11.3f} {eager_s / compiled_s:7.2f}x {compile_s:10.1f} {diff:11.2e}",
            flush=True,
        )


def compare_timm(config: Beit3Config, batch: int, device: str, reps: int, modes: list[str]) -> None:
    """Image-only speed of our backbone against timm's VisionTransformer with the same weights (see the docstring)."""
    import timm

    from beit3.convert import beit3_to_timm

    config = Beit3Config.from_dict({**config.to_dict(), "final_layernorm": False})
    ours = Beit3Model(config).to(device)
    name = {1024: "beit3_large_patch16_224", 1408: "beit3_giant_patch14_224"}.get(
        config.hidden_size, "beit3_base_patch16_224"
    )
    theirs = timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        fc_norm=False,
        global_pool="",
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
    ).to(device)
    missing, unexpected = theirs.load_state_dict(beit3_to_timm(ours.state_dict(), config), strict=False)
    assert not unexpected and set(missing) <= {"norm.weight", "norm.bias"}, (missing, unexpected)
    theirs.norm = torch.nn.Identity()  # ours has no final norm either in this layout
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    sides = {
        "ours": lambda: ours(pixel_values=pixel_values).last_hidden_state,
        "timm": lambda: theirs.forward_features(pixel_values),
    }
    ours.eval(), theirs.eval()
    with torch.no_grad():
        difference = (sides["ours"]() - sides["timm"]()).abs().max().item()
    print(
        f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}, timm {timm.__version__}; "
        f"{name} layout, batch {batch} images of {config.image_size} px, fp32; outputs differ by at most {difference:.1e}"
    )
    for mode in modes:
        training = mode == "training"
        ours.train(training), theirs.train(training)

        def step(fn):
            sync(device)
            start = time.perf_counter()
            if training:
                fn().mean().backward()
            else:
                with torch.no_grad():
                    fn()
            sync(device)
            return time.perf_counter() - start

        for fn in sides.values():  # warm-up
            step(fn)
        times = {side: [] for side in sides}
        for rep in range(reps):
            for side in list(sides) if rep % 2 == 0 else list(reversed(sides)):
                times[side].append(step(sides[side]))
        ours_s, timm_s = statistics.median(times["ours"]), statistics.median(times["timm"])
        print(f"  {mode:9} ours {ours_s:.3f} s, timm {timm_s:.3f} s: ours at {timm_s / ours_s:.2f}x timm's speed")
        ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="beit3_base_patch16_224")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument(
        "--profile", metavar="PRECISION,MODE", help="profile one forward of our model instead of timing"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time torch.compile(ours) against eager ours (inference) instead of torchscale",
    )
    parser.add_argument("--timm", action="store_true", help="images only, ours against timm's beit3 (fp32)")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)

    config = Beit3Config.from_preset(args.preset)
    if args.timm:
        compare_timm(config, args.batch, device, args.reps, args.modes.split(","))
        return
    reference = torchscale_model(config)
    official = {k: v.float() for k, v in reference.state_dict().items()}
    ours = Beit3Model(config, use_mask_token=True)  # the official layout holds one; only masked image modeling reads it
    ours.load_state_dict(official_to_beit3(official, config))
    reference.to(device)
    ours.to(device)

    batch, text = args.batch, args.text
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    input_ids = torch.randint(3, 60000, (batch, text), device=device)
    lengths = torch.linspace(text // 2, text, batch).long()
    attention_mask = (torch.arange(text)[None] < lengths[:, None]).long().to(device)
    padding = attention_mask == 0
    seq = 1 + config.num_patches + text

    def run_ours():
        return ours(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def run_reference():
        return reference(textual_tokens=input_ids, visual_tokens=pixel_values, text_padding_position=padding)[
            "encoder_out"
        ]

    autocast_device = "cuda" if device == "cuda" else "cpu"
    if args.compile:
        print(
            f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}; batch {batch}, "
            f"{config.num_patches + 1} image tokens + {text} text tokens, {config.num_hidden_layers} layers, hidden {config.hidden_size}"
        )
        compare_compiled(
            ours,
            {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask},
            device,
            args.reps,
            args.precisions.split(","),
        )
        return
    if args.profile:
        precision, mode = args.profile.split(",")
        ours.train(mode == "training")
        with (
            torch.profiler.profile() as profiler,
            torch.autocast(autocast_device, dtype=torch.bfloat16, enabled=precision == "bf16"),
        ):
            out = run_ours()
            if mode == "training":
                out.float().mean().backward()
        print(
            profiler.key_averages().table(
                sort_by="self_cpu_time_total" if device == "cpu" else "self_cuda_time_total", row_limit=12
            )
        )
        return
    peaks = {
        "fp32": matmul_peak(torch.float32, device, args.reps),
        "bf16": matmul_peak(torch.bfloat16, device, args.reps),
    }
    print(f"device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print(
        f"matmul peak (2088x768 @ 768x3072): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s "
        f"(bf16/fp32 {peaks['bf16'] / peaks['fp32']:.2f}x)"
    )
    if device == "cpu" and peaks["bf16"] < peaks["fp32"]:
        print(
            "note: bf16 matmuls are slower than fp32 here: this CPU has no native bf16 (avx512_bf16/AMX), so PyTorch "
            "emulates them; the bf16 rows measure that emulation, not a bf16-capable CPU."
        )
    print(
        f"input: batch {batch}, {config.num_patches + 1} image tokens + {text} text tokens ({int(padding.sum())} padded), "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}"
    )

    with torch.no_grad():  # bf16 autocast against fp32, same weights and input
        exact = run_ours().float()
        with torch.autocast(autocast_device, dtype=torch.bfloat16):
            low = run_ours().float()
        ref_exact = run_reference().float()
    valid = torch.cat(
        [torch.ones(batch, config.num_patches + 1, dtype=torch.bool, device=device), attention_mask.bool()], 1
    )
    print(
        f"ours vs torchscale, fp32: max |diff| {(exact - ref_exact)[valid].abs().max().item():.2e}; "
        f"ours bf16 autocast vs fp32: max |diff| {(low - exact)[valid].abs().max().item():.3f} "
        f"(relative to the output's std {exact[valid].std().item():.3f}: {(low - exact)[valid].abs().max().item() / exact[valid].std().item():.3f})"
    )

    header = f"{'precision':9} {'mode':9} {'ours s':>8} {'torchscale s':>13} {'speedup':>8} {'ours %peak':>10} {'ts %peak':>9}"
    print(header)
    print("-" * len(header))
    for precision in args.precisions.split(","):
        for mode in args.modes.split(","):
            training = mode == "training"
            ours.train(training)
            reference.train(training)

            def step(fn):
                context = (
                    torch.autocast(autocast_device, dtype=torch.bfloat16)
                    if precision == "bf16"
                    else torch.autocast(autocast_device, enabled=False)
                )
                sync(device)
                start = time.perf_counter()
                if training:
                    with context:
                        out = fn()
                    out.float().mean().backward()
                else:
                    with torch.no_grad(), context:
                        fn()
                sync(device)
                return time.perf_counter() - start

            for fn in (run_ours, run_reference):  # warm-up
                step(fn)
            times = {run_ours: [], run_reference: []}
            for rep in range(args.reps):
                order = (run_ours, run_reference) if rep % 2 == 0 else (run_reference, run_ours)
                for fn in order:
                    times[fn].append(step(fn))
            ours_s, ref_s = statistics.median(times[run_ours]), statistics.median(times[run_reference])
            flops = model_flops(config, batch, seq, training)
            peak = peaks[precision]
            print(
                f"{precision:9} {mode:9} {ours_s:8.3f} {ref_s:13.3f} {ref_s / ours_s:7.2f}x {100 * flops / ours_s / peak:9.1f}% "
                f"{100 * flops / ref_s / peak:8.1f}%",
                flush=True,
            )
            ours.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
