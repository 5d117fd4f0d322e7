"""Every script in benchmarks/ at smoke size (the tiny presets, one repetition), so that none of them rots: each
runs to the end and prints the figures its docstring promises. The figures themselves are not checked here (a
timing is not a test); the scripts' full runs are in docs/results/speed.md."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def run_benchmark(tmp_path: Path, script: str, *args: str) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TMPDIR": str(tmp_path),  # the scripts' temporary worlds, removed with the test's folder
    }
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_backbone_against_torchscale_prints_a_ratio_and_a_share_of_the_peak_per_precision_and_mode(tmp_path):
    out = run_benchmark(tmp_path, "backbone.py", "--preset", "beit3_tiny_patch16_224", "--reps", "1", "--batch", "2")
    assert re.search(rf"matmul peak .*: fp32 {NUMBER} GFLOP/s, bf16 {NUMBER} GFLOP/s", out)
    assert re.search(rf"ours vs torchscale, fp32: max \|diff\| {NUMBER}e-", out)  # the same weights, the same output
    for precision in ("fp32", "bf16"):
        for mode in ("inference", "training"):
            assert re.search(rf"^{precision} +{mode} +({NUMBER} +){{2}}{NUMBER}x +{NUMBER}% +{NUMBER}%$", out, re.M), (
                out
            )


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("--timm", rf"inference ours {NUMBER} s, timm {NUMBER} s: ours at {NUMBER}x timm's speed"),
        ("--profile=fp32,inference", r"Self CPU time total"),
    ],
)
def test_backbone_modes(tmp_path, mode, expected):
    """(--compile is left out here: a minute of compiling at any size; test_modeling_beit3 compiles the backbone.)"""
    out = run_benchmark(
        tmp_path, "backbone.py", "--preset", "beit3_tiny_patch16_224", "--reps", "1", "--batch", "2", mode
    )
    assert re.search(expected, out, re.M), out


def test_heads(tmp_path):
    out = run_benchmark(tmp_path, "heads.py", "--preset", "beit3_tiny_patch16_224", "--reps", "1", "--tokens", "8")
    assert re.search(rf"speedup {NUMBER}x, identical output: True", out), out
    assert re.search(rf"{NUMBER} images/s .*{NUMBER} texts/s", out), out


def test_pretraining_engine_against_a_plain_loop(tmp_path):
    out = run_benchmark(tmp_path, "pretrain.py", "--steps", "1", "--reps", "1")
    assert re.search(rf"DeepSpeed \(ZeRO-0.*\) vs plain loop, fp32: [-+]?{NUMBER}%", out), out


def test_data_pipeline(tmp_path):
    out = run_benchmark(tmp_path, "data.py", "--images", "32", "--steps", "1", "--reps", "1")
    assert re.search(rf"data alone {NUMBER} samples/s per worker; model alone {NUMBER}; end to end {NUMBER}", out), out


def test_text_padding(tmp_path):
    out = run_benchmark(tmp_path, "text_padding.py", "--images", "64", "--steps", "4", "--windows", "0,16")
    assert len(re.findall(r"text batches without a mask \d+/4, padding", out)) == 2, out


def test_corpus_scale(tmp_path):
    out = run_benchmark(
        tmp_path, "corpus_scale.py", "--pairs", "200", "--copied-up-to", "200", "--folder", str(tmp_path / "corpora")
    )
    assert re.search(rf"\| 200 \| stream \| {NUMBER} \| {NUMBER} \|", out), out
    assert re.search(rf"\| 200 \| Arrow copy \| {NUMBER} \| {NUMBER} \|", out), out
