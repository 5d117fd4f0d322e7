"""Pretraining end to end at tiny size: one process, two DeepSpeed processes, exact resume after SIGKILL, faults,
and training on precomputed image codes without a visual tokenizer."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import launcher_env, tiny_config

from beit3 import train_sentencepiece
from beit3.data.synthetic import write_shapes_world
from beit3.visual_tokenizers import VQKD, VQKDConfig

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    paths = write_shapes_world(folder / "data", 48)
    train_sentencepiece(
        folder / "text-tokenizer", vocab_size=36, files=[paths["texts"]], model_max_length=32, quiet=True
    )
    torch.manual_seed(0)
    VQKD(VQKDConfig.from_preset("vqkd_tiny", image_size=64)).save_pretrained(folder / "visual-tokenizer")
    for kind, source in (("pairs", ["--pairs", str(paths["pairs"])]), ("images", ["--images", str(paths["images"])])):
        subprocess.run(
            [
                sys.executable,
                "tasks/make_shards.py",
                *source,
                "--output",
                str(folder / f"shards/{kind}-%02d.tar"),
                "--shard-size",
                "8",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return folder


def streaming(world: Path) -> list[str]:
    """--set values that stream images and pairs from the world's shards (6 of each), with 2 loader workers."""
    return [
        "data.streaming=true",
        f"data.sources.images={world / 'shards/images-{00..05}.tar'}",
        f'data.sources.pairs=["{world / "shards/pairs-{00..05}.tar"}"]',
        "train.num_workers=2",
    ]


def overrides(world: Path, output_dir: Path, **train) -> list[str]:
    sets = [
        f"text_tokenizer={world / 'text-tokenizer'}",
        f"visual_tokenizer={world / 'visual-tokenizer'}",
        f"data.sources.images={world / 'data/images'}",
        f"data.sources.texts=[{world / 'data/captions.txt'}]",
        f"data.sources.pairs=[{world / 'data/pairs.jsonl'}]",
        "data.batch_size={image: 4, text: 4, pair: 4}",
        f"train.output_dir={output_dir}",
        "train.num_workers=0",
        "train.log_every=1",
        *(f"train.{k}={v}" for k, v in train.items()),
    ]
    # The stage's own DeepSpeed JSON: tiny.yaml names zero2.json, and another stage is refused
    if "zero_stage" in train:
        sets.append(f"train.deepspeed=configs/deepspeed/zero{train['zero_stage']}.json")
    return [arg for s in sets for arg in ("--set", s)]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pretrain(world, output_dir, processes=1, wait=True, sets=(), **train):
    command = (
        [sys.executable, "tasks/pretrain.py"]
        if processes == 1
        # a port of its own: DeepSpeed's default (29500) may be taken by another run on this machine
        else [DEEPSPEED, "--num_gpus", str(processes), "--master_port", str(_free_port()), "tasks/pretrain.py"]
    )
    command += [
        "--config",
        "configs/pretrain/tiny.yaml",
        *overrides(world, output_dir, **train),
        *(a for s in sets for a in ("--set", s)),
    ]
    env = launcher_env(processes)
    if not wait:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())}


def test_one_process_run_logs_every_kind_and_checkpoints(world, tmp_path):
    # (with texts and pairs grouped by length: the setting travels from the command line to the batches)
    result = pretrain(world, tmp_path / "run", max_steps=4, save_every=2, sets=["data.group_by_length=2"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "run/run_config.json").read_text())["data"]["group_by_length"] == 2
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in (
        "loss",
        "image_loss",
        "image_accuracy",
        "text_loss",
        "text_accuracy",
        "pair_loss",
        "pair_accuracy",
        "lr",
        "samples_per_s",
    ):
        assert key in records[-1]
    assert records[-1]["text_loss"] < 5  # the text head is sized to the 38-id tokenizer, not to 64010
    complete = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step*") if (p / "COMPLETE").exists())
    assert complete == ["step00000002", "step00000004"]
    assert (tmp_path / "run/tensorboard").is_dir() and (tmp_path / "run/model/config.json").is_file()


@pytest.mark.parametrize("streamed", [False, True], ids=["step-indexed", "streaming"])
def test_two_processes_resume_exactly_after_sigkill(world, tmp_path, streamed):
    steps = 8
    sets = streaming(world) if streamed else ()
    reference = pretrain(world, tmp_path / "uninterrupted", processes=2, max_steps=steps, save_every=3, sets=sets)
    assert reference.returncode == 0, reference.stdout[-3000:]
    expected = losses(tmp_path / "uninterrupted")
    assert sorted(expected) == list(range(1, steps + 1))

    run = tmp_path / "killed"
    process = pretrain(world, run, processes=2, wait=False, max_steps=steps, save_every=3, sets=sets)
    marker = run / "checkpoints/step00000003/COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the first checkpoint never completed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(losses(run))
    assert killed_at < steps, "the run finished before it could be killed"

    if streamed:
        saved = json.loads((run / "checkpoints/step00000003/COMPLETE").read_text())["data_state"]
        assert [sorted(rank["streams"]) for rank in saved] == [
            ["image/0", "image/1", "pair/0", "pair/1", "text/0", "text/1"]
        ] * 2
    resumed = pretrain(world, run, processes=2, max_steps=steps, save_every=3, sets=sets)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from step" in resumed.stdout + resumed.stderr
    after = losses(run)  # later lines for the same step (after the restart) replace the killed run's
    assert sorted(after) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert after[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (
            f"step {step}: {after[step]} vs {expected[step]}"
        )
    if streamed:  # the streams are split by loader worker: another count would read other samples
        other = pretrain(
            world, run, processes=2, max_steps=steps + 2, save_every=3, sets=[*sets, "train.num_workers=1"]
        )
        assert other.returncode != 0 and "taken with 2 data-loader workers" in other.stdout + other.stderr


def _deepspeed_buffers() -> set[str]:
    return (
        {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")} if Path("/dev/shm").is_dir() else set()
    )


def test_runs_leave_no_shared_memory_behind_clean_or_killed(world, tmp_path):
    before = _deepspeed_buffers()
    assert pretrain(world, tmp_path / "one", max_steps=1, save_every=1).returncode == 0
    two = pretrain(world, tmp_path / "two", processes=2, max_steps=1, save_every=1)
    assert two.returncode == 0, two.stderr[-2000:]
    assert _deepspeed_buffers() - before == set()
    # Training needs no shared-memory all-reduce: DeepSpeed's C++ op is neither built nor loaded (it prints
    # "... deepspeed_shm_comm_op built successfully" whenever it loads it, from its cache too)
    assert "shm_comm" not in two.stdout + two.stderr
    process = pretrain(world, tmp_path / "killed", processes=2, wait=False, max_steps=50, save_every=50)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "metrics.jsonl").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stdout.read()[-3000:]}"
    os.killpg(process.pid, signal.SIGKILL)  # mid-training: no handler of ours runs
    process.wait()
    assert _deepspeed_buffers() - before == set()


def test_a_half_written_checkpoint_is_never_resumed(world, tmp_path):
    first = pretrain(world, tmp_path / "run", max_steps=2, save_every=2)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "run/checkpoints/step00000099").mkdir()  # a save that died halfway: no COMPLETE marker
    again = pretrain(world, tmp_path / "run", max_steps=3, save_every=3)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 2" in again.stdout + again.stderr


def test_resume_logs_each_step_once_and_survives_a_torn_last_line(world, tmp_path):
    import shutil

    from beit3.training.run_log import read_run_log

    run = tmp_path / "run"
    assert pretrain(world, run, max_steps=3, save_every=2).returncode == 0
    shutil.rmtree(
        run / "checkpoints/step00000003"
    )  # killed after logging step 3, before its checkpoint, mid-write of a line
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 1.2')
    assert [r["step"] for r in read_run_log(run / "metrics.jsonl")] == [1, 2, 3]  # readers leave the torn line out
    again = pretrain(world, run, max_steps=4, save_every=2)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 2" in again.stdout + again.stderr
    assert [r["step"] for r in read_run_log(run / "metrics.jsonl")] == [1, 2, 3, 4]  # step 3 repeated, logged once


