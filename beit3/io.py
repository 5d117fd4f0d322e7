"""Atomic writes: a file or folder appears whole at its path, or not at all.

Everything the library writes for others to read (checkpoints, prediction files, PNGs, code files, markers)
goes to a temporary name in the target folder first and is then moved onto its path with ``os.replace``,
which is atomic within one file system. A reader never sees half a file, a crash never leaves one, and a
failed write keeps the previous version intact. Whichever way a write ends, no temporary file stays behind.

    with atomic_file("scores.csv", newline="") as handle:   # we write through a handle
        csv.writer(handle).writerows(rows)
    with atomic_path("weights.safetensors") as tmp:         # a library writes to a path of its own
        save_file(state, str(tmp))
    with atomic_folder("tokenizer/") as tmp:                # a whole folder
        (tmp / "config.json").write_text("{}")
    write_text_atomic(path, text); write_bytes_atomic(path, data); write_json_atomic(path, obj)

DataLoader workers keep their temporary files (multiprocessing's ``pymp-*`` folder with the socket each tensor
is passed through) in the scratch folder of the process that started them (``loader_worker_init``), which goes
at exit, or, after a SIGKILL, when the next process makes its own (``process_scratch_dir``).

The parent folder of the target is created when missing. Temporary names are hidden (a leading dot) and carry
the process and thread id, so concurrent writers of one path never share a temporary file.

Only the standard library is imported here: any module may use this one without import cycles or cost.
"""

from __future__ import annotations

import atexit
import functools
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_file",
    "atomic_folder",
    "atomic_path",
    "loader_worker_init",
    "process_scratch_dir",
    "temporary_name",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def temporary_name(path: str | os.PathLike, tag: str = "tmp", keep_suffix: bool = False) -> Path:
    """A hidden sibling of ``path`` unique to this process and thread: ``.<name>.<pid>.<thread>.<tag>``.

    ``keep_suffix`` appends the real suffix again (``.plot.png.<pid>.<thread>.tmp.png``) for writers that
    pick the format from the file name.
    """
    path = Path(path)
    name = f".{path.name}.{os.getpid()}.{threading.get_ident()}.{tag}"
    return path.with_name(name + path.suffix if keep_suffix else name)


def _remove(path: Path) -> None:
    """Removes a file or a folder tree if it exists; used only to clean up, so it never raises."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` for a writer that opens the file itself (``safetensors.save_file``,
    ``torch.save``, ``Figure.savefig``, PIL's ``Image.save``); on success the file is moved onto ``path``, on any
    exception it is removed and the exception propagates.

    The temporary name ends in the real suffix, so a writer that infers the format from it still works. The file
    is not fsynced here (the writer closed it, and checkpoints can be large): the move is atomic against a crash
    of the process; for power loss use ``atomic_file``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, keep_suffix=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        # After a successful replace the temporary name no longer exists; otherwise this is the clean-up.
        _remove(tmp)


@contextmanager
def atomic_file(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = None, newline: str | None = None
) -> Iterator[IO]:
    """Yields an open handle on a temporary file beside ``path``; on success it is flushed, fsynced and moved onto
    ``path``; on any exception it is removed and the exception propagates.

    ``mode`` is ``"w"`` (text, UTF-8 unless ``encoding`` says otherwise) or ``"wb"``; ``newline`` is passed to
    ``open`` (``newline=""`` for the csv module).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a new file: mode must be 'w' or 'wb', not {mode!r}.")
    binary = mode == "wb"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else (encoding or "utf-8"), newline=newline) as handle:
            yield handle
            handle.flush()
            # The data must be on disk before the rename makes it visible, or a power loss could leave an empty file.
            os.fsync(handle.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str | None = None) -> None:
    """Writes ``text`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path, "w", encoding=encoding) as handle:
        handle.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = None) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically; if it cannot be serialized, the previous file stays as it was."""
    with atomic_file(path, "w") as handle:
        json.dump(obj, handle, indent=indent)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``path`` to fill; on success it takes the place of ``path``, on any
    exception it is removed and the exception propagates (an existing ``path`` is then left untouched).

    A folder cannot be renamed onto a non-empty one, so an existing ``path`` is first moved aside, the new folder
    moved in, and only then the old one deleted: at every moment ``path`` is either the old folder or the new one
    (between the two renames it is briefly absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp gives a name no other writer holds, as a folder of mode 0700: it gets the mode of the folder it replaces,
    # or of a folder made here now
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if path.is_dir() else 0o777 & ~_umask())
        yield tmp
        _refuse_foreign_entries(path, tmp)
        old = temporary_name(path, tag="old")
        if os.path.lexists(path):
            _remove(old)  # the leftover of a writer that died between the two renames
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(old) and not os.path.lexists(path):
                os.replace(old, path)  # put the old folder back rather than leave nothing
            raise
        _remove(old)
    finally:
        _remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_foreign_entries(path: Path, new: Path) -> None:
    """A folder being replaced may hold only what its new version holds too (an earlier write of the same kind):
    anything else, a user's notes or subfolders, would be deleted with it, so the write is refused instead."""
    if not path.is_dir():
        return
    foreign = sorted(
        entry.name + ("/" if entry.is_dir() else "") for entry in path.iterdir() if not (new / entry.name).exists()
    )
    if foreign:
        raise FileExistsError(
            f"{path} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which this write would not "
            "write again, so replacing the folder would delete it: write into a new or empty folder, or move those "
            "files out first. Nothing was changed."
        )


