"""The training engine (beit3/training/engine.py): non-finite losses, checkpoints, accumulation, the ZeRO stage."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from beit3.training.settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent


def train_tiny_engine(tmp_path, settings: str, step_fn: str) -> subprocess.CompletedProcess:
    """Engine.fit on a tiny backbone in a fresh process, with ``settings`` (TrainSettings arguments) and the body
    of ``step_fn(module, batch)``, which sees ``engine``; returns the finished process."""
    script = textwrap.dedent("""
        import torch
        from beit3 import Beit3Model
        from beit3.training.distributed import setup_distributed
        from beit3.training.engine import Engine
        from beit3.training.settings import TrainSettings
        import sys; sys.path.insert(0, {tests!r})
        from conftest import tiny_config
        torch.manual_seed(0)
        engine = Engine(Beit3Model(tiny_config()), TrainSettings(output_dir={run!r}, log_every=1, num_workers=0, {settings}), None,
                        setup_distributed())
        def step_fn(module, batch, step):
        {body}
        def make_loader(start, count):
            return iter([{{"pixel_values": torch.randn(2, 3, 32, 32)}} for _ in range(100)])
        engine.fit(step_fn, make_loader, samples_per_step=2)
    """).format(
        tests=str(ROOT / "tests"),
        run=str(tmp_path / "run"),
        settings=settings,
        body=textwrap.indent(textwrap.dedent(step_fn).strip(), "    "),
    )
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # the Engine's check before backward; DeepSpeed's skip
def test_non_finite_losses_are_skipped_then_stop_the_run_with_the_last_good_checkpoint(tmp_path, precision):
    result = train_tiny_engine(
        tmp_path,
        f"max_steps=20, save_every=2, max_nonfinite_steps=3, precision={precision!r}",
        """
        loss = module(pixel_values=batch["pixel_values"]).last_hidden_state.float().pow(2).mean()
        return (loss * float("nan") if engine.step >= 4 else loss), {}
    """,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "step 4: the loss is not finite" in output and "step 5: the loss is not finite" in output
    assert "3 steps in a row had a non-finite loss" in output and "step00000004" in output
    assert (tmp_path / "run/checkpoints/step00000004/COMPLETE").exists()
    assert not (tmp_path / "run/checkpoints/step00000006").exists()


def test_weights_blown_up_by_an_update_are_never_saved_as_a_checkpoint(tmp_path):
    result = train_tiny_engine(
        tmp_path,
        "max_steps=8, save_every=2",
        """
        if engine.step == 3:  # an update that overflows weights this loss does not read: the loss stays finite
            with torch.no_grad():
                module.module.embeddings.text_embeddings.weight[5].fill_(float("inf"))
        return module(pixel_values=batch["pixel_values"]).last_hidden_state.pow(2).mean(), {}
    """,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "step 4: the weights are no longer finite" in output
        and "The last good checkpoint is" in output
        and "step00000002" in output
    )
    assert (tmp_path / "run/checkpoints/step00000002/COMPLETE").exists()
    assert not (tmp_path / "run/checkpoints/step00000004/COMPLETE").exists()


def test_gradient_accumulation_takes_micro_batches_per_step(tmp_path):
    script = textwrap.dedent(f"""
        import sys, json, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from conftest import tiny_config
        from beit3 import Beit3Model
        from beit3.training.distributed import setup_distributed
        from beit3.training.engine import Engine
        from beit3.training.settings import TrainSettings
        torch.manual_seed(0)
        settings = TrainSettings(output_dir={str(tmp_path / "run")!r}, max_steps=3, save_every=3, log_every=1, num_workers=0,
                                 gradient_accumulation_steps=2, warmup_steps=0, lr=1e-3)
        engine = Engine(Beit3Model(tiny_config()), settings, None, setup_distributed())
        asked, seen = [], []
        def step_fn(module, batch, step):
            seen.append(int(batch["index"]))
            return module(pixel_values=batch["pixel_values"]).last_hidden_state.pow(2).mean(), {{}}
        def make_loader(first, count):
            asked.append((first, count))
            return iter([{{"pixel_values": torch.randn(2, 3, 32, 32), "index": torch.tensor(first + i)}} for i in range(count)])
        engine.fit(step_fn, make_loader, samples_per_step=2)
        print(json.dumps({{"asked": asked, "seen": seen, "steps": engine.module.global_steps, "step": engine.step}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert report["asked"] == [[0, 6]] and report["seen"] == list(range(6))
    assert report["step"] == 3 and report["steps"] == 3  # three optimizer updates for six micro-batches


def test_the_zero_stage_has_one_source_a_deepspeed_json_of_another_stage_is_refused(tmp_path, monkeypatch):
    from beit3.training.engine import load_deepspeed_json

    monkeypatch.chdir(tmp_path)  # the packaged configs are found from any directory
    settings = lambda **fields: TrainSettings(output_dir=str(tmp_path), max_steps=1, save_every=1, **fields)
    assert (
        load_deepspeed_json(settings(zero_stage=3))["zero_optimization"]["stage"] == 3
    )  # configs/deepspeed/zero3.json
    assert load_deepspeed_json(settings(zero_stage=0)) == {"zero_optimization": {"stage": 0}}
    with pytest.raises(
        ValueError,
        match=r"train.zero_stage is 3, but the DeepSpeed config .*zero2.json says stage 2: set train.zero_stage=2, or "
        r"name a JSON of stage 3 in train.deepspeed",
    ):
        load_deepspeed_json(settings(zero_stage=3, deepspeed="configs/deepspeed/zero2.json"))
    (tmp_path / "broken.json").write_text("{stage: 3")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_deepspeed_json(settings(zero_stage=3, deepspeed=str(tmp_path / "broken.json")))
    with pytest.raises(FileNotFoundError, match="No config file at missing.json"):
        load_deepspeed_json(settings(zero_stage=3, deepspeed="missing.json"))


def test_train_deterministic_turns_on_deterministic_kernels_and_a_run_trains_with_them(tmp_path):
    import json

    runs = {}
    for deterministic in (False, True):
        result = train_tiny_engine(
            tmp_path / str(deterministic),
            f"max_steps=2, save_every=2, deterministic={deterministic}",
            """
            print("DETERMINISTIC", torch.are_deterministic_algorithms_enabled(), flush=True)
            return module(pixel_values=batch["pixel_values"]).last_hidden_state.pow(2).mean(), {}
            """,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"DETERMINISTIC {deterministic}" in result.stdout
        metrics = (tmp_path / str(deterministic) / "run/metrics.jsonl").read_text().splitlines()
        runs[deterministic] = [json.loads(line)["loss"] for line in metrics]
    assert runs[True] == runs[False]  # on the CPU the kernels were deterministic already


def test_bf16_under_zero_accumulates_and_reduces_gradients_in_fp32():
    from beit3.training.engine import deepspeed_config

    def config(precision, world_size, stage=2):
        settings = TrainSettings(output_dir="out", max_steps=1, save_every=1, precision=precision, zero_stage=stage)
        return deepspeed_config(settings, world_size, {"zero_optimization": {"stage": stage}})

    zero2 = config("bf16", 2)
    assert zero2["bf16"]["enabled"] and zero2["data_types"] == {"grad_accum_dtype": "fp32"}
    assert zero2["communication_data_type"] == "fp32"
    assert config("bf16", 2, stage=1)["data_types"] == {"grad_accum_dtype": "fp32"}
    # one process runs stage 0, where DeepSpeed takes no fp32 accumulation with bf16 weights; fp32 needs none
    for settings in (("bf16", 1), ("fp32", 2)):
        assert "data_types" not in config(*settings) and "communication_data_type" not in config(*settings)


@pytest.mark.parametrize("precision, reads_per_step", [("fp32", 1), ("bf16", 0)])
def test_a_bf16_step_reads_no_device_value_and_an_fp32_step_one(tmp_path, precision, reads_per_step):
    # Reads of a value (Tensor.item) made by the Engine itself in steps 0-2: in bf16 DeepSpeed's own norm check
    # decides the skip, so none; fp32 (a plain torch optimizer would apply a non-finite update) reads the loss.
    result = train_tiny_engine(
        tmp_path,
        f"max_steps=4, save_every=100, precision={precision!r}",
        """
        if engine.step == 0 and not hasattr(torch.Tensor, "counted"):
            import traceback
            real = torch.Tensor.item
            def item(tensor):
                if traceback.extract_stack(limit=2)[0].filename.endswith("beit3/training/engine.py"):
                    torch.Tensor.counted += 1
                return real(tensor)
            torch.Tensor.counted, torch.Tensor.item = 0, item
        if engine.step == 3:
            print("ENGINE READS", torch.Tensor.counted)  # those of steps 0-2
        return module(pixel_values=batch["pixel_values"]).last_hidden_state.float().pow(2).mean(), {}
    """,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"ENGINE READS {3 * reads_per_step}" in result.stdout
