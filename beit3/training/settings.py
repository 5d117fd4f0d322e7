"""The ``train`` section every training program reads: what the loop, the optimizer and DeepSpeed need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..sections import Section, doc


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
    deepspeed: str | None = doc(
        "a DeepSpeed JSON of that stage (a path, or a packaged one; null: configs/deepspeed/zero<zero_stage>.json)",
        None,
    )
    keep_last: int = doc("complete checkpoints kept", 2, low=1)
    log_every: int = doc("a metrics.jsonl record every this many steps", 10, low=1)
    max_nonfinite_steps: int = doc("non-finite losses in a row before the run stops (each is skipped)", 5, low=1)
    num_workers: int = doc("data-loader workers per process", 1, low=0)
    gradient_checkpointing: bool = doc("recompute activations in the backward pass", False)
    deterministic: bool = doc(
        "deterministic kernels only (torch.use_deterministic_algorithms; on CUDA cuBLAS's fixed workspace too): "
        "on a GPU, what makes a resume bit-exact, at some speed; CPU runs resume bit-exactly without it",
        False,
    )
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