def test_two_runs_never_share_an_output_dir_and_a_killed_runs_lock_is_taken_over(world, tmp_path):
    run = tmp_path / "run"
    # Long enough never to end by itself while the second starts up (200 steps once did, on a fast day); killed below.
    first = pretrain(world, run, wait=False, max_steps=100000, save_every=100000)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started"
    second = pretrain(world, run, max_steps=1, save_every=1)
    assert second.returncode != 0 and "is in use by another run" in second.stdout + second.stderr
    os.killpg(first.pid, signal.SIGKILL)  # its lock stays behind, naming a process that is gone
    first.wait()
    assert (run / "run.lock").exists()
    third = pretrain(world, run, max_steps=1, save_every=1)
    assert third.returncode == 0, third.stderr[-2000:]
    assert not (run / "run.lock").exists()  # released at exit


def test_a_checkpoint_resumes_only_in_the_layout_that_wrote_it(world, tmp_path):
    first = pretrain(world, tmp_path / "run", max_steps=2, save_every=2)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "running stage 0" in first.stderr  # one process: tiny.yaml's ZeRO-2 has nothing to partition
    marker = json.loads((tmp_path / "run/checkpoints/step00000002/COMPLETE").read_text())
    assert marker["world_size"] == 1 and marker["zero_stage"] == 0
    again = pretrain(world, tmp_path / "run", processes=2, max_steps=3, save_every=3)
    assert again.returncode != 0
    output = again.stdout + again.stderr
    assert "written with world_size=1, zero_stage=0" in output and "as many processes" in output


def test_a_resume_with_another_config_is_refused_before_any_file_is_rewritten(world, tmp_path):
    run = tmp_path / "run"
    first = pretrain(world, run, max_steps=2, save_every=2)
    assert first.returncode == 0, first.stderr[-2000:]
    kept = {name: (run / name).read_bytes() for name in ("run_config.json", "model/config.json")}
    changed = pretrain(
        world,
        run,
        max_steps=4,
        save_every=2,
        lr=5e-4,
        sets=["model.overrides={image_size: 64, patch_size: 8, max_position_embeddings: 66, hidden_size: 32}"],
    )
    assert changed.returncode != 0
    output = changed.stdout + changed.stderr
    assert "train.lr: 0.001 -> 0.0005" in output and "model.overrides.hidden_size: '(not set)' -> 32" in output
    assert (
        "Traceback" not in output and {name: (run / name).read_bytes() for name in kept} == kept
    )  # export still reads them
    longer = pretrain(world, run, max_steps=4, save_every=2)  # what may change: how long it runs, how often it saves...
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "changed settings: train.max_steps: 2 -> 4" in longer.stderr and "resumed from step 2" in longer.stdout
    assert json.loads((run / "run_config.json").read_text())["train"]["max_steps"] == 4


