"""tokenizers/train_visual_tokenizer.py end to end at tiny size, for both kinds, with resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit3.data.synthetic import write_shapes_world
from beit3.visual_tokenizers import VisualTokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["vqkd", "dvae"])
def test_training_writes_a_loadable_tokenizer_and_resumes(tmp_path, kind):
    images = write_shapes_world(tmp_path / "data", 40)["images"]
    output = tmp_path / kind

    def train(steps):
        command = [
            sys.executable,
            "tokenizers/train_visual_tokenizer.py",
            "--kind",
            kind,
            "--config",
            f"configs/tokenizers/{kind}_tiny.yaml",
            "--set",
            f"data.images={images}",
            "--set",
            f"train.output_dir={output}",
            "--set",
            f"train.max_steps={steps}",
            "--set",
            "train.save_every=3",
            "--set",
            "train.log_every=1",
            "--set",
            "train.num_workers=0",
            "--set",
            "data.batch_size=8",
        ]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    first = train(3)
    assert first.returncode == 0, first.stderr[-2000:]
    second = train(6)  # continues from the step-3 checkpoint
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 3" in second.stdout + second.stderr
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["codebook_usage"] <= 1 and r["perplexity"] >= 1 for r in records)
    pictures = ["code_maps.png", "codebook_usage.png"] + (["reconstructions.png"] if kind == "dvae" else [])
    assert all((output / name).stat().st_size > 1000 for name in pictures)
    tokenizer = VisualTokenizer.from_pretrained(output / "tokenizer")
    codes = tokenizer.get_codebook_indices(torch.rand(2, 3, 64, 64))
    assert (
        codes.shape == (2, (64 // tokenizer.patch_size) ** 2)
        and 0 <= codes.min()
        and codes.max() < tokenizer.codebook_size
    )
