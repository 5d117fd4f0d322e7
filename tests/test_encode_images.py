"""tokenizers/encode_images.py end to end on a small folder (odd modes, a truncated file), and the
library behind it, beit3.data.images."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from beit3.data.images import encode_images, list_images, read_codes, write_codes
from beit3.visual_tokenizers import VQKD, VisualTokenizer, VQKDConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tokenizers" / "encode_images.py"


def noise(rng, height, width, channels=3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny VQ-KD tokenizer folder and an image folder; returns (root, {relative path: expected 8-bit RGB PIL image})."""
    root = tmp_path_factory.mktemp("encode")
    torch.manual_seed(0)
    VQKD(VQKDConfig.from_preset("vqkd_tiny")).save_pretrained(root / "tok")
    images = root / "images"
    (images / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}

    def add(relative, image, rgb=None, **save_args):
        image.save(images / relative, **save_args)
        with Image.open(images / relative) as written:  # what the file holds once decoded (JPEG is lossy)
            expected[relative] = rgb if rgb is not None else written.convert("RGB")

    add("rgb.png", Image.fromarray(noise(rng, 40, 56)))
    add("sub/gray.jpg", Image.fromarray(noise(rng, 48, 36, 1)[..., 0], "L"), quality=95)
    add("sub/deeper/rgba.PNG", Image.fromarray(noise(rng, 32, 32, 4), "RGBA"))
    add("palette.bmp", Image.fromarray(noise(rng, 36, 44)).quantize(16))
    add("cmyk.jpg", Image.fromarray(noise(rng, 40, 40, 4), "CMYK"), quality=95)
    eight_bit = noise(rng, 40, 40, 1)[..., 0]
    add(
        "sixteen.png", Image.fromarray(eight_bit.astype(np.uint16) * 256), rgb=Image.fromarray(eight_bit).convert("RGB")
    )
    add("photo.webp", Image.fromarray(noise(rng, 50, 40)), lossless=True)
    buffer = io.BytesIO()
    Image.fromarray(noise(rng, 64, 64)).save(buffer, "JPEG")
    (images / "sub" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "notes.txt").write_text("not an image")
    assert Image.open(images / "sixteen.png").mode.startswith("I")  # a real 16-bit file
    return root, expected


def reference_codes(tokenizer, expected: dict, relative_paths, size: int) -> torch.Tensor:
    """The codes by hand: torchvision's classic Resize (shorter side, bicubic) + CenterCrop + ToTensor."""
    preprocess = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
        ]
    )
    pixels = torch.stack([preprocess(expected[p]) for p in relative_paths])
    with torch.no_grad():
        return tokenizer.get_codebook_indices(pixels)


def test_script_encodes_the_folder_and_skips_the_broken_file(folder):
    root, expected = folder
    out = root / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--tokenizer",
            str(root / "tok"),
            "--images",
            str(root / "images"),
            "--output",
            str(out),
            "--batch-size",
            "3",
            "--png",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    broken = root / "images" / "sub" / "truncated.jpg"
    assert f"skipped {broken}" in result.stderr and "truncated" in result.stderr
    assert "encoded 7 images into codes (7, 16)" in result.stdout and "skipped 1 unreadable" in result.stdout

    codes = load_file(str(out / "codes.safetensors"))["codes"]
    assert codes.shape == (7, 16) and not codes.is_floating_point()
    assert codes.min() >= 0 and codes.max() < 64
    codes_back, index = read_codes(out)
    assert torch.equal(codes_back, codes.long()) and codes_back.dtype == torch.long
    assert index == [{"path": p, "row": i} for i, p in enumerate(sorted(expected))]  # sorted, recursive, no notes.txt
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    tokenizer = VisualTokenizer.from_pretrained(root / "tok")
    assert torch.equal(codes_back, reference_codes(tokenizer, expected, sorted(expected), 32))
    assert codes_back.unique().numel() > 3  # distinct images got distinct codes

    with Image.open(out / "code_maps.png") as png:
        assert png.format == "PNG" and png.height > png.width > 200  # three rows of image | code map


def test_encode_images_at_another_size_and_with_workers(folder):
    root, expected = folder
    tokenizer = VisualTokenizer.from_pretrained(root / "tok")
    paths = list_images(root / "images")
    assert len(paths) == 8 and all(p.suffix.lower() != ".txt" for p in paths)
    skipped = []
    encoded = encode_images(
        tokenizer,
        paths,
        image_size=16,
        batch_size=4,
        num_workers=1,
        keep_images=2,
        on_skip=lambda path, reason: skipped.append(path),
        progress=False,
    )
    assert skipped == [root / "images" / "sub" / "truncated.jpg"] == [p for p, _ in encoded.skipped]
    assert encoded.grid == (2, 2) and encoded.codes.shape == (7, 4) and encoded.first_images.shape == (2, 3, 16, 16)
    relative = [p.relative_to(root / "images").as_posix() for p in encoded.paths]
    assert torch.equal(encoded.codes, reference_codes(tokenizer, expected, relative, 16))
    with pytest.raises(ValueError, match="not a positive multiple of the tokenizer's patch size 8"):
        encode_images(tokenizer, paths, image_size=20)


def test_write_codes_replaces_and_checks(tmp_path):
    write_codes(tmp_path / "c", torch.tensor([[1, 2], [3, 40000]]), ["a.png", "b.png"])
    codes, index = read_codes(tmp_path / "c")
    assert codes.tolist() == [[1, 2], [3, 40000]] and index[1] == {
        "path": "b.png",
        "row": 1,
    }  # int32 when int16 cannot hold it
    write_codes(tmp_path / "c", torch.tensor([[7, 8]]), ["c.png"])
    assert read_codes(tmp_path / "c")[0].tolist() == [[7, 8]]
    assert load_file(str(tmp_path / "c" / "codes.safetensors"))["codes"].dtype == torch.int16
    with pytest.raises(ValueError, match="one row per path"):
        write_codes(tmp_path / "c", torch.zeros(2, 4, dtype=torch.long), ["only.png"])
    (tmp_path / "c" / "index.jsonl").write_text('{"path": "c.png", "row": 0}\n{"path": "d.png", "row": 1}\n')
    with pytest.raises(ValueError, match="not written together"):
        read_codes(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no codes.safetensors"):
        read_codes(tmp_path)


def test_dangling_links_and_linked_folders_are_counted_not_silently_left_out(tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "real").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "real" / "a.png")
    os.symlink(tmp_path / "gone.png", folder / "dangling.png")
    os.symlink(folder / "loop-b.jpg", folder / "loop-a.jpg")
    os.symlink(folder / "loop-a.jpg", folder / "loop-b.jpg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "b.png")
    os.symlink(elsewhere, folder / "linked")
    os.symlink(folder / "real" / "a.png", folder / "good-link.png")
    assert [p.name for p in list_images(folder)] == ["good-link.png", "a.png"]
    err = capsys.readouterr().err
    assert "3 image links below" in err and "lead nowhere" in err and "1 linked folders" in err and "linked" in err
