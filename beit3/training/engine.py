"""The training loop, through DeepSpeed, from one CPU process to many GPU nodes.

    engine = Engine(model, settings, deepspeed_config, setup_distributed())   # DeepSpeed engine, optimizer, schedule
    engine.fit(step_fn, make_loader, samples_per_step)                         # resumes from output_dir, trains, checkpoints

The programs build it through ``beit3.training.runner``, which every training program shares.

Exact resume: batches are a pure function of the step (see ``beit3.data.pretraining``), and the
global RNG is re-seeded from (seed, step, rank) before every step, so dropout and drop path repeat
too. A checkpoint holds the model, optimizer and schedule (DeepSpeed's) plus the step and the
running counters; it counts only once a ``COMPLETE`` marker is written after every rank saved,
so a save that dies halfway is never the one a restart picks.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..checkpoints import COMPLETE, check_weights_only, complete_checkpoints, mark_complete, weights_only_loads
from ..data.sampling import mixed_seed
from ..io import write_text_atomic
from ..log import get_logger
from ..metrics import write_json_atomic
from ..package_files import find_config_file
from .config import Section, doc

logger = get_logger(__name__)


@dataclass
class TrainSettings(Section):
    """What the loop needs from a run config (field names as in the YAML ``train`` section)."""

    section: ClassVar[str] = "train"
    output_dir: str = doc(
        "the run's folder: checkpoints, metrics.jsonl, run_config.json, model/ (a restart resumes from it)"
    )
    max_steps: int = doc("optimizer updates in all", low=1)
    save_every: int = doc("a checkpoint every this many steps (and at the end)", low=1)
    seed: int = doc("weights, data order, crops, masks and dropout all follow from it", 0, low=0)
    lr: float = doc("peak learning rate (after warmup; a cosine down to lr x min_lr_ratio)", 1e-3, above=0)
    min_lr_ratio: float = doc("the cosine ends at lr x this (unilm's fine-tuning: min_lr 1e-6)", 0.0, low=0, high=1)
    warmup_steps: int = doc("linear warmup from 0", 0, low=0)
    weight_decay: float = doc("AdamW's, none on norms, biases, embeddings and special tokens", 0.05, low=0)
    betas: tuple[float, float] = doc("AdamW's: two numbers in [0, 1)", (0.9, 0.98))
    eps: float = doc("AdamW's", 1e-6, above=0)
    gradient_clipping: float = doc("global norm; 0 turns it off", 3.0, low=0)
    gradient_accumulation_steps: int = doc("micro-batches per update", 1, low=1)
    micro_batch_size: int = doc(
        "what DeepSpeed counts as the batch; pretraining's batches are dicts of kinds", 1, low=1
    )
    precision: str = doc("autocast of training (bf16/fp16 on GPU)", "fp32", choices=("fp32", "bf16", "fp16"))
    zero_stage: int = doc(
        "DeepSpeed ZeRO stage (the one source of it: a DeepSpeed JSON of another stage is refused)",
        2,
        choices=(0, 1, 2, 3),
    )
    keep_last: int = doc("complete checkpoints kept", 2, low=1)
    log_every: int = doc("a metrics.jsonl record every this many steps", 10, low=1)
    max_nonfinite_steps: int = doc("non-finite losses in a row before the run stops (each is skipped)", 5, low=1)
    num_workers: int = doc("data-loader workers per process", 1, low=0)
    gradient_checkpointing: bool = doc("recompute activations in the backward pass", False)
    layer_decay: float | None = doc(
        "fine-tuning: lr x layer_decay ** (depth from the top), as BEiT does", None, above=0, high=1
    )
    head_lr_scale: float = doc(
        "without layer_decay: lr x this for every parameter outside the backbone (see build_optimizer)", 1.0, above=0
    )

    @classmethod
    def from_config(cls, section: dict) -> TrainSettings:
        values = dict(section)
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        return super().from_config(values)

    def __post_init__(self):
        """Every field is checked before any work (the limits beside each field's doc, and these two): a bad value
        names the field, the value and what is allowed."""
        super().__post_init__()
        if not self.output_dir:
            raise ValueError("train.output_dir must be a folder path; got ''.")
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)
        ):
            raise ValueError(f"train.betas must be two numbers in [0, 1), e.g. [0.9, 0.98]; got {self.betas!r}.")


def read_run_log(path: str | os.PathLike) -> list[dict]:
    """The records of a run's ``metrics.jsonl``; a torn last line (the run was killed while writing it) is left out."""
    lines = Path(path).read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not a JSON record: {line[:80]!r}") from None
    return records


def _truncate_run_log(path: Path, step: int) -> None:
    """Keeps the records up to ``step`` (the one the run resumes from): the steps it repeats are logged once."""
    if not path.exists():
        return

    kept = [record for record in read_run_log(path) if record.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


# What a resumed run may change: how long it runs, how often it logs and saves, what it keeps, its loader workers,
# and the spelling of its output_dir. Anything else would make the resumed steps those of another run.
RESUMABLE_CHANGES = frozenset(
    {
        "train.max_steps",
        "train.save_every",
        "train.log_every",
        "train.keep_last",
        "train.max_nonfinite_steps",
        "train.num_workers",
        "train.output_dir",
    }
)


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        return {
            key: value for name, child in node.items() for key, value in _flatten(child, f"{prefix}{name}.").items()
        }
    return {prefix[:-1]: node}


def record_run_config(engine: Engine, config: dict, may_change: frozenset = RESUMABLE_CHANGES) -> list[str]:
    """Writes ``output_dir/run_config.json`` (rank 0, atomically), after checking ``config`` against the one of
    the run it will resume, if any: a changed field outside ``may_change`` raises ValueError naming each field
    with its old and new value, and nothing is written. Returns the allowed changes taken ("field: old -> new").

    Call it before writing anything else into output_dir (``model/config.json``...), so that a refused
    resume leaves the run's files as the checkpoints need them.
    """
    path = engine.output_dir / "run_config.json"
    resolved = json.loads(json.dumps(config))  # tuples as lists, as the file has them
    taken = []
    if engine.complete_checkpoints() and path.is_file():
        old, new = _flatten(json.loads(path.read_text())), _flatten(resolved)
        missing = "(not set)"
        changed = {
            key: (old.get(key, missing), new.get(key, missing))
            for key in sorted(old.keys() | new.keys())
            if old.get(key, missing) != new.get(key, missing)
        }
        refused = {key: change for key, change in changed.items() if key not in may_change}
        if refused:
            raise ValueError(
                f"{engine.output_dir} holds checkpoints of a run with another config: "
                + "; ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in refused.items())
                + f". A resumed run may change only {', '.join(sorted(may_change))}. Restore those fields to "
                "resume, or give the new run another train.output_dir."
            )
        taken = [f"{key}: {a!r} -> {b!r}" for key, (a, b) in changed.items()]
        if taken and engine.rank == 0:
            logger.warning(f"resuming {engine.output_dir} with changed settings: {'; '.join(taken)}")
    if engine.rank == 0:
        write_json_atomic(path, resolved, indent=2)
    return taken


def cpu_threads(local_size: int, num_workers: int, cores: int | None = None) -> int:
    """Torch threads per process of a CPU run: the cores this process may use, shared among the ``local_size``
    processes of this machine, less one for each of a process's ``num_workers`` loader workers (processes of their
    own), at least 1. OpenMP's threads wait on each other at every operator, so a thread that loses its core to a
    worker or another process stalls the rest. Measured (2026-12-03, 2-core AMD EPYC, requirements/lock.txt;
    configs/pretrain/tiny.yaml in one process with its loader worker, 300 steps, runs alternated): 1 thread ran at
    930 and 947 samples/s against 841 and 862 with 2; beside one busy process, 804 and 796 against 401 and 325."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_size - num_workers)


def setup_distributed(num_workers: int = 0) -> tuple[int, int, torch.device]:
    """Initializes torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); a plain
    ``python script.py`` becomes a world of one. On CPU, sets the torch threads of every process (``cpu_threads``
    of the cores, the processes here and their ``num_workers`` loader workers) unless ``OMP_NUM_THREADS`` is set,
    and says which. Returns (rank, world size, device)."""
    import deepspeed

    if "RANK" not in os.environ:  # not started by a launcher
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    if not dist.is_initialized():
        on_cpu = not torch.cuda.is_available()
        if on_cpu and os.access(sys.prefix, os.W_OK):
            # DeepSpeed's CPU ops (the CPU Adam of ZeRO-Offload) are C++ built on first use. torch caches them under a
            # folder named after the interpreter path, so one environment seen through two paths rebuilt them every run.
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        if on_cpu:
            # DeepSpeed's CPU backend builds a shared-memory all-reduce (a minute of C++ the first time) and maps a
            # 69 MB /dev/shm buffer per process that it never removes. Only its inference_all_reduce (tensor-parallel
            # inference kernels) uses them; training's collectives (ZeRO's reduce-scatter, all-gather, all-reduce)
            # go through torch.distributed over gloo, so the engine starts neither.
            # (by module name: the package attribute deepspeed.comm.torch is the torch module it imports)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            if os.environ.get("LOCAL_RANK", "0") == "0":
                sweep_stale_shared_memory_buffers()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cpu":
        # By default each process starts a thread per core, so N ranks on N cores would run N x N threads, and
        # loader workers take cores of their own (torchrun sets 1 thread for the same reason).
        if "OMP_NUM_THREADS" in os.environ:
            why = "OMP_NUM_THREADS"
        else:
            torch.set_num_threads(cpu_threads(local_size, num_workers))
            why = f"{local_size} process(es) on this machine, {num_workers} loader worker(s) each; OMP_NUM_THREADS sets it"
        if local_rank == 0:
            logger.info(f"CPU: {torch.get_num_threads()} torch thread(s) per process ({why})")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def sweep_stale_shared_memory_buffers(folder: str | os.PathLike = "/dev/shm", min_age_s: float = 60.0) -> list[Path]:
    """Removes this user's DeepSpeed all-reduce buffers in ``folder`` that no process maps and that are older than
    ``min_age_s`` (a starting run may have created its buffer and not mapped it yet), and returns them: what earlier
    versions of this engine, or other DeepSpeed programs on CPU, left behind. Linux; elsewhere a no-op."""
    folder = Path(folder)
    candidates = (
        [
            p
            for p in folder.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")
            if time.time() - p.stat().st_mtime > min_age_s
        ]
        if folder.is_dir()
        else []
    )
    if not candidates or not Path("/proc/self/maps").exists():
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(maxsplit=5)[-1] for line in maps.read_text().splitlines() if str(folder) in line)
        except OSError:  # gone meanwhile, or another user's
            continue
    stale = [p for p in candidates if str(p) not in mapped]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.warning(
            f"removed {len(stale)} stale DeepSpeed shared-memory buffer(s) from {folder}, left by earlier runs "
            f"(e.g. {stale[0].name})"
        )
    return stale


RUN_LOCK = "run.lock"


def _lock_output_dir(output_dir: Path) -> None:
    """Takes ``output_dir/run.lock`` (host and pid of rank 0) for this process, so that two runs cannot interleave
    their checkpoints and logs. A lock whose process is gone (a killed run) is taken over; it goes at exit."""
    lock, me = output_dir / RUN_LOCK, f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock.read_text().strip() if lock.exists() else ""
            host, _, pid = holder.partition(" ")
            if holder == me:
                return  # this process holds it already (a second engine on the same run)
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # stale: its run was killed
                continue
            raise RuntimeError(
                f"{output_dir} is in use by another run (process {pid or '?'} on {host or '?'}; {lock}). Two runs in one "
                f"output_dir would interleave their checkpoints and logs: wait for it, use another output_dir, or "
                f"remove {lock} if that run is gone."
            ) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(me + "\n")
        atexit.register(lambda: lock.exists() and lock.read_text().strip() == me and lock.unlink())
        return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Norms, biases, embeddings, position tables and special tokens: trained without weight decay."""
    exempt = ("_token", "position_embeddings", "position_embeddings.weight", "text_embeddings.weight", "logit_scale")
    return {name for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith(exempt)}


def build_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over timm's parameter groups: no weight decay on norms, biases and embeddings and, with
    ``layer_decay``, a learning rate that shrinks by that factor per layer from the top down; without
    it, ``head_lr_scale`` multiplies the learning rate of every parameter outside the backbone (``beit3.*``): the
    VQA ``pooler.*`` and ``head.*``, the NLVR2 and classification ``head.*`` (and ``fc_norm.*``), retrieval's
    ``vision_head``, ``language_head`` and ``logit_scale``, captioning's ``mlm_head``. That is unilm's
    task_head_lr_weight (VQA x20) with one difference: unilm boosts ``head*`` names only and leaves the freshly
    initialized VQA pooler at the backbone's rate."""
    exempt = no_weight_decay_names(model)
    if settings.layer_decay is None:
        groups = param_groups_weight_decay(model, settings.weight_decay, no_weight_decay_list=exempt)
        if settings.head_lr_scale != 1.0:
            backbone = {id(p) for p in getattr(model, "base_model", model).parameters()}
            head = {id(p) for p in model.parameters() if id(p) not in backbone}
            if not head:
                raise ValueError(
                    f"head_lr_scale {settings.head_lr_scale} but {type(model).__name__} has no task-specific parameters "
                    "(none outside beit3.*) to scale."
                )
            groups = [
                {**group, "params": params, "lr": settings.lr * scale}
                for group in groups
                for params, scale in (
                    ([p for p in group["params"] if id(p) not in head], 1.0),
                    ([p for p in group["params"] if id(p) in head], settings.head_lr_scale),
                )
                if params
            ]
    else:
        groups = param_groups_layer_decay(
            model, settings.weight_decay, no_weight_decay_list=exempt, layer_decay=settings.layer_decay
        )
        for group in groups:  # the schedule scales each group's initial lr, so the layer scale goes there
            group["lr"] = settings.lr * group.pop("lr_scale")
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)


