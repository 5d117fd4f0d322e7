"""The training engine's pieces: run configs, optimizer groups, and what happens on a non-finite loss."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_config

from beit3 import Beit3Model
from beit3.training.config import load_config
from beit3.training.engine import (
    TrainSettings,
    build_optimizer,
    no_weight_decay_names,
    sweep_stale_shared_memory_buffers,
)

ROOT = Path(__file__).resolve().parent.parent


def test_overrides_reach_nested_fields_and_typos_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  betas: [0.9, 0.98]\nmodel:\n  preset: beit3_tiny_patch16_224\n")
    config = load_config(path, ["train.lr=3e-4", "train.betas=[0.9, 0.999]", "model.preset=beit3_base_patch16_224"])
    assert (
        config["train"]["lr"] == 3e-4
        and config["train"]["betas"] == [0.9, 0.999]
        and config["model"]["preset"] == "beit3_base_patch16_224"
    )
    with pytest.raises(KeyError, match="no field 'train.learning_rate'"):
        load_config(path, ["train.learning_rate=1"])
    with pytest.raises(KeyError, match="no section 'optim'"):
        load_config(path, ["optim.lr=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(KeyError, match="Unknown train settings"):
        TrainSettings.from_config({"output_dir": "x", "max_steps": 1, "save_every": 1, "lerning_rate": 1})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("save_every", 0, "train.save_every must be an integer >= 1; got 0"),
        ("log_every", 0, "train.log_every must be an integer >= 1"),
        ("max_steps", "abc", "train.max_steps must be an integer >= 1; got 'abc'"),
        ("max_steps", -3, "train.max_steps must be an integer >= 1; got -3"),
        ("micro_batch_size", -1, "train.micro_batch_size must be an integer >= 1"),
        ("keep_last", 0, "train.keep_last must be an integer >= 1"),
        ("lr", 0, "train.lr must be a number > 0"),
        ("lr", "fast", "train.lr must be a number > 0"),
        ("min_lr_ratio", 2, "train.min_lr_ratio must be a number >= 0 and <= 1"),
        ("layer_decay", 1.5, "train.layer_decay must be a number > 0 and <= 1 or null"),
        ("betas", [0.9], "train.betas must be two numbers in [0, 1)"),
        ("precision", "fp8", "train.precision must be one of fp32, bf16, fp16; got 'fp8'"),
        ("zero_stage", 4, "train.zero_stage must be one of 0, 1, 2, 3; got 4"),
        ("gradient_checkpointing", "yes", "train.gradient_checkpointing must be true or false"),
        ("num_workers", True, "train.num_workers must be an integer >= 0"),
        ("lr", float("nan"), "train.lr must be a number > 0; got nan"),
        ("zero_stage", True, "train.zero_stage must be one of 0, 1, 2, 3; got True"),
        ("output_dir", "", "train.output_dir must be a folder path; got ''"),
    ],
)
def test_every_train_setting_is_checked_before_any_work(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainSettings.from_config({"output_dir": "x", "max_steps": 10, "save_every": 5, field: value})
    settings = TrainSettings.from_config(
        {"output_dir": "x", "max_steps": 10, "save_every": 5, "lr": 3, "layer_decay": None}
    )
    assert settings.lr == 3.0 and isinstance(settings.lr, float)  # an integer is a number


def test_set_accepts_every_declared_setting_the_file_does_not_list(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    config = load_config(path, ["train.max_nonfinite_steps=3"], declared={"train": TrainSettings.field_names()})
    assert config["train"]["max_nonfinite_steps"] == 3
    with pytest.raises(KeyError, match="known here: .*max_nonfinite_steps"):
        load_config(path, ["train.max_nonfinite_stepz=3"], declared={"train": TrainSettings.field_names()})


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = Beit3Model(tiny_config())
    exempt = no_weight_decay_names(model)
    assert "embeddings.text_embeddings.weight" in exempt and "embeddings.vision_position_embeddings" in exempt
    assert "layers.0.attention.vision.norm.weight" in exempt and "layers.0.ffn.text.fc1.bias" in exempt
    assert "layers.0.ffn.text.fc1.weight" not in exempt and "embeddings.patch_embed.proj.weight" not in exempt
    optimizer = build_optimizer(model, TrainSettings(output_dir="x", max_steps=1, save_every=1, weight_decay=0.05))
    decays = {group["weight_decay"]: sum(p.numel() for p in group["params"]) for group in optimizer.param_groups}
    assert set(decays) == {0.0, 0.05} and optimizer.defaults["betas"] == (0.9, 0.98)
    assert sum(decays.values()) == sum(p.numel() for p in model.parameters())


def train_tiny_engine(tmp_path, settings: str, step_fn: str) -> subprocess.CompletedProcess:
    """Engine.fit on a tiny backbone in a fresh process, with ``settings`` (TrainSettings arguments) and the body
    of ``step_fn(module, batch)``, which sees ``engine``; returns the finished process."""
    script = textwrap.dedent("""
        import torch
        from beit3 import Beit3Model
        from beit3.training.engine import Engine, TrainSettings, setup_distributed
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