SCRATCH_PREFIX = "beit3-scratch-"
_scratch: tuple[int, Path] | None = None


def process_scratch_dir() -> Path:
    """This process's folder for temporary files that would outlive a killed process,
    ``<tmp>/beit3-scratch-<pid>-<random>``: made on first use and removed at exit. A SIGKILL runs no clean-up, so
    making one also removes the scratch folders of this user's processes that are gone."""
    global _scratch
    if _scratch is None or _scratch[0] != os.getpid() or not _scratch[1].is_dir():  # a forked child makes its own
        sweep_scratch_dirs()
        path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        atexit.register(shutil.rmtree, path, True)
        _scratch = (os.getpid(), path)
    return _scratch[1]


def sweep_scratch_dirs(folder: str | os.PathLike | None = None) -> list[Path]:
    """Removes this user's scratch folders in ``folder`` (default: the temporary folder) whose process is gone, and
    returns them. A live process's folder, or one whose process id was taken again, is left alone."""
    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            pid = int(path.name[len(SCRATCH_PREFIX) :].split("-")[0])
            if path.stat().st_uid != os.getuid() or _process_alive(pid):
                continue
        except (ValueError, OSError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds that id now
        return True
    return True


def loader_worker_init(num_workers: int):
    """The ``worker_init_fn`` for a ``torch.utils.data.DataLoader`` of ``num_workers`` workers that puts the workers'
    temporary files in this process's scratch folder; None without workers (nothing to put there).

    A worker passes each tensor to its parent through a socket in a ``pymp-*`` folder of the temporary folder,
    which only the worker's own clean exit removes: a killed run would leave one per worker behind. Under a
    temporary folder too deep for the socket's path in the scratch folder, it is None (the workers' default)."""
    if not num_workers:
        return None
    folder = str(process_scratch_dir())
    # A Unix socket's path holds at most 107 bytes; past that the worker could not pass a tensor at all.
    if len(os.fsencode(folder)) + len("/pymp-12345678/listener-12345678") > 107:
        return None
    return functools.partial(_worker_in_scratch, folder)


def _worker_in_scratch(folder: str, worker_id: int) -> None:
    tempfile.tempdir = folder
    # A forked worker inherits the parent's multiprocessing folder, if the parent made one, and would use it.
    multiprocessing.current_process()._config.pop("tempdir", None)