def load_deepspeed_json(name: str | None, settings: TrainSettings) -> dict:
    """The DeepSpeed JSON a run names (``data.deepspeed``: a path, or the name of a packaged one such as
    ``configs/deepspeed/zero2.json``), or the packaged ``configs/deepspeed/zero<train.zero_stage>.json``.
    ``train.zero_stage`` is the one source of the ZeRO stage: a JSON that names another stage is refused, never
    silently preferred. Stage 0 needs no file."""
    if name is None and settings.zero_stage == 0:
        return {"zero_optimization": {"stage": 0}}
    path = find_config_file(name or f"configs/deepspeed/zero{settings.zero_stage}.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != settings.zero_stage:
        raise ValueError(
            f"train.zero_stage is {settings.zero_stage}, but the DeepSpeed config {path} says stage {stage}: set "
            f"train.zero_stage={stage}, or name a JSON of stage {settings.zero_stage} in data.deepspeed "
            f"(configs/deepspeed/zero{settings.zero_stage}.json)."
        )
    return config


def deepspeed_config(settings: TrainSettings, world_size: int, base: dict | None = None) -> dict:
    """DeepSpeed's config: a file from configs/deepspeed/ (``base``) with the run's batch, clipping and precision filled in."""
    config = json.loads(json.dumps(base or {"zero_optimization": {"stage": settings.zero_stage}}))
    config.update(
        train_micro_batch_size_per_gpu=settings.micro_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        train_batch_size=settings.micro_batch_size * settings.gradient_accumulation_steps * world_size,
        gradient_clipping=settings.gradient_clipping,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    config["bf16"] = {"enabled": settings.precision == "bf16"}
    config["fp16"] = {
        "enabled": settings.precision == "fp16",
        **({"initial_scale_power": 16} if settings.precision == "fp16" else {}),
    }
    zero = config.get("zero_optimization", {})
    if world_size == 1 and zero.get("stage", 0) in (1, 2) and not zero.get("offload_optimizer"):
        # One process has nothing to partition: ZeRO-1/2 would only copy every gradient and parameter in and out of
        # its flat partitions (28% of a step at the tiny preset, benchmarks/pretrain.py). Stage 0 is the same update.
        logger.warning(
            f"one process: ZeRO stage {zero['stage']} has nothing to partition; running stage 0 (the same update, "
            "without the partition copies)"
        )
        config["zero_optimization"] = {"stage": 0}
    return config


class Engine:
    """DeepSpeed engine + the loop around it. ``step_fn(module, batch, step) -> (loss, {name: float tensor})``.

    ``distributed``: (rank, world size, device), from ``setup_distributed()``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        settings: TrainSettings,
        base_deepspeed_config: dict | None,
        distributed: tuple[int, int, torch.device],
    ):
        import deepspeed

        self.settings = settings
        self.rank, self.world_size, self.device = distributed
        self.output_dir = Path(settings.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        if self.rank == 0:
            try:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                probe = self.output_dir / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as error:
                raise PermissionError(
                    f"Cannot write to output_dir {self.output_dir}: {error}. Choose a writable directory."
                ) from error
            _lock_output_dir(self.output_dir)
        # transformers 5.24 renamed it (the old name warns and goes in v6); older releases have only the old one
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
            model, "gradient_checkpointing_enable", None
        )
        if settings.gradient_checkpointing and enable is not None:
            enable()
        for parameter in model.parameters():
            # (retrieval's logit_scale) DeepSpeed broadcasts parameters viewed as bytes, impossible for 0-dim
            if parameter.dim() == 0:
                parameter.data = parameter.data.reshape(1)  # beit3.export gives it back its shape
        optimizer = build_optimizer(model, settings)
        schedule = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, settings.warmup_steps, settings.max_steps, min_lr_rate=settings.min_lr_ratio
        )
        self.deepspeed_config = deepspeed_config(settings, self.world_size, base_deepspeed_config)
        # What a checkpoint's optimizer partitions depend on: resume checks it against the COMPLETE marker.
        self.layout = {
            "world_size": self.world_size,
            "zero_stage": self.deepspeed_config.get("zero_optimization", {}).get("stage", 0),
        }
        self.module, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=model.to(self.device), optimizer=optimizer, lr_scheduler=schedule, config=self.deepspeed_config
        )
        self.step = 0
        self.counters: dict[str, float] = {}
        # A streamed loader's position ({"workers", "streams"}; see StreamingPretrainingBatches): this rank's, from
        # the batches consumed so far, or from the checkpoint resumed. make_loader reads it to start where it was.
        self.data_state: dict = {}

    # -- checkpoints -------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.checkpoint_dir)

    def save(self) -> None:
        tag = f"step{self.step:08d}"
        # A checkpoint of blown-up weights (a finite loss, then an update to inf) would be "the last good one".
        finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in self.module.module.parameters())
        flag = torch.tensor([float(finite)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0:
            last = self.complete_checkpoints()
            raise RuntimeError(
                f"step {self.step}: the weights are no longer finite (an update blew them up), so this checkpoint "
                f"is not saved. The last good checkpoint is {last[-1] if last else 'none (nothing was saved yet)'}. "
                "Lower the learning rate, check the data, or use fp32."
            )
        self.module.save_checkpoint(
            str(self.checkpoint_dir),
            tag=tag,
            client_state={"step": self.step, "counters": self.counters},
            save_latest=False,
        )
        data_states = [None] * self.world_size
        dist.all_gather_object(data_states, self.data_state)  # (DeepSpeed's client_state is written by rank 0 only)
        dist.barrier()
        if self.rank == 0:
            extra = {"data_state": data_states} if any(data_states) else {}
            mark_complete(self.checkpoint_dir / tag, {"step": self.step, "time": time.time(), **self.layout, **extra})
            complete = self.complete_checkpoints()
            keep = set(complete[-self.settings.keep_last :])
            for path in self.checkpoint_dir.glob("step*"):  # older complete ones and abandoned halves
                if path not in keep and int(path.name[4:]) <= int(complete[-1].name[4:]):
                    shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def resume(self) -> bool:
        """Loads the newest complete checkpoint in output_dir, if any."""
        complete = self.complete_checkpoints()
        if not complete:
            return False
        written = json.loads((complete[-1] / COMPLETE).read_text())
        mismatch = {
            key: (written[key], value) for key, value in self.layout.items() if key in written and written[key] != value
        }
        if mismatch:  # DeepSpeed's optimizer partitions only load into the layout that wrote them
            raise RuntimeError(
                f"{complete[-1]} was written with {', '.join(f'{k}={w}' for k, (w, _) in mismatch.items())}; this run has "
                f"{', '.join(f'{k}={n}' for k, (_, n) in mismatch.items())}. Resume it with as many processes (and the "
                "same ZeRO stage) as wrote it, or start a new run in another output_dir."
            )
        check_weights_only(complete[-1])
        with weights_only_loads():  # DeepSpeed itself loads with weights_only=False
            _, client_state = self.module.load_checkpoint(str(self.checkpoint_dir), tag=complete[-1].name)
        self.step, self.counters = client_state["step"], client_state.get("counters", {})
        self.data_state = (written.get("data_state") or [{}] * self.world_size)[self.rank] or {}
        return True

    # -- the loop ------------------------------------------------------------------------------
    def _mean_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(values)
        stacked = torch.stack([values[n].detach().float().reshape(()) for n in names]).to(self.device)
        dist.all_reduce(stacked)
        return {n: v / self.world_size for n, v in zip(names, stacked.tolist())}

    def fit(
        self, step_fn: Callable, make_loader: Callable[[int, int], torch.utils.data.DataLoader], samples_per_step: int
    ) -> list[dict]:
        """Trains from the current step (after ``resume``) to ``max_steps``; returns the logged records.

        A step is one optimizer update over ``gradient_accumulation_steps`` micro-batches; ``step_fn`` gets the
        number of the step it is part of (0-based: the updates done before it).
        ``make_loader(first, count)`` gives this rank's micro-batches number ``first`` to ``first + count - 1``
        (a streamed loader also starts from ``self.data_state``, the position resumed); ``samples_per_step``
        counts one micro-batch of one rank. A batch may carry ``counts`` ({name: number}, summed into the logged
        counters) and ``data_state`` (its stream position, saved with the checkpoints).
        """
        settings = self.settings
        accumulation = settings.gradient_accumulation_steps
        if self.resume() and self.rank == 0:
            logger.info(f"resumed from step {self.step} ({self.complete_checkpoints()[-1]})")
        if self.step >= settings.max_steps:
            return []
        loader = iter(make_loader(self.step * accumulation, (settings.max_steps - self.step) * accumulation))
        log = RunLog(self.output_dir, self.rank == 0, self.step, settings.max_steps)
        records, window, times, nonfinite = (
            [],
            [],
            [],
            0,
        )  # window: values of each micro-batch; times: (seconds, data wait) per step
        self.module.train()
        while self.step < settings.max_steps:
            start, waited, skipped, kept = time.perf_counter(), 0.0, False, len(window)
            for micro in range(accumulation):
                before = time.perf_counter()
                batch = next(loader)
                waited += time.perf_counter() - before
                # A streamed loader's position after this batch: saved with the next checkpoint
                if "data_state" in batch:
                    state = batch.pop("data_state")
                    self.data_state = {
                        "workers": state["workers"],
                        "streams": {**self.data_state.get("streams", {}), **state["streams"]},
                    }
                for key, count in batch.pop("counts", {}).items():  # the data's own counters (skipped samples, ...)
                    self.counters[key] = self.counters.get(key, 0) + count
                if skipped:  # the rest of a skipped step's micro-batches: consumed, so the data stays in step
                    continue
                seed = mixed_seed(settings.seed, self.step * accumulation + micro, self.rank)  # the data's seeding too
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)  # numpy-based augmentations (timm's mixup) repeat on resume too
                loss, values = step_fn(self.module, to_device(batch, self.device), self.step)
                finite = torch.tensor([float(torch.isfinite(loss))], device=self.device)
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() == 0:
                    skipped = True
                    nonfinite += 1
                    self._on_nonfinite(loss, nonfinite, accumulation, micro)
                    continue
                self.module.backward(loss)
                self.module.step()
                window.append({"loss": loss.detach(), **values})
            self.step += 1
            if skipped:
                del window[kept:]  # a partial step's values
                continue
            nonfinite = 0
            times.append((time.perf_counter() - start, waited))
            if self.step % settings.log_every == 0 or self.step == settings.max_steps:  # (times is never empty here)
                record = self._log(window, times, samples_per_step * accumulation)
                window, times = [], []
                if self.rank == 0:
                    records.append(record)
                    log.write(record)
            log.advance()
            if self.step % settings.save_every == 0 or self.step == settings.max_steps:
                self.save()
        log.close()
        return records

    def _on_nonfinite(self, loss: torch.Tensor, count: int, accumulation: int, micro: int) -> None:
        """A non-finite loss: the step is skipped (nothing was applied yet), or the run stops when that
        happens too often, or mid-accumulation (DeepSpeed has already taken earlier micro-batches' gradients)."""
        self.module.zero_grad()
        last = self.complete_checkpoints()
        advice = (
            f"The last good checkpoint is {last[-1] if last else 'none (nothing was saved yet)'}. Lower the learning rate, "
            "check the data, or use fp32."
        )
        if accumulation > 1 and micro > 0:
            raise RuntimeError(
                f"step {self.step}: the loss of micro-batch {micro} is not finite ({loss.item()}) after "
                f"{micro} micro-batches of gradients were accumulated; training stopped rather than apply a partial "
                f"update. {advice}"
            )
        warnings.warn(
            f"step {self.step}: the loss is not finite ({loss.item()}); the step is skipped "
            f"({count} in a row, the limit is {self.settings.max_nonfinite_steps}).",
            stacklevel=3,
        )
        if count >= self.settings.max_nonfinite_steps:
            raise RuntimeError(
                f"{count} steps in a row had a non-finite loss (last at step {self.step}); training stopped. {advice}"
            )

    def _log(self, window: list[dict], times: list[tuple[float, float]], samples_per_step: int) -> dict:
        keys = sorted({k for values in window for k in values})
        sums = {k: torch.stack([values[k].detach().float() for values in window if k in values]).mean() for k in keys}
        means = self._mean_over_ranks(sums)
        seconds = sum(t[0] for t in times)
        record = {
            "step": self.step,
            **{k: round(v, 6) for k, v in means.items()},
            "lr": self.schedule.get_last_lr()[0],
            "samples_per_s": samples_per_step * self.world_size * len(times) / seconds,
            "data_wait_share": sum(t[1] for t in times) / seconds,
            **self.counters,
        }
        return record


class RunLog:
    """What a run reports while it trains, from rank 0 (``active``; elsewhere it stays quiet): ``metrics.jsonl`` (one
    JSON record per logged step, cut back to the step a resumed run starts from, so repeated steps are logged
    once), TensorBoard scalars (``output_dir/tensorboard``) and the tqdm bar."""

    def __init__(self, output_dir: Path, active: bool, step: int, max_steps: int):
        self.path, self.writer = output_dir / "metrics.jsonl", None
        if active:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            _truncate_run_log(self.path, step)
        self.progress = tqdm(total=max_steps, initial=step, desc="train", disable=not active, dynamic_ncols=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, record["step"])
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", samples_per_s=f"{record['samples_per_s']:.1f}")

    def advance(self) -> None:
        self.progress.update(1)

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def to_device(batch, device: torch.device):
    """The tensors of a (nested) dict batch moved to ``device``; anything else (ids as strings) as it is."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch
