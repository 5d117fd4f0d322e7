"""How the demo runs its stages' commands: the CPU kernels and torch threads that keep its figures the same to the digit
from run to run on one machine (not across CPU vendors, whose MKL and oneDNN take other paths), the runner that
shares them out among the processes of a stage, and the CPU the report names."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The widest instruction set every x86-64 CPU of the last decade has; a variable the user set wins. The native kernels
# of an AVX-512 machine move the figures by a few points (docs/results/demo.md, "Kernels, threads and versions").
REPRODUCIBLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# Thread counts move the figures too (they split every sum differently), so the demo fixes them rather than taking
# the machine's cores or the engine's rule: the torch threads of the 2-core machine the figures come from, shared by
# the processes a stage runs at once (a lone command 2, two side by side or two ranks 1 each). The visual tokenizer
# trained with 1 thread instead of 2 moves the pretrained VQA score (docs/results/demo.md).
DEMO_THREADS = 2


def run(command: list[str], log: Path, processes: int = 1) -> None:
    """Runs one stage's command (of ``processes`` processes: the deepspeed launcher's ranks); its progress bars show
    on the terminal, and everything goes to ``log`` too."""
    run_side_by_side([command], log, processes)


def free_port() -> int:
    """A TCP port nothing on this machine listens on now, for a launcher's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_side_by_side(commands: list[list[str]], log: Path, processes: int = 1) -> None:
    """Runs ``commands`` at the same time (each of ``processes`` processes), sharing ``DEMO_THREADS`` out as torch
    threads. The first one's progress shows on the terminal; every line of each goes to ``log``, prefixed by the
    command's number when there are several.

    On a small CPU two 1-thread runs get more done than one 2-thread run after the other (small matmuls do
    not split well over threads), and the two inits of a task then train under the same conditions.
    """
    # The demo's figures are CPU figures (its kernels pinned, its threads fixed), and on a machine with one GPU its
    # two-process stages would place rank 1 on a GPU that is not there: every stage runs on the CPU.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    env["OMP_NUM_THREADS"] = str(max(1, DEMO_THREADS // (len(commands) * processes)))
    lock = threading.Lock()
    with open(log, "a") as handle:
        processes = []
        for command in commands:
            handle.write("$ " + " ".join(command) + "\n")
            processes.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
                )
            )
        handle.flush()

        def forward(number: int, process: subprocess.Popen) -> None:
            prefix = f"[{number}] " if len(commands) > 1 else ""
            for line in process.stdout:
                with lock:
                    handle.write(prefix + line)
                    # Launcher chatter stays in the log
                    if number == 0 and (not line.startswith(("[", "W1", "I1")) or "%|" in line):
                        sys.stderr.write(line)

        readers = [threading.Thread(target=forward, args=(n, p)) for n, p in enumerate(processes)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
    for command, process in zip(commands, processes):
        if process.wait() != 0:
            raise SystemExit(
                f"error: this stage failed (exit {process.returncode}): {' '.join(command)}\nIts output is in {log}."
            )


def cpu_description() -> dict:
    """The CPU the figures came from: its model name, the instruction sets that decide its kernels (of AVX2,
    AVX-512, AVX-512 BF16 and AMX, those it has) and its logical cores. Pinning the kernels to AVX2 does not make
    another vendor's CPU give the same bits, so the report names the machine beside its figures."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX"}
    return {
        "model": model,
        "instructions": [name for flag, name in wanted.items() if flag in flags],
        "cores": os.cpu_count(),
    }