def test_non_finite_losses_are_skipped_then_stop_the_run_with_the_last_good_checkpoint(tmp_path):
    result = train_tiny_engine(
        tmp_path,
        "max_steps=20, save_every=2, max_nonfinite_steps=3",
        """
        loss = module(pixel_values=batch["pixel_values"]).last_hidden_state.pow(2).mean()
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


def test_shipped_pretraining_configs_parse():
    for name in ("tiny", "beit3_base_paper"):
        config = load_config(ROOT / "configs/pretrain" / f"{name}.yaml")
        settings = TrainSettings.from_config(config["train"])
        assert settings.max_steps > 0 and settings.save_every > 0 and settings.output_dir
        assert set(config["data"]["batch_size"]) == {"image", "text", "pair"}


def test_layer_decay_scales_the_learning_rate_by_depth():
    from beit3.modeling_heads import Beit3ForImageClassification

    model = Beit3ForImageClassification(
        tiny_config(num_labels=3)
    )  # 2 layers: embeddings 0, layers 1-2, final norms and head 3
    optimizer = build_optimizer(
        model, TrainSettings(output_dir="x", max_steps=1, save_every=1, lr=1.0, layer_decay=0.5)
    )
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["beit3.embeddings.cls_token"])] == 0.125
    assert lr_of[id(named["beit3.layers.0.ffn.vision.fc1.weight"])] == 0.25
    assert lr_of[id(named["beit3.layers.1.ffn.vision.fc1.weight"])] == 0.5
    assert lr_of[id(named["head.weight"])] == 1.0 and lr_of[id(named["fc_norm.weight"])] == 1.0
    decays = {
        group["weight_decay"]
        for group in optimizer.param_groups
        if any(p is named["head.bias"] for p in group["params"])
    }
    assert decays == {0.0}


def test_head_lr_scale_boosts_every_task_specific_parameter_and_no_backbone_one():
    from beit3.modeling_heads import Beit3ForVisualQuestionAnswering

    model = Beit3ForVisualQuestionAnswering(tiny_config(num_labels=5))
    optimizer = build_optimizer(
        model, TrainSettings(output_dir="x", max_steps=1, save_every=1, lr=0.1, head_lr_scale=20.0)
    )
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():  # the pooler is boosted too (unilm leaves it at 1x)
        assert lr_of[id(parameter)] == pytest.approx(2.0 if name.startswith(("head.", "pooler.")) else 0.1), name
    assert any(name.startswith("pooler.") for name, _ in model.named_parameters())
    named = dict(model.named_parameters())
    assert decay_of[id(named["head.3.bias"])] == 0.0 and decay_of[id(named["head.3.weight"])] == 0.05
    with pytest.raises(ValueError, match="no task-specific parameters"):
        build_optimizer(
            Beit3Model(tiny_config()), TrainSettings(output_dir="x", max_steps=1, save_every=1, head_lr_scale=2.0)
        )


def test_shipped_task_configs_parse_and_name_known_settings():
    for path in sorted((ROOT / "configs" / "tasks").glob("*.yaml")):
        config = load_config(path)
        settings = TrainSettings.from_config(config["train"])
        assert settings.max_steps > 0 and settings.lr > 0, path
        assert {"train", "eval"} <= set(config["data"]), path
        assert config["model"]["preset"].startswith("beit3_"), path


def test_gradient_accumulation_takes_micro_batches_per_step(tmp_path):
    script = textwrap.dedent(f"""
        import sys, json, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from conftest import tiny_config
        from beit3 import Beit3Model
        from beit3.training.engine import Engine, TrainSettings, setup_distributed
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
    settings = TrainSettings(output_dir=str(tmp_path), max_steps=1, save_every=1, zero_stage=3)
    assert load_deepspeed_json(None, settings)["zero_optimization"]["stage"] == 3  # configs/deepspeed/zero3.json
    assert load_deepspeed_json(
        None, TrainSettings(output_dir=str(tmp_path), max_steps=1, save_every=1, zero_stage=0)
    ) == {"zero_optimization": {"stage": 0}}
    with pytest.raises(
        ValueError,
        match=r"train.zero_stage is 3, but the DeepSpeed config .*zero2.json says stage 2: set train.zero_stage=2",
    ):
        load_deepspeed_json("configs/deepspeed/zero2.json", settings)
    (tmp_path / "broken.json").write_text("{stage: 3")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_deepspeed_json(str(tmp_path / "broken.json"), settings)
    with pytest.raises(FileNotFoundError, match="No config file at missing.json"):
        load_deepspeed_json("missing.json", settings)


def test_stale_deepspeed_buffers_are_swept_but_not_those_in_use_fresh_or_another_users(tmp_path):
    # Buffers that DeepSpeed's CPU backend made (in earlier versions of the engine, or other programs) stay in /dev/shm forever.
    name = lambda user, port: tmp_path / f"deepspeed_allreduce_buffer_{user}_127.0.0.1_{port}_0"
    stale, in_use, fresh, others = (
        name(os.getuid(), 1),
        name(os.getuid(), 2),
        name(os.getuid(), 3),
        name(os.getuid() + 1, 4),
    )
    for path in (stale, in_use, fresh, others):
        path.write_bytes(b"\0" * 4096)
    for path in (stale, in_use, others):
        os.utime(path, (0, 0))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import mmap, sys; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0); "
            "print('mapped', flush=True); sys.stdin.read()",
            str(in_use),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert sweep_stale_shared_memory_buffers(tmp_path) == [stale]
    finally:
        holder.communicate("")
    assert not stale.exists() and in_use.exists() and fresh.exists() and others.exists()
    assert sweep_stale_shared_memory_buffers(tmp_path) == [in_use]  # no longer mapped by anyone


def test_cpu_threads_share_the_cores_among_processes_and_their_loader_workers():
    from beit3.training.engine import cpu_threads

    assert cpu_threads(local_size=1, num_workers=0, cores=2) == 2
    assert cpu_threads(local_size=1, num_workers=1, cores=2) == 1  # the worker keeps a core of its own
    assert cpu_threads(local_size=2, num_workers=1, cores=2) == 1  # never below one
    assert cpu_threads(local_size=8, num_workers=4, cores=64) == 4


@pytest.mark.parametrize("omp", [None, "2"])
def test_every_cpu_run_sets_its_threads_and_says_so(omp):
    """One process too (before, only several local processes had their threads set): 2 cores and one loader
    worker give one thread; OMP_NUM_THREADS, when set, is left alone and named."""
    script = (
        "import os, torch; os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2]); "
        "from beit3.training.engine import setup_distributed; setup_distributed(num_workers=1); "
        "print('threads', torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"threads {omp or 1}" in output  # (one core alone gives 1 too)
    why = "OMP_NUM_THREADS)" if omp else "1 process(es) on this machine, 1 loader worker(s) each"
    assert "torch thread(s) per process (" + why in output, output
