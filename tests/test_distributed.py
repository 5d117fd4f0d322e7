"""The processes of a run (beit3/training/distributed.py): threads per process, stale shared-memory buffers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from beit3.training.distributed import sweep_stale_shared_memory_buffers

ROOT = Path(__file__).resolve().parent.parent


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
    from beit3.training.distributed import cpu_threads

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
        "from beit3.training.distributed import setup_distributed; setup_distributed(num_workers=1); "
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
