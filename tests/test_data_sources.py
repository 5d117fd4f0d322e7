"""Pretraining sources: each form of ``data.sources`` read by its registered builder, bad lines named, the cache
following edits, and a new form added by registering one builder."""

import json

import pytest
from datasets import Dataset

from beit3.data import sources as sources_module
from beit3.data.sources import SOURCE_FORMS, load_sources, source_form
from beit3.data.synthetic import write_shapes_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_shapes_world(tmp_path_factory.mktemp("sources"), 12), None


def test_a_new_form_of_source_is_one_registered_builder(world, monkeypatch):
    monkeypatch.setattr(sources_module, "SOURCE_FORMS", list(SOURCE_FORMS))  # registered for this test only

    @source_form("a callable giving texts", ("text",), accepts=callable)
    def _generated_texts(kind, make, options):
        return Dataset.from_dict({"text": list(make())})

    sources = load_sources(texts=lambda: ["a red circle", "a blue square"], images=world[0]["images"])
    assert sources["text"]["text"] == ["a red circle", "a blue square"]
    assert len(sources["image"]) == 12  # the other kinds still read by their own forms


def test_a_value_no_form_accepts_is_refused_with_the_forms_it_may_take(world):
    with pytest.raises(ValueError, match=r"the text source 'texts.txt' is none of the forms it may take: .*\.txt"):
        load_sources(texts="texts.txt")  # one file, not a list of them
    with pytest.raises(ValueError, match=r"the pair source 3 is none of the forms"):
        load_sources(pairs=3)
    with pytest.raises(ValueError, match="with images from shards, let the visual tokenizer compute the targets"):
        load_sources(images=["a.tar"], image_codes="codes", streaming=True)


def test_pair_lists_are_read_from_disk_and_follow_edits(world, tmp_path):
    paths, _ = world
    lines = paths["pairs"].read_text().splitlines()
    pairs = tmp_path / "pairs.jsonl"
    for image in {json.loads(line)["image"] for line in lines}:  # the images, next to the copied list
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / image).write_bytes((paths["pairs"].parent / image).read_bytes())
    pairs.write_text("\n".join(lines[:10]) + "\n")
    first = load_sources(pairs=[str(pairs)])["pair"]
    # Memory-mapped Arrow in the datasets cache, not rows held in RAM: a list larger than memory still works.
    assert first.cache_files and len(first) == 10
    pairs.write_text("\n".join(lines[:7]) + "\n")
    edited = load_sources(pairs=[str(pairs)])["pair"]
    assert len(edited) == 7 and edited[6]["text"] == json.loads(lines[6])["text"]  # the edit is read, not an old cache


def test_pair_lines_without_an_image_path_or_a_text_are_skipped_and_named(world, tmp_path, capsys):
    paths, _ = world
    good = paths["pairs"].read_text().splitlines()[0]
    image = str(paths["pairs"].parent / json.loads(good)["image"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "\n".join(
            [
                json.dumps({"image": image, "text": "a red circle"}),
                json.dumps({"image": None, "text": "a red circle"}),
                json.dumps({"image": image, "text": "  "}),
                json.dumps({"image": image, "text": None}),
            ]
        )
        + "\n"
    )
    with open(pairs, "ab") as handle:  # a Latin-1 caption: not UTF-8
        handle.write(b'{"image": "' + image.encode() + b'", "text": "caf\xe9"}\n')
    source = load_sources(pairs=[str(pairs)])["pair"]
    assert source["text"] == ["a red circle"]  # one rule for texts and pairs: empty texts are left out
    err = capsys.readouterr().err
    assert f"{pairs}:2" in err and "the image is None" in err and f"{pairs}:3" in err and f"{pairs}:4" in err
    assert f"{pairs}:5" in err and "utf-8" in err


def test_text_lines_that_are_not_utf8_are_skipped_and_named_instead_of_failing_the_cache(tmp_path, capsys):
    plain, structured = tmp_path / "texts.txt", tmp_path / "texts.jsonl"
    plain.write_bytes(b"a red circle\n\xff\xfe latin-1 \xe9\n\na blue square\n")
    structured.write_bytes(b'{"text": "a green shape"}\n\n{"caption": "no text field"}\n{"text": "caf\xe9"}\n')
    source = load_sources(texts=[str(plain), str(structured)])["text"]
    assert source["text"] == ["a red circle", "a blue square", "a green shape"] and source.cache_files
    err = capsys.readouterr().err
    assert f"{plain} at byte 13" in err and f"{structured} at byte 27" in err and f"{structured} at byte 56" in err
    assert "at byte 26" not in err  # a blank line is left out, not reported
    many = tmp_path / "many.txt"
    many.write_bytes(b"ok\n" + b"\xff\n" * 8)
    assert load_sources(texts=[str(many)])["text"]["text"] == ["ok"]
    err = capsys.readouterr().err
    assert err.count(f"{many} at byte") == 5 and f"{many}: 8 lines skipped in all" in err
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        load_sources(texts=[str(tmp_path / "missing.txt")])


def test_empty_or_missing_sources_are_refused(world, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="image source is empty"):
        load_sources(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="No image folder"):
        load_sources(tmp_path / "missing")
    with pytest.raises(ValueError, match="No pretraining data"):
        load_sources()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png"}) + "\nnot json\n")
    with pytest.raises(ValueError, match="pair source is empty"):
        load_sources(pairs=[str(bad)])
