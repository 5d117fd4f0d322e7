"""What a run reports while it trains: ``metrics.jsonl`` (one JSON record per logged step), TensorBoard scalars and
the progress bar, and the reader of such a log."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from ..io import write_text_atomic


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
