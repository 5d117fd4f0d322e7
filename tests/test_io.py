"""Atomic writes: the new content appears whole or the old one stays, and no temporary file is ever left."""

import json
import sys

import pytest

from beit3.io import (
    atomic_file,
    atomic_folder,
    atomic_path,
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


def test_metrics_still_offers_write_json_atomic():
    from beit3 import metrics

    assert metrics.write_json_atomic is write_json_atomic


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
        (tmp / "new.txt").write_text("2")
        assert names(path) == ["old.txt"]  # the old folder stays readable while the new one is written
    assert names(path) == ["new.txt"]  # replaced, not merged
    assert names(tmp_path) == ["model"]  # neither the temporary nor the old folder is left


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
