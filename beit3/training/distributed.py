"""The processes of a run: torch.distributed through DeepSpeed (a plain ``python script.py`` is a world of one), the
torch threads of each process on CPU, the shared-memory buffers earlier runs left, the lock that keeps two runs
out of one output folder, and the check that every rank sees that folder."""

from __future__ import annotations

import atexit
import importlib
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..io import write_text_atomic
from ..log import get_logger

logger = get_logger(__name__)


def cpu_threads(local_size: int, num_workers: int, cores: int | None = None) -> int:
    """Torch threads per process of a CPU run: the cores this process may use, shared among the ``local_size``
    processes of this machine, less one for each of a process's ``num_workers`` loader workers (processes of their
    own), at least 1. OpenMP's threads wait on each other at every operator, so a thread that loses its core to a
    worker or another process stalls the rest (measured: docs/pretraining.md, "Threads")."""
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
    device = device_of_local_rank(local_rank)
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


def end_distributed() -> None:
    """Leaves torch.distributed once a run needs no more communication (every rank, after its last collective).
    Left to the interpreter's exit, gloo's worker threads may still be running when their objects are destroyed,
    and the process aborts ("terminate called without an active exception", exit code 250 under the deepspeed
    launcher): a finished two-process run was reported failed that way, once in several hundred here."""
    if dist.is_initialized():
        dist.destroy_process_group()


def use_deterministic_kernels() -> None:
    """Deterministic kernels for the rest of this process: an operation without a deterministic implementation
    raises instead of varying. cuBLAS needs its workspace fixed before its first call; cuDNN must not autotune."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def device_of_local_rank(local_rank: int) -> torch.device:
    """``cuda:<local_rank>`` where CUDA is available, else the CPU; a local rank past this machine's GPUs is an error
    (a launcher told to start more processes per node than there are GPUs), never a guess."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"Local rank {local_rank} has no GPU: this machine has {count}. Start at most {count} process(es) per node "
            "(deepspeed --num_gpus, torchrun --nproc-per-node), or run on the CPU with CUDA_VISIBLE_DEVICES= set empty."
        )
    return torch.device("cuda", local_rank)


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


def lock_output_dir(output_dir: Path) -> None:
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


# How long a rank looks for the marker rank 0 wrote: a shared filesystem may show a new file to other nodes a little
# later (NFS attribute caching). The marker's name is new each run, so no cached lookup of an older one answers.
SHARED_DIR_WAIT_S = 10.0


def check_shared_output_dir(output_dir: Path, rank: int, world_size: int, wait_s: float = SHARED_DIR_WAIT_S) -> None:
    """Raises the same RuntimeError on every rank unless every rank sees the marker file rank 0 writes in
    ``output_dir``. Checkpoints are written by every rank and marked complete by rank 0, and a restart resumes what
    each rank finds: on node-local folders (a folder of the same name on each node's own disk) the ranks would
    resume from different steps and go on training a mixed model. Collective: every rank calls it."""
    if world_size == 1:
        return
    name = [f".shared-check-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    marker = output_dir / name[0]
    if rank == 0:
        write_text_atomic(marker, "written by rank 0; every rank of the run must see it\n")
    dist.barrier()
    deadline = time.monotonic() + wait_s
    while not (seen := marker.is_file()) and time.monotonic() < deadline:
        time.sleep(0.2)
    views = [None] * world_size
    dist.all_gather_object(views, (seen, socket.gethostname()))
    dist.barrier()
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise RuntimeError(
            f"output_dir must be on a filesystem that every node shares: {', '.join(blind)} cannot see {marker.name}, "
            f"which rank 0 (on {views[0][1]}) wrote in {output_dir}. On node-local folders each node would keep "
            "checkpoints of its own, and a restart would resume the ranks from different steps. Put output_dir on "
            "NFS, Lustre or another filesystem every node mounts at the same path."
        )


def agree_on(value, rank: int, world_size: int, what: str, where: Path):
    """``value`` when every rank holds the same, else the same RuntimeError on every rank naming what each holds."""
    values = [None] * world_size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        held = ", ".join(f"rank {r}: {v if v is not None else 'none'}" for r, v in enumerate(values))
        raise RuntimeError(
            f"The ranks disagree on {what} in {where} ({held}), so nothing is trained: each rank must see the same "
            "output_dir (a filesystem every node shares)."
        )
    return value
