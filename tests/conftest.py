import warnings
from pathlib import Path

import pytest
import torch

from beit3 import Beit3Config

# The size of the torchscale reference models that the conversion and head tests compare against.
REFERENCE = dict(image_size=32, patch_size=8, hidden_size=128, vocab_size=100)


# End-to-end tests: they run the programs as a user does (the demo at smoke size, DeepSpeed processes, the
# tokenizer and fine-tuning scripts, the benchmark scripts at smoke size). `pytest -m "not e2e"` runs the rest, the fast tier, in a few minutes.
END_TO_END_MODULES = {"test_benchmarks", "test_demo", "test_pretrain", "test_train_visual_tokenizer"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in END_TO_END_MODULES or "demo_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> Beit3Config:
    """A BEiT-3 small enough for a test: 2 layers, hidden 32, 32 px images of 16 patches, 100 text ids."""
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        image_size=32,
        patch_size=8,
        max_position_embeddings=40,
    )
    return Beit3Config(**{**fields, **overrides})


def reference_config(final_layernorm: bool, **fields) -> Beit3Config:
    """The config of ``torchscale_reference``: its sizes match no preset, so a conversion must be given its head
    count (``--config``)."""
    return tiny_config(
        hidden_size=REFERENCE["hidden_size"],
        num_attention_heads=REFERENCE["hidden_size"] // 64,
        intermediate_size=2 * REFERENCE["hidden_size"],
        max_position_embeddings=1024,
        final_layernorm=final_layernorm,
        **fields,
    )


def reference_config_file(folder: Path, final_layernorm: bool) -> str:
    """``reference_config`` written as a JSON file in ``folder``, for ``python -m beit3.convert --config``."""
    path = folder / "reference_config.json"
    reference_config(final_layernorm).to_json_file(path)
    return str(path)


def torchscale_reference(final_layernorm: bool, image_size: int = REFERENCE["image_size"]) -> torch.nn.Module:
    """torchscale's BEiT3 (Microsoft's implementation) at tiny size, every parameter moved off its initial value."""
    from torchscale.architecture.config import EncoderConfig  # the reference; `make test` installs it
    from torchscale.model.BEiT3 import BEiT3

    hidden = REFERENCE["hidden_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = EncoderConfig(
            img_size=image_size,
            patch_size=REFERENCE["patch_size"],
            vocab_size=REFERENCE["vocab_size"],
            multiway=True,
            layernorm_embedding=False,
            normalize_output=final_layernorm,
            no_output_layer=True,
            encoder_embed_dim=hidden,
            encoder_attention_heads=hidden // 64,
            encoder_ffn_embed_dim=2 * hidden,
            encoder_layers=2,
        )
        model = BEiT3(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def word_tokenizer(folder, words: list[str], vocab_size: int, **kwargs):
    """A SentencePiece tokenizer trained on 300 random sentences over ``words`` (3 to 9 words each)."""
    import random

    from beit3 import train_sentencepiece

    rng = random.Random(0)
    (folder / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300))
    )
    return train_sentencepiece(folder, vocab_size, files=[folder / "corpus.txt"], quiet=True, **kwargs)


def train_with_transformers_trainer(model, dataset, output_dir, steps: int = 2) -> list[float]:
    """Trains ``model`` on ``dataset`` for ``steps`` steps with a plain ``transformers.Trainer``, as a user
    would; asserts the weights moved and returns the logged training losses."""
    from transformers import Trainer, TrainingArguments

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps and all(loss == loss and loss < float("inf") for loss in losses)
    assert any(
        not torch.equal(before[name], p.detach()) for name, p in model.named_parameters() if name.startswith("beit3.")
    )
    return losses


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo pipeline at its smoke size (tiny world, a few steps per stage), run once for the session:
    tests of the demo and of the fine-tuning scripts read its outputs. Returns (output folder, stdout)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    output = tmp_path_factory.mktemp("demo") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "tasks/demo.py", "--output", str(output), "--profile", "smoke"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output, result.stdout


def launcher_env(processes_per_node: int) -> dict:
    """The environment for a test that starts ``processes_per_node`` ranks on this machine: on the CPU (an empty
    CUDA_VISIBLE_DEVICES) unless there is a GPU for each, so that a one-GPU machine places no rank on a missing GPU."""
    import os

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if torch.cuda.device_count() < processes_per_node:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env
