"""Embedded default: run a tiny random BEiT-3 on a generated image and caption and show what it computes.

No downloads, no data to fetch. The full end-to-end demo (tokenizers, pretraining, fine-tuning)
replaces this once its pieces exist; for now this shows the backbone's inputs, routing and outputs.

    python tasks/demo.py [--preset beit3_tiny_patch16_224] [--seed 0]
"""

import argparse

import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2 as T

from beit3 import Beit3Config, Beit3Model


def draw_scene(size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (20, 24, 40))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 30, 40, 62), fill=(220, 40, 40))
    draw.rectangle((56, 30, 88, 62), fill=(40, 90, 220))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="beit3_tiny_patch16_224")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    config = Beit3Config.from_preset(args.preset)
    model = Beit3Model(config).eval()
    caption = "a red circle on the left and a blue square on the right"
    preprocess = T.Compose([T.ToImage(), T.Resize((config.image_size, config.image_size), interpolation=T.InterpolationMode.BICUBIC),
                            T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3)])
    pixel_values = preprocess(draw_scene()).unsqueeze(0)
    # Stand-in ids (one per byte, past the special ids) until the SentencePiece tokenizer lands.
    input_ids = torch.tensor([[config.bos_token_id] + [4 + b for b in caption.encode()] + [config.eos_token_id]])

    with torch.no_grad():
        fused = model(pixel_values=pixel_values, input_ids=input_ids)
        image_only = model(pixel_values=pixel_values).last_hidden_state
        text_only = model(input_ids=input_ids).last_hidden_state
    hidden = fused.last_hidden_state
    print(f"model: {args.preset} ({config.layout} layout), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random weights")
    print(f"image: generated {config.image_size}x{config.image_size} scene -> {config.num_patches} patches + CLS")
    print(f"caption: {caption!r} -> {input_ids.shape[1]} tokens")
    print(f"image+text: last_hidden_state {tuple(hidden.shape)}, text starts at index {fused.text_start}")
    print(f"image only: {tuple(image_only.shape)}; text only: {tuple(text_only.shape)}")
    image_cls, text_bos = hidden[0, 0], hidden[0, fused.text_start]
    print(f"image CLS . text BOS cosine (fused): {torch.cosine_similarity(image_cls, text_bos, dim=0).item():+.4f}")
    print(f"image CLS changes when the caption is attended: {(image_cls - image_only[0, 0]).norm().item():.4f} (L2)")


if __name__ == "__main__":
    main()
