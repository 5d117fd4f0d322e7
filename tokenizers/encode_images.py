"""Encode a folder of images (searched recursively: jpg, jpeg, png, webp, bmp) into visual-token codes.

    python tokenizers/encode_images.py --tokenizer runs/tiny/vqkd/tokenizer --images photos/ --output photos_codes/ --png 8
    python tokenizers/encode_images.py --tokenizer vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth --images photos/ --output codes/

Each image is resized (shorter side, bicubic) and center-cropped to the tokenizer's image size (or
--image-size), as RGB in [0, 1]. Writes OUT/codes.safetensors (tensor "codes", (N, patches), int16
when the ids fit) and OUT/index.jsonl ({"path": path relative to --images, "row": i} per line);
read them back with beit3.data.images.read_codes. Unreadable images are reported on stderr and
skipped. --png N also writes OUT/code_maps.png with the first N images beside their code maps.
"""

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokenizer", required=True, help="a save_pretrained tokenizer folder or a released VQ-KD .pth"
    )
    parser.add_argument("--images", required=True, help="folder of images, searched recursively")
    parser.add_argument("--output", required=True, help="folder for codes.safetensors, index.jsonl and code_maps.png")
    parser.add_argument("--image-size", type=int, default=None, help="crop side in pixels (default: the tokenizer's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader processes reading images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--png", type=int, default=0, metavar="N", help="write code_maps.png of the first N images")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.png < 0:
        parser.error(f"--batch-size must be at least 1 and --png at least 0; got {args.batch_size} and {args.png}")

    from tqdm import tqdm

    from beit3.data.images import encode_images, list_images, write_codes
    from beit3.visual_tokenizers import VisualTokenizer

    images = Path(args.images)
    paths = list_images(images)
    if not paths:
        parser.error(f"no images (jpg, jpeg, png, webp, bmp) below {images}")
    tokenizer = VisualTokenizer.from_pretrained(args.tokenizer)
    image_size = args.image_size or tokenizer.image_size

    def report(path: Path, reason: str) -> None:
        tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

    encoded = encode_images(
        tokenizer,
        paths,
        image_size,
        args.batch_size,
        args.device,
        args.num_workers,
        keep_images=args.png,
        on_skip=report,
    )
    if not encoded.paths:
        print(f"error: none of the {len(paths)} images below {images} could be read; nothing written.", file=sys.stderr)
        return 1
    output = Path(args.output)
    grid = encoded.grid
    write_codes(
        output,
        encoded.codes,
        [p.relative_to(images).as_posix() for p in encoded.paths],
        metadata={
            "tokenizer": args.tokenizer,
            "kind": tokenizer.kind,
            "image_size": image_size,
            "grid": f"{grid[0]}x{grid[1]}",
            "codebook_size": tokenizer.codebook_size,
        },
    )
    written = [output / "codes.safetensors", output / "index.jsonl"]
    if args.png > 0:
        from beit3.visualization import save_code_maps

        shown = len(encoded.first_images)
        written.append(
            save_code_maps(
                encoded.first_images,
                encoded.codes[:shown],
                grid,
                output / "code_maps.png",
                tokenizer.codebook_size,
                max_images=shown,
            )
        )
    used = encoded.codes.unique().numel()
    print(
        f"encoded {len(encoded.paths)} images into codes {tuple(encoded.codes.shape)} on a {grid[0]}x{grid[1]} grid "
        f"({used} of {tokenizer.codebook_size} codes used); skipped {len(encoded.skipped)} unreadable; "
        f"wrote {', '.join(str(p) for p in written)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
