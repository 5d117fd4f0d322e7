"""Atomic writes: the new content appears whole or the old one stays, and no temporary file is ever left; DataLoader
workers leave no temporary folder behind, however their run ends."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from beit3.io import (
    atomic_file,
    atomic_folder,
    atomic_path,
    loader_worker_init,
    process_scratch_dir,
    sweep_scratch_dirs,
    temporary_name,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


class Midway(Exception):
    pass


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(Midway):
        with atomic_file(path) as handle:
            handle.write("half of the new")
            raise Midway
    assert path.read_text() == "old"
    assert names(tmp_path) == ["out.txt"]
    with atomic_file(path) as handle:
        handle.write("new ")
        assert path.read_text() == "old"  # nothing visible until the block ends
        handle.write("text")
    assert path.read_text() == "new text"
    assert names(tmp_path) == ["out.txt"]


def test_atomic_file_binary_text_options_and_a_missing_parent(tmp_path):
    with atomic_file(tmp_path / "a" / "b" / "data.bin", "wb") as handle:
        handle.write(b"\x00\xff")
    assert (tmp_path / "a" / "b" / "data.bin").read_bytes() == b"\x00\xff"
    with atomic_file(tmp_path / "rows.csv", newline="") as handle:
        handle.write("x,y\r\n")
    assert (tmp_path / "rows.csv").read_bytes() == b"x,y\r\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic_file(tmp_path / "log", "a"):
            pass
    assert names(tmp_path) == ["a", "rows.csv"]


def test_thin_writers_and_json_that_fails_halfway(tmp_path):
    write_text_atomic(tmp_path / "t.txt", "héllo\n")
    write_bytes_atomic(tmp_path / "b.bin", b"abc")
    write_json_atomic(tmp_path / "j.json", {"a": [1, 2]}, indent=2)
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"abc"
    assert (tmp_path / "j.json").read_text() == json.dumps({"a": [1, 2]}, indent=2)
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "j.json", {"a": [1, object()]})  # fails in the middle of json.dump
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    assert names(tmp_path) == ["b.bin", "j.json", "t.txt"]


def test_atomic_path_keeps_the_suffix_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".png"
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(Midway):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise Midway
    assert path.read_bytes() == b"new"
    with pytest.raises(Midway):
        with atomic_path(tmp_path / "never.png"):
            raise Midway  # the writer failed before creating anything
    assert names(tmp_path) == ["figure.png"]


def test_temporary_names_differ_per_thread():
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(temporary_name("x/out.json")))
    thread.start()
    thread.join()
    assert seen[0] != temporary_name("x/out.json") and seen[0].parent == temporary_name("x/out.json").parent


def test_atomic_folder_creates_replaces_and_keeps_the_old_folder_on_failure(tmp_path):
    path = tmp_path / "model"
    with atomic_folder(path) as tmp:
        assert tmp.is_dir() and not list(tmp.iterdir()) and not path.exists()
        (tmp / "old.txt").write_text("1")
    assert names(path) == ["old.txt"]
    with pytest.raises(Midway):
        with atomic_folder(path) as tmp:
            (tmp / "new.txt").write_text("half")
            raise Midway
    assert names(path) == ["old.txt"]
    assert names(tmp_path) == ["model"]
    with atomic_folder(path) as tmp:
        (tmp / "old.txt").write_text("2")
        (tmp / "new.txt").write_text("2")
        assert names(path) == ["old.txt"]  # the old folder stays readable while the new one is written
    assert names(path) == ["new.txt", "old.txt"] and (path / "old.txt").read_text() == "2"  # replaced
    assert names(tmp_path) == ["model"]  # neither the temporary nor the old folder is left


def test_atomic_folder_never_deletes_what_it_does_not_write_again_and_keeps_the_folders_mode(tmp_path):
    path = tmp_path / "export"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o750)
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir()
    with pytest.raises(FileExistsError, match=r"export holds notes.txt, sub/, which this write would not write again"):
        with atomic_folder(path) as tmp:
            (tmp / "config.json").write_text("{}")
    assert names(path) == ["notes.txt", "sub"] and names(tmp_path) == ["export"]  # nothing changed, nothing left
    (path / "notes.txt").unlink()
    (path / "sub").rmdir()
    with atomic_folder(path) as tmp:
        (tmp / "config.json").write_text("{}")
    assert names(path) == ["config.json"] and stat.S_IMODE(os.stat(path).st_mode) == 0o750
    with atomic_folder(tmp_path / "fresh") as tmp:
        (tmp / "a").write_text("1")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "fresh").st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


def test_atomic_folder_replaces_a_file_and_nests(tmp_path):
    path = tmp_path / "out"
    path.write_text("a file")
    with atomic_folder(path) as outer:
        # What a save_pretrained that is atomic itself does inside atomic_save_folder
        with atomic_folder(outer) as inner:
            (inner / "w").write_text("x")
    assert names(path) == ["w"] and names(tmp_path) == ["out"]


def test_io_imports_only_the_standard_library():
    import ast

    import beit3.io

    tree = ast.parse(open(beit3.io.__file__).read())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert not any(
        isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree)
    )  # nothing of beit3: no cycles
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


# Two workers hand tensors to the parent until the parent is killed; "started" once a batch has come through.
_LOADER_RUN = textwrap.dedent(
    """
    import sys, time, torch
    from beit3.io import loader_worker_init

    class Tensors(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6
        def __getitem__(self, i):
            return torch.full((64,), float(i))

    init = loader_worker_init(2) if sys.argv[1] == "scratch" else None
    loader = torch.utils.data.DataLoader(Tensors(), batch_size=4, num_workers=2, worker_init_fn=init)
    for step, batch in enumerate(loader):
        if step == 4:
            print("started", flush=True)
        if sys.argv[2] == "clean" and step == 8:
            break
        time.sleep(0.01)
    """
)


def _loader_run(tmp: Path, mode: str, end: str):
    env = {**os.environ, "TMPDIR": str(tmp)}
    process = subprocess.Popen(
        [sys.executable, "-c", _LOADER_RUN, mode, end],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline().strip() == "started"
    if end == "killed":
        os.killpg(process.pid, signal.SIGKILL)  # the parent and its workers: no clean-up of anyone runs
    process.wait(timeout=60)
    deadline = time.time() + 10
    while any(tmp.glob("pymp-*")) and end == "clean" and time.time() < deadline:
        time.sleep(0.05)
    return process.pid


def test_loader_workers_leave_no_temporary_folder_behind_clean_or_killed(monkeypatch):
    tmp = Path(tempfile.mkdtemp(dir="/tmp"))  # short: pytest's own folders are too deep for a socket's path
    try:
        _check_loader_runs(tmp, monkeypatch)
    finally:
        shutil.rmtree(tmp)


def _check_loader_runs(tmp: Path, monkeypatch):
    _loader_run(tmp, "plain", "killed")  # the control: what a killed run of plain workers leaves
    assert len(list(tmp.glob("pymp-*"))) == 2, names(tmp)
    for leftover in tmp.glob("pymp-*"):
        for item in leftover.iterdir():
            item.unlink()
        leftover.rmdir()

    _loader_run(tmp, "scratch", "clean")
    assert names(tmp) == []
    pid = _loader_run(tmp, "scratch", "killed")
    dead = next(tmp.glob(f"beit3-scratch-{pid}-*"))
    assert names(tmp) == [dead.name] and len(list(dead.glob("pymp-*"))) == 2  # the workers' folders are inside
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    monkeypatch.setattr("beit3.io._scratch", None)
    mine = process_scratch_dir()  # the next process to make one removes the dead one's
    assert names(tmp) == [mine.name] and mine.name.startswith(f"beit3-scratch-{os.getpid()}-")
    assert sweep_scratch_dirs(tmp) == []  # a live process's folder stays


def test_no_scratch_folder_for_workers_where_a_socket_path_would_be_too_long(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(deep))
    monkeypatch.setattr("beit3.io._scratch", None)
    assert loader_worker_init(0) is None and not any(deep.iterdir())  # no workers: no scratch folder made
    assert loader_worker_init(2) is None  # the workers then keep their default, which can still bind