@pytest.mark.parametrize(
    "setting, message",
    [
        ("text_tokenizer=/nonexistent/tokenizer", "text_tokenizer /nonexistent/tokenizer does not exist"),
        ("data.sources.images=/nonexistent/images", "No image folder at /nonexistent/images"),
        ("model.overrides={image_size: 64, patch_size: 16, max_position_embeddings: 66}", "one code per patch"),
        ("model.overrides={image_size: 64, patch_size: 8, max_position_embeddings: 66, vocab_size: 20}", "vocab"),
    ],
)
def test_bad_setups_fail_before_training_with_a_clear_message(world, tmp_path, setting, message):
    command = [
        sys.executable,
        "tasks/pretrain.py",
        "--config",
        "configs/pretrain/tiny.yaml",
        *overrides(world, tmp_path / "run", max_steps=1),
        "--set",
        setting,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert not (tmp_path / "run/metrics.jsonl").exists()


def test_unwritable_output_dir_is_refused(world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = pretrain(world, blocker / "run", max_steps=1)
    assert result.returncode != 0 and "output_dir" in result.stdout + result.stderr


def test_export_writes_a_from_pretrained_folder_with_tokenizer_and_processor(world, tmp_path):
    from transformers import AutoProcessor

    from beit3 import Beit3Model
    from beit3.export import main as export_main
    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    result = pretrain(world, tmp_path / "run", processes=2, max_steps=2, save_every=2, zero_stage=3)
    assert result.returncode == 0, result.stdout[-3000:]
    export_main(["--checkpoint-dir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")])
    model = Beit3ForMaskedDataModeling.from_pretrained(tmp_path / "hf")
    backbone = Beit3Model.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(backbone.embeddings.cls_token, model.beit3.embeddings.cls_token)
    initial = Beit3ForMaskedDataModeling(model.config)  # the export holds trained weights, not an initialization
    assert not torch.equal(initial.mlm_head.weight, model.mlm_head.weight)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    inputs = processor(
        images=[torch.zeros(3, 64, 64).numpy().transpose(1, 2, 0)],
        text=["a big red circle on the left"],
        return_tensors="pt",
    )
    assert model(**{k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask")}).image_loss is None
    with pytest.raises(SystemExit, match="^error: .*not a complete checkpoint"):
        export_main(
            ["--checkpoint-dir", str(tmp_path / "run"), "--output", str(tmp_path / "x"), "--tag", "step00000099"]
        )
    export_main(["--checkpoint-dir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")])  # again: replaced
    (tmp_path / "hf" / "notes.txt").write_text("a user's")
    with pytest.raises(SystemExit, match="^error: .*hf holds notes.txt, which this write would not write again"):
        export_main(["--checkpoint-dir", str(tmp_path / "run"), "--output", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "notes.txt").read_text() == "a user's" and (tmp_path / "hf" / "config.json").is_file()


class _Payload:
    """Unpickling this runs a shell command: what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, trusted here
    state["planted"] = _Payload(marker)
    torch.save(state, path)


def _deepspeeds_own_tool_gives_the_exported_weights(run: Path, tmp_path: Path) -> None:
    """zero_to_fp32.py, which DeepSpeed writes beside the checkpoints, run as DeepSpeed documents it (no tag: it reads
    ``latest``), gives the weights beit3.export gives."""
    from safetensors.torch import load_file

    from beit3.export import export

    command = [
        sys.executable,
        str(run / "checkpoints/zero_to_fp32.py"),
        str(run / "checkpoints"),
        str(tmp_path / "fp32"),
    ]
    result = subprocess.run([*command, "--safe_serialization"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    theirs = load_file(tmp_path / "fp32/model.safetensors")
    ours = load_file(export(run, tmp_path / "exported") / "model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


@pytest.mark.parametrize("processes, zero_stage", [(1, 2), (1, 3), (2, 2), (2, 3)])
def test_no_code_planted_in_any_checkpoint_file_runs_on_resume_or_export(world, tmp_path, processes, zero_stage):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from beit3.checkpoints import check_weights_only, weights_only_loads
    from beit3.export import export

    run = tmp_path / "run"
    result = pretrain(world, run, processes=processes, max_steps=1, save_every=1, zero_stage=zero_stage)
    assert result.returncode == 0, result.stdout[-3000:]
    tag = run / "checkpoints/step00000001"
    assert (run / "checkpoints/latest").read_text() == "step00000001"  # DeepSpeed's own pointer, once complete
    if processes > 1 or zero_stage == 3:  # (one process runs ZeRO-1/2 as stage 0: no ZeRO files, no ZeRO tool)
        _deepspeeds_own_tool_gives_the_exported_weights(run, tmp_path)
    check_weights_only(tag)  # what the package writes passes
    with weights_only_loads():  # and loads, DeepSpeed's records included
        for path in tag.glob("*.pt"):
            TorchCheckpointEngine().load(str(path), map_location="cpu")
    files = sorted(tag.glob("*.pt"))
    kinds = {path.name.replace("zero_pp_rank_1", "zero_pp_rank_0") for path in files}
    assert len(kinds) == (1 if processes == 1 and zero_stage < 3 else 2)  # model (+ optimizer states with ZeRO)
    marker = tmp_path / "ran"
    for path in files:
        original = path.read_bytes()
        _plant(path, marker)
        with pytest.raises(ValueError, match=f"{path.name} is not a weights-only checkpoint file"):
            check_weights_only(tag)
        with weights_only_loads(), pytest.raises(Exception, match="[Ww]eights only load failed"):
            TorchCheckpointEngine().load(str(path), map_location="cpu")  # DeepSpeed's own load asks weights_only=False
        with pytest.raises(ValueError, match=path.name):
            export(run, tmp_path / "export")
        assert not marker.exists(), f"code planted in {path.name} ran"
        path.write_bytes(original)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the forcing ends with the load
    # End to end: the run refuses to resume from the planted checkpoint and names the file.
    planted = files[-1]
    _plant(planted, marker)
    resumed = pretrain(world, run, processes=processes, max_steps=2, save_every=2, zero_stage=zero_stage)
    assert (
        resumed.returncode != 0
        and f"{planted.name} is not a weights-only checkpoint file" in resumed.stdout + resumed.stderr
    )
    assert not marker.exists()


@pytest.fixture(scope="module")
def image_codes(world):
    """The world's images encoded once by tokenizers/encode_images.py with the world's visual tokenizer (8x8 codes, 64 of them)."""
    command = [
        sys.executable,
        "tokenizers/encode_images.py",
        "--tokenizer",
        str(world / "visual-tokenizer"),
        "--images",
        str(world / "data/images"),
        "--output",
        str(world / "image-codes"),
        "--device",
        "cpu",
    ]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return world / "image-codes"


def test_one_process_run_trains_from_image_codes_without_a_visual_tokenizer(world, image_codes, tmp_path):
    steps = 12
    result = pretrain(
        world,
        tmp_path / "run",
        max_steps=steps,
        save_every=steps,
        warmup_steps=2,
        sets=[f"data.sources.image_codes={image_codes}", "visual_tokenizer=null"],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    image_losses = [r["image_loss"] for r in records]
    assert all(math.isfinite(loss) for loss in image_losses)
    # The visual head is sized to the codes' 64-code codebook (chance: ln 64 = 4.2, not ln 8192 = 9.0) ...
    assert json.loads((tmp_path / "run/model/config.json").read_text())["visual_vocab_size"] == 64
    assert image_losses[0] < math.log(64) + 1.5
    # ... and learns them: the masked-image loss of the last steps is below that of the first ones.
    assert sum(image_losses[-3:]) / 3 < sum(image_losses[:3]) / 3 - 0.1, image_losses
    assert "data.sources.image_codes is set" not in result.stderr  # no visual tokenizer to overrule


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "model.overrides={image_size: 64, patch_size: 16, max_position_embeddings: 66}",
            "8x8 codes per image, but the model has a 4x4 patch grid",
        ),
        (
            "model.overrides={image_size: 64, patch_size: 8, max_position_embeddings: 66, visual_vocab_size: 100}",
            "the model predicts 100 visual tokens but the codebook of image_codes",
        ),
    ],
)
def test_image_codes_that_do_not_fit_the_model_fail_before_training(world, image_codes, tmp_path, setting, message):
    result = pretrain(world, tmp_path / "run", max_steps=1, sets=[f"data.sources.image_codes={image_codes}", setting])
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output, output[-3000:]
    assert (
        output.count("data.sources.image_codes is set, so the image targets are the codes in") == 1
    )  # the codes win over visual_tokenizer
    assert not (tmp_path / "run/metrics.jsonl").exists()


# Two nodes simulated on this machine, one process each, as a hostfile or torchrun would start them on two machines


def two_nodes(world, launcher: str, output_dirs, tmp_path, sets=(), **train) -> list[subprocess.Popen]:
    """Starts node 0 and node 1 of a 2 x 1 run with ``launcher`` ("deepspeed" or "torchrun"), node i writing to
    ``output_dirs[i]`` (one folder for both, as a shared filesystem gives them, or one each)."""
    port = _free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    processes = []
    for node, output_dir in enumerate(output_dirs):
        if launcher == "deepspeed":  # --master_addr too: without it DeepSpeed asks node0 over ssh despite --no_ssh
            command = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node)]
            command += ["--master_addr", "127.0.0.1", "--master_port", str(port), "tasks/pretrain.py"]
        else:
            torchrun = str(Path(sys.executable).parent / "torchrun")
            command = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)]
            command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "tasks/pretrain.py"]
        command += ["--config", "configs/pretrain/tiny.yaml", *overrides(world, output_dir, **train)]
        command += [a for s in sets for a in ("--set", s)]
        processes.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                # one process on each node; torchrun's log folders (torchelastic_*) go to the test's folder, not /tmp
                env={**launcher_env(1), "TMPDIR": str(tmp_path)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    return processes


def finish(processes, timeout=600) -> list[tuple[int, str]]:
    return [(p.wait(timeout), p.stdout.read()) for p in processes]


@pytest.fixture(scope="module")
def one_node_of_two(world, tmp_path_factory) -> dict[int, float]:
    """The per-step losses of 6 steps on one node of two processes: what two nodes of one process must give."""
    run = tmp_path_factory.mktemp("one-node")
    reference = pretrain(world, run, processes=2, max_steps=6, save_every=3)
    assert reference.returncode == 0, reference.stdout[-3000:]
    return losses(run)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_nodes_train_as_one_node_of_two_processes_and_resume_exactly_after_sigkill(
    world, tmp_path, launcher, one_node_of_two
):
    steps = 6
    run = tmp_path / "two-nodes"
    nodes = two_nodes(world, launcher, [run, run], tmp_path, max_steps=steps, save_every=3)
    marker = run / "checkpoints/step00000003/COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and all(p.poll() is None for p in nodes) and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), finish(nodes)
    import psutil

    for process in nodes:  # both nodes die at once, as when a job is preempted (torchrun's workers have sessions
        tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
        for pid in tree:  # of their own: the launcher's process group alone would leave them running)
            os.kill(pid, signal.SIGKILL)
    finish(nodes)
    assert max(losses(run)) < steps, "the run finished before it could be killed"
    ended = finish(two_nodes(world, launcher, [run, run], tmp_path, max_steps=steps, save_every=3))
    assert all(code == 0 for code, _ in ended), [out[-3000:] for _, out in ended]
    assert "resumed from step 3" in ended[0][1]
    after, expected = losses(run), one_node_of_two
    assert sorted(after) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert after[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    saved = sorted(p.name for p in (run / "checkpoints/step00000006").glob("rank*.saved"))
    assert saved == ["rank00000.saved", "rank00001.saved"]


def test_nodes_that_do_not_share_output_dir_stop_with_a_clear_error_before_training(world, tmp_path):
    folders = [tmp_path / "node0-disk/run", tmp_path / "node1-disk/run"]  # the same run on each node's own disk
    ended = finish(two_nodes(world, "torchrun", folders, tmp_path, max_steps=4, save_every=2))
    for code, output in ended:
        assert code != 0
        assert "output_dir must be on a filesystem that every node shares" in output, output[-3000:]
    for folder in folders:
        assert not (folder / "metrics.jsonl").exists() and not list(folder.glob("checkpoints/step*"))


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_the_visual_tokenizer_runs_under_the_trainings_autocast(precision, dtype):
    from beit3.modeling_heads import Beit3ForMaskedDataModeling
    from beit3.training.pretraining import masked_data_modeling_step

    seen = []

    class RecordingTokenizer:
        def get_codebook_indices(self, pixel_values):
            enabled = torch.is_autocast_enabled("cpu")
            seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
            return torch.zeros(pixel_values.shape[0], 16, dtype=torch.long)

    model = Beit3ForMaskedDataModeling(tiny_config(visual_vocab_size=8))
    image = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "tokenizer_pixel_values": torch.rand(2, 3, 32, 32),
        "bool_masked_pos": torch.ones(2, 16, dtype=torch.bool),
    }
    loss, values = masked_data_modeling_step(RecordingTokenizer(), precision)(model, {"image": image}, 0)
    assert seen == [dtype] and torch.isfinite(loss) and "image_accuracy" in values


def test_bf16_under_zero_2_trains_with_fp32_gradient_accumulation(world, tmp_path):
    run = tmp_path / "bf16"
    result = pretrain(
        world, run, processes=2, max_steps=2, save_every=2, precision="bf16", gradient_accumulation_steps=2
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert all(math.isfinite(loss) for loss in losses(run).values())
    assert json.loads((run / "run_config.json").read_text())["train"]["precision"] == "bf16"


@pytest.mark.parametrize("tokenizer", ["vqkd", "dvae", None])
def test_the_pretraining_step_reads_no_value_back_from_the_device(tokenizer):
    # On the meta device a tensor has no values: any host read (.item(), bool(), boolean indexing, nonzero) raises.
    # What runs there (forward and backward of every kind, the visual tokenizer included) is what runs on a GPU
    # without a host sync; the counts the data pipeline gives (num_masked_*) are what make it possible.
    from beit3.modeling_heads import Beit3ForMaskedDataModeling
    from beit3.training.pretraining import masked_data_modeling_step
    from beit3.visual_tokenizers import DVAE, DVAEConfig

    def empty(*shape, dtype=torch.long):
        return torch.empty(*shape, dtype=dtype, device="meta")

    with torch.device("meta"):
        model = Beit3ForMaskedDataModeling(tiny_config(itm_weight=1.0, visual_vocab_size=64))
        visual = {
            "vqkd": lambda: VQKD(VQKDConfig.from_preset("vqkd_tiny", codebook_size=64)),
            "dvae": lambda: DVAE(DVAEConfig.from_preset("dvae_tiny", codebook_size=64)),
            None: lambda: None,
        }[tokenizer]()
    image = {"pixel_values": empty(2, 3, 32, 32, dtype=torch.uint8), "bool_masked_pos": empty(2, 16, dtype=torch.bool)}
    if visual is None:
        image["image_labels"] = empty(2, 16)
    else:
        size = visual.config.image_size
        image["tokenizer_pixel_values"] = empty(2, 3, size, size, dtype=torch.uint8)
    text = {"input_ids": empty(2, 10), "attention_mask": empty(2, 10), "labels": empty(2, 10)}
    batch = {
        "image": {**image, "num_masked_patches": 12},
        "text": {**text, "num_masked_text_tokens": 3},
        "pair": {**text, "pixel_values": empty(2, 3, 32, 32, dtype=torch.uint8), "num_masked_text_tokens": 5},
        "itm": {
            "pixel_values": empty(4, 3, 32, 32, dtype=torch.uint8),
            "input_ids": empty(4, 10),
            "itm_labels": empty(4),
        },
    }
    loss, values = masked_data_modeling_step(visual)(model, batch, 0)
    loss.backward()
    assert loss.device.type == "meta" and model.mim_head.weight.grad is not None
    assert set(values) == {f"{kind}_{v}" for kind in ("image", "text", "pair", "itm") for v in ("loss", "accuracy")}
    # Without the counts the masked positions are found by reading the mask: the check above would catch a
    # step that slipped back to that.
    del batch["text"]["num_masked_text_tokens"]
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        masked_data_modeling_step(visual)(model, {"text": batch["text"]}, 0)
