"""Checkpoint files: safe reading, loading that names what does not fit, and atomic writing.

Every PyTorch pickle is read with ``weights_only=True``, DeepSpeed's checkpoints included (``check_weights_only``
and ``weights_only_loads``); everything we write goes to a temporary name first and is moved into place, so a
crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .io import atomic_folder, atomic_path, write_text_atomic


def read_checkpoint(path: str | os.PathLike, return_extras: bool = False):
    """Loads a ``.pth``/``.pt``/``.bin`` file safely (``weights_only=True``; an argparse ``Namespace``
    saved beside the weights, as unilm does, is allowed) and unwraps the ``model``/``module``/
    ``state_dict`` level that unilm, DeepSpeed and others add. Half-precision tensors become fp32,
    so any later interpolation runs in full precision.

    Returns the state dict, or with ``return_extras`` (state dict, {the file's other top-level entries}), a
    ``Namespace`` given as its dict (unilm's ``args``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with arbitrary objects, or a truncated file
        raise ValueError(f"Could not read {path} as a weights-only PyTorch checkpoint: {error}") from error
    extras = {}
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            extras = {k: vars(v) if isinstance(v, argparse.Namespace) else v for k, v in state.items() if k != key}
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path} does not hold a state dict of tensors (top-level keys: {list(state)[:8] if isinstance(state, dict) else type(state)})."
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return (state, extras) if return_extras else state


def read_folder_tensors(folder: str | os.PathLike, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The tensors ``names`` of a ``save_pretrained`` folder (``model.safetensors``, or its shards), read alone; None
    when the folder lacks any of them."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            where = dict.fromkeys(handle.keys(), "model.safetensors")
    else:
        return None
    if any(name not in where for name in names):
        return None
    tensors = {}
    for name in names:
        with safe_open(str(folder / where[name]), framework="pt") as handle:
            tensors[name] = handle.get_tensor(name).float()
    return tensors


def _deepspeed_checkpoint_types() -> list[type]:
    """The classes besides tensors and containers that DeepSpeed pickles into its checkpoints: plain data, no code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [argparse.Namespace, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads():
    """Inside, every ``torch.load`` reads weights only, also where the caller asks for ``weights_only=False``
    (DeepSpeed's checkpoint engine and ``zero_to_fp32`` do): the classes of ``_deepspeed_checkpoint_types`` are
    allowed, anything else in a pickle is refused instead of run."""
    saved = {
        name: os.environ.pop(name, None)
        for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def check_weights_only(checkpoint: str | os.PathLike) -> None:
    """Reads the pickle of every ``.pt`` file of a DeepSpeed checkpoint folder weights-only (memory-mapped, so the
    tensors are not read) and raises ValueError naming the first file that holds anything else. Every rank checks
    every file before any loads, so a planted file stops all of them at once instead of leaving the others waiting."""
    for path in sorted(Path(checkpoint).glob("*.pt")):
        try:
            with weights_only_loads():
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as error:
                    if "mmap" not in str(error):
                        raise
                    torch.load(
                        path, map_location="cpu", weights_only=True
                    )  # the legacy (non-zip) format cannot be mapped
        except Exception as error:
            raise ValueError(
                f"{path} is not a weights-only checkpoint file, so it is not loaded (unpickling it could run code). "
                f"The checkpoints this package writes hold only tensors and DeepSpeed's plain records; this one was "
                f"changed or comes from elsewhere. Remove that checkpoint folder to resume from an older one. ({error})"
            ) from error


def load_state_dict_checked(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    what: str = "checkpoint",
    allow_missing: set[str] = frozenset(),
) -> None:
    """``load_state_dict`` that names every missing, unexpected and wrongly shaped key before loading anything.

    ``allow_missing``: keys that may stay at their initial values (a warning counts them).
    """
    own = model.state_dict()
    wrong_shape = [
        f"{k}: {tuple(v.shape)} in the {what}, {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state and k not in allow_missing]
    unexpected = [k for k in state if k not in own]
    problems = []
    for title, keys in (("wrong shape", wrong_shape), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            problems.append(f"{len(keys)} {title}: " + "; ".join(keys[:6]) + (" ..." if len(keys) > 6 else ""))
    if problems:
        raise ValueError(f"The {what} does not fit the model ({type(model).__name__}). " + " | ".join(problems))
    left_at_init = [k for k in own if k not in state]
    if left_at_init:
        warnings.warn(
            f"{len(left_at_init)} weights are not in the {what} and keep their initial values, e.g. {left_at_init[:3]}",
            stacklevel=2,
        )
    model.load_state_dict(state, strict=False)


def atomic_save_folder(model, output: str | os.PathLike) -> None:
    """``save_pretrained`` into a temporary sibling folder, then move it into place: a crash leaves no half folder."""
    with atomic_folder(output) as tmp:
        model.save_pretrained(tmp)


def atomic_save_file(
    state: dict[str, torch.Tensor], output: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes a state dict as safetensors (``.safetensors``, ``metadata`` in its header) or as ``{"model": state}``
    (``.pth``, the official format, ``metadata``'s entries beside ``model``), atomically."""
    output = Path(output)
    with atomic_path(output) as tmp:
        if output.suffix == ".safetensors":
            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save({"model": state, **(metadata or {})}, tmp)


# A training checkpoint folder counts only once this marker exists: it is written after every rank saved.
COMPLETE = "COMPLETE"


def mark_complete(checkpoint: str | os.PathLike, info: dict) -> None:
    """Writes the ``COMPLETE`` marker of a checkpoint folder, atomically."""
    write_text_atomic(Path(checkpoint) / COMPLETE, json.dumps(info))


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``step<N>`` checkpoint folders under ``folder`` that carry the ``COMPLETE`` marker, oldest first."""
    folder = Path(folder)
    tags = [p for p in folder.glob("step*") if (p / COMPLETE).is_file()] if folder.is_dir() else []
    return sorted(tags, key=lambda p: int(p.name[4:]))
