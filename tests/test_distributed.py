"""The processes of a run (beit3/training/distributed.py): threads per process, stale shared-memory buffers, the
checks that every rank sees the output folder and that the ranks agree."""

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


def _two_ranks(rank: int, port: int, folders: list[str], results: str) -> None:
    """One rank of an in-process world of two (gloo); writes what each check raised to results/rank<N>.json."""
    import json

    import torch.distributed as dist

    from beit3.training.distributed import agree_on, check_shared_output_dir

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    raised = {}
    try:
        check_shared_output_dir(Path(folders[rank]), rank, 2, wait_s=0.5)
    except RuntimeError as error:
        raised["shared"] = str(error)
    try:
        agree_on("step00000010" if rank == 0 else None, rank, 2, "the checkpoint to resume", Path(folders[0]))
    except RuntimeError as error:
        raised["agree"] = str(error)
    raised["agreed"] = agree_on(["step00000004"], rank, 2, "anything", Path(folders[0]))
    raised["left"] = sorted(p.name for p in Path(folders[rank]).iterdir())
    dist.destroy_process_group()
    (Path(results) / f"rank{rank}.json").write_text(json.dumps(raised))


@pytest.mark.parametrize("shared", [True, False], ids=["one folder", "a folder per node"])
def test_every_rank_checks_it_sees_rank_0s_folder_and_the_ranks_agree_or_all_stop(tmp_path, shared):
    import json
    import socket

    import torch.multiprocessing as mp

    folders = [tmp_path / "shared"] * 2 if shared else [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir(exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, [str(f) for f in folders], str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["agreed"] == ["step00000004"]
        assert "rank 0: step00000010, rank 1: none" in result["agree"] and "nothing is trained" in result["agree"]
        assert result["left"] == []  # the marker is gone again
        if shared:
            assert "shared" not in result
        else:  # both ranks stop, with the rank that cannot see the folder named
            assert "output_dir must be on a filesystem that every node shares: rank 1 on" in result["shared"]


def test_each_local_rank_gets_its_own_gpu_and_a_rank_past_them_is_an_error(monkeypatch):
    import torch

    from beit3.training.distributed import device_of_local_rank

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_of_local_rank(3) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_of_local_rank(0) == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"Local rank 1 has no GPU: this machine has 1\. Start at most 1 process"):
        device_of_local_rank(1)


def test_tests_start_their_ranks_on_the_cpu_unless_every_rank_has_a_gpu(monkeypatch):
    import torch
    from conftest import launcher_env

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert launcher_env(2)["CUDA_VISIBLE_DEVICES"] == ""  # one GPU, two ranks: both on the CPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in launcher_env(1)
