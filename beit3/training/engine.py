"""The training loop, through DeepSpeed, from one CPU process to many GPU nodes.

    engine = Engine(model, settings, deepspeed_config, setup_distributed())   # DeepSpeed engine, optimizer, schedule
    engine.fit(step_fn, make_loader, samples_per_step)                         # resumes from output_dir, trains, checkpoints

The programs build it through ``beit3.training.runner``, which every training program shares. Beside it: the
``train`` section (``settings``), the processes (``distributed``), the optimizer (``optimizer``) and what a run
reports (``run_log``).

Exact resume: batches are a pure function of the step (see ``beit3.data.pretraining``), and the
global RNG is re-seeded from (seed, step, rank) before every step, so dropout and drop path repeat
too. A checkpoint holds the model, optimizer and schedule (DeepSpeed's) plus the step and the
running counters; it counts only once a ``COMPLETE`` marker is written after every rank saved,
so a save that dies halfway is never the one a restart picks.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..checkpoints import COMPLETE, check_weights_only, complete_checkpoints, mark_complete, weights_only_loads
from ..data.sampling import mixed_seed
from ..io import write_text_atomic
from ..log import get_logger
from ..package_files import find_config_file
from .distributed import agree_on, check_shared_output_dir, lock_output_dir, use_deterministic_kernels
from .optimizer import build_optimizer
from .run_log import RunLog
from .settings import TrainSettings

logger = get_logger(__name__)


def load_deepspeed_json(settings: TrainSettings) -> dict:
    """The DeepSpeed JSON a run names (``train.deepspeed``: a path, or the name of a packaged one such as
    ``configs/deepspeed/zero2.json``), or the packaged ``configs/deepspeed/zero<train.zero_stage>.json``.
    ``train.zero_stage`` is the one source of the ZeRO stage: a JSON that names another stage is refused, never
    silently preferred. Stage 0 needs no file."""
    name = settings.deepspeed
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
            f"train.zero_stage={stage}, or name a JSON of stage {settings.zero_stage} in train.deepspeed "
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
    # (check_grad_overflow: DeepSpeed's default, stated, since the Engine relies on it to skip non-finite updates)
    config["bf16"] = {"enabled": settings.precision == "bf16", "check_grad_overflow": True}
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
    if settings.precision == "bf16" and config.get("zero_optimization", {}).get("stage", 0) > 0:
        # bf16 keeps 8 bits of mantissa: gradients summed over micro-batches and ranks in it lose the small ones.
        # Accumulate and reduce them in fp32, as the paper's ZeRO runs would want. (DeepSpeed takes an fp32
        # accumulation with bf16 weights only under ZeRO; one process, at stage 0, accumulates in bf16.)
        config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        config.setdefault("communication_data_type", "fp32")
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
            lock_output_dir(self.output_dir)
        check_shared_output_dir(self.output_dir, self.rank, self.world_size)
        if settings.deterministic:
            use_deterministic_kernels()
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
        # In bf16 and fp16 DeepSpeed's optimizers check the gradients' norm at each update (they read it anyway, to
        # clip) and skip an update that is not finite, so the step needs no read of its own: the loss is checked
        # only when an update was skipped. fp32 (a plain torch optimizer at stage 0, which applies a non-finite
        # update) and ZeRO-3 read the loss before each backward.
        self.deepspeed_skips_nonfinite = settings.precision in ("bf16", "fp16") and self.layout["zero_stage"] < 3
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
        write_text_atomic(self.checkpoint_dir / tag / f"rank{self.rank:05d}.saved", "")
        data_states = [None] * self.world_size
        dist.all_gather_object(data_states, self.data_state)  # (DeepSpeed's client_state is written by rank 0 only)
        dist.barrier()
        missing = [r for r in range(self.world_size) if not (self.checkpoint_dir / tag / f"rank{r:05d}.saved").exists()]
        # complete only when every rank's part is where rank 0 sees it
        agree_on(missing, self.rank, self.world_size, f"which ranks' parts of {tag} are missing", self.checkpoint_dir)
        if missing:
            raise RuntimeError(
                f"{self.checkpoint_dir / tag} lacks the parts of ranks {missing}: they saved where the other ranks cannot "
                "see. output_dir must be on a filesystem that every node shares."
            )
        if self.rank == 0:
            extra = {"data_state": data_states} if any(data_states) else {}
            mark_complete(self.checkpoint_dir / tag, {"step": self.step, "time": time.time(), **self.layout, **extra})
            # DeepSpeed's tools (zero_to_fp32.py, load_checkpoint without a tag) read the newest tag from `latest`;
            # it names a checkpoint only once that is complete.
            write_text_atomic(self.checkpoint_dir / "latest", tag)
        dist.barrier()
        # Pruning removes only checkpoints older than the newest one every rank sees complete
        seen = [None] * self.world_size
        dist.all_gather_object(seen, [path.name for path in self.complete_checkpoints()])
        common = sorted(set.intersection(*map(set, seen)))
        if self.rank == 0 and common:
            keep = set(common[-self.settings.keep_last :])
            for path in self.checkpoint_dir.glob("step*"):  # older complete ones and abandoned halves
                if path.name not in keep and path.name <= common[-1]:
                    shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def resume(self) -> bool:
        """Loads the newest complete checkpoint in output_dir, if any; every rank the same one, or none starts."""
        complete = self.complete_checkpoints()
        newest = complete[-1].name if complete else None
        agree_on(newest, self.rank, self.world_size, "the checkpoint to resume", self.checkpoint_dir)
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
        records, window, times = [], [], []  # window: values of each micro-batch; times: (seconds, data wait) a step
        self.nonfinite_in_a_row = 0
        self.module.train()
        while self.step < settings.max_steps:
            start, kept = time.perf_counter(), len(window)
            skipped, waited = self._one_step(step_fn, loader, window)
            self.step += 1
            if skipped:
                del window[kept:]  # a partial step's values
                continue
            self.nonfinite_in_a_row = 0
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

    def _one_step(self, step_fn: Callable, loader, window: list[dict]) -> tuple[bool, float]:
        """One optimizer update over the micro-batches of an accumulation, their values appended to ``window``;
        returns (whether the update was skipped for a non-finite loss, seconds waited for data)."""
        accumulation = self.settings.gradient_accumulation_steps
        waited, skipped = 0.0, False
        step_losses = []  # (DeepSpeed-checked runs) this step's losses, read only if its update was skipped
        for micro in range(accumulation):
            batch, wait = self._next_batch(loader)
            waited += wait
            if skipped:  # the rest of a skipped step's micro-batches: consumed, so the data stays in step
                continue
            seed = mixed_seed(self.settings.seed, self.step * accumulation + micro, self.rank)  # the data's seeding too
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)  # numpy-based augmentations (timm's mixup) repeat on resume too
            loss, values = step_fn(self.module, to_device(batch, self.device), self.step)
            if self.deepspeed_skips_nonfinite:
                step_losses.append(loss.detach())
            elif not self._all_finite([loss]):  # before its backward writes non-finite gradients
                skipped = True
                self.nonfinite_in_a_row += 1
                self._on_nonfinite(loss, self.nonfinite_in_a_row, accumulation, micro)
                continue
            self.module.backward(loss)
            self.module.step()
            window.append({"loss": loss.detach(), **values})
        if step_losses and not self.module.was_step_applied() and not self._all_finite(step_losses):
            # DeepSpeed skipped the update (it also skips fp16 updates whose loss scale it lowers: those count
            # as steps, as the loss was finite)
            skipped = True
            self.nonfinite_in_a_row += 1
            shown = next((x for x in step_losses if not torch.isfinite(x)), step_losses[-1])  # (maybe another rank's)
            self._on_nonfinite(
                shown, self.nonfinite_in_a_row, accumulation, micro=0
            )  # (the whole update: none partial)
        return skipped, waited

    def _next_batch(self, loader) -> tuple[dict, float]:
        """This rank's next micro-batch and the seconds waited for it; the stream position it carries is kept for the
        next checkpoint, its counters (skipped samples, ...) are added to the run's."""
        before = time.perf_counter()
        batch = next(loader)
        waited = time.perf_counter() - before
        if "data_state" in batch:
            state = batch.pop("data_state")
            self.data_state = {
                "workers": state["workers"],
                "streams": {**self.data_state.get("streams", {}), **state["streams"]},
            }
        for key, count in batch.pop("counts", {}).items():
            self.counters[key] = self.counters.get(key, 0) + count
        return batch, waited

    def _all_finite(self, losses: list[torch.Tensor]) -> bool:
        """Whether every rank's ``losses`` are finite: a read of a device value (a host sync), whose answer all
        ranks share."""
        finite = torch.stack([torch.isfinite(loss.detach()).all() for loss in losses]).all().float().reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite.item() == 1

    def _on_nonfinite(self, loss: torch.Tensor, count: int, accumulation: int, micro: int) -> None:
        """A non-finite loss: the step is skipped (nothing was applied yet), or the run stops when that
        happens too often, or mid-accumulation (DeepSpeed has already taken earlier micro-batches' gradients)."""
        self.module.zero_grad()
        value = loss.item()
        value = value if not math.isfinite(value) else "on another rank"  # (the ranks skip together)
        last = self.complete_checkpoints()
        advice = (
            f"The last good checkpoint is {last[-1] if last else 'none (nothing was saved yet)'}. Lower the learning rate, "
            "check the data, or use fp32."
        )
        if accumulation > 1 and micro > 0:
            raise RuntimeError(
                f"step {self.step}: the loss of micro-batch {micro} is not finite ({value}) after "
                f"{micro} micro-batches of gradients were accumulated; training stopped rather than apply a partial "
                f"update. {advice}"
            )
        warnings.warn(
            f"step {self.step}: the loss is not finite ({value}); the step is skipped "
            f"({count} in a row, the limit is {self.settings.max_nonfinite_steps}).",
            stacklevel=4,  # (the caller of fit)
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


def to_device(batch, device: torch.device):
    """The tensors of a (nested) dict batch moved to ``device``; anything else (ids as strings) as it is."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch
