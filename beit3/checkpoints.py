"""Checkpoint files: safe reading, loading that names what does not fit, and atomic writing.

Untrusted ``.pth`` files are read with ``weights_only=True``; everything we write goes to a
temporary name first and is moved into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a ``.pth``/``.pt``/``.bin`` file safely (``weights_only=True``; an argparse ``Namespace``
    saved beside the weights, as unilm does, is allowed) and unwraps the ``model``/``module``/
    ``state_dict`` level that unilm, DeepSpeed and others add. Half-precision tensors become fp32,
    so any later interpolation runs in full precision."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with arbitrary objects, or a truncated file
        raise ValueError(f"Could not read {path} as a weights-only PyTorch checkpoint: {error}") from error
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (top-level keys: {list(state)[:8] if isinstance(state, dict) else type(state)}).")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint",
                            allow_missing: set[str] = frozenset()) -> None:
    """``load_state_dict`` that names every missing, unexpected and wrongly shaped key before loading anything.

    ``allow_missing``: keys that may stay at their initial values (a warning counts them).
    """
    own = model.state_dict()
    wrong_shape = [f"{k}: {tuple(v.shape)} in the {what}, {tuple(own[k].shape)} in the model"
                   for k, v in state.items() if k in own and v.shape != own[k].shape]
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
        warnings.warn(f"{len(left_at_init)} weights are not in the {what} and keep their initial values, e.g. {left_at_init[:3]}", stacklevel=2)
    model.load_state_dict(state, strict=False)


def atomic_save_folder(model, output: str | os.PathLike) -> None:
    """``save_pretrained`` into a temporary sibling folder, then move it into place: a crash leaves no half folder."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_save_file(state: dict[str, torch.Tensor], output: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes a state dict as safetensors (``.safetensors``) or as ``{"model": state}`` (``.pth``, the official format), atomically."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    if output.suffix == ".safetensors":
        save_file(state, str(tmp), metadata=metadata)
    else:
        torch.save({"model": state}, tmp)
    os.replace(tmp, output)


# A training checkpoint folder counts only once this marker exists: it is written after every rank saved.
COMPLETE = "COMPLETE"


def mark_complete(checkpoint: str | os.PathLike, info: dict) -> None:
    """Writes the ``COMPLETE`` marker of a checkpoint folder, atomically."""
    marker = Path(checkpoint) / COMPLETE
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, marker)


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``step<N>`` checkpoint folders under ``folder`` that carry the ``COMPLETE`` marker, oldest first."""
    folder = Path(folder)
    tags = [p for p in folder.glob("step*") if (p / COMPLETE).is_file()] if folder.is_dir() else []
    return sorted(tags, key=lambda p: int(p.name[4:]))
