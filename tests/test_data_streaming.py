"""Streaming webdataset shards: patterns, streams that split the shards by (rank, worker) and resume from a
position, unreadable shards and samples skipped and counted, tasks/make_shards.py, and streamed batches."""

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from beit3 import train_sentencepiece
from beit3.data.pretraining import BatchOptions, PretrainingBatches, StreamingPretrainingBatches
from beit3.data.sampling import Stream
from beit3.data.sources import load_sources
from beit3.data.streaming import ShardStream, expand_shards, pair_of, text_pieces, text_samples, write_shards
from beit3.data.synthetic import write_shapes_world

ROOT = Path(__file__).resolve().parent.parent


def numbered_shards(folder: Path, sizes: list[int]) -> list[str]:
    """Shards of samples with keys 0, 1, 2, ... (text = key), ``sizes[i]`` samples in shard i."""
    shards, key = [], 0
    for index, size in enumerate(sizes):
        samples = [{"__key__": f"{key + i:06d}", "txt": str(key + i)} for i in range(size)]
        key += size
        shards += write_shards(iter(samples), str(folder / f"s{index:02d}-%d.tar"), shard_size=size)
    return shards


def keys(stream, count):
    return [next(stream)["__key__"] for _ in range(count)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming")
    paths = write_shapes_world(folder / "world", 24)
    tokenizer = train_sentencepiece(
        folder / "tok", vocab_size=36, files=[paths["texts"]], model_max_length=32, quiet=True
    )
    result = subprocess.run(
        [
            sys.executable,
            "tasks/make_shards.py",
            "--pairs",
            str(paths["pairs"]),
            "--output",
            str(folder / "shards/pairs-%03d.tar"),
            "--shard-size",
            "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return paths, tokenizer, folder / "shards", result.stdout


def test_make_shards_writes_every_pair_shuffled_and_prints_the_pattern(world):
    paths, _, shards, printed = world
    assert "wrote 24 samples in 5 shards" in printed and "pairs-{000..004}.tar" in printed
    assert not list(shards.glob("*.tmp"))
    written = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".txt"):
                    written[name[:-4]] = tar.extractfile(name).read().decode()
            assert all(name[:-4] + ".png" in names for name in names if name.endswith(".txt"))
    captions = [json.loads(line)["text"] for line in paths["pairs"].read_text().splitlines()]
    assert sorted(written.values()) == sorted(captions)
    assert [written[key] for key in sorted(written)] != captions  # shuffled before writing


def test_brace_patterns_expand_in_order():
    assert expand_shards("d/p-{008..011}.tar") == ["d/p-008.tar", "d/p-009.tar", "d/p-010.tar", "d/p-011.tar"]
    assert expand_shards(["a.tar", "b-{0..1}.tar"]) == ["a.tar", "b-0.tar", "b-1.tar"]


def test_streams_split_the_shards_read_every_sample_each_epoch_and_reshuffle(tmp_path):
    shards = numbered_shards(tmp_path, [4, 4, 4, 4, 3])  # 5 shards over 2 streams: one reads 3, the other 2
    streams = [ShardStream(shards, seed=0, kind=2, stream=j, streams=2) for j in range(2)]
    first = [keys(stream, sum(4 if i < 4 else 3 for i in stream._mine(0))) for stream in streams]  # each one's epoch 0
    assert sorted(first[0] + first[1]) == [f"{k:06d}" for k in range(19)]  # every sample once, none dropped
    assert sorted(len(keys) for keys in first) in ([8, 11], [7, 12])  # 2 and 3 whole shards
    orders = {tuple(ShardStream(shards, seed=0, kind=2, stream=0, streams=1)._mine(epoch)) for epoch in range(4)}
    assert len(orders) > 1  # each epoch has its own shard order
    with pytest.raises(ValueError, match="5 shards cannot feed 6 streams"):
        ShardStream(shards, seed=0, kind=2, stream=0, streams=6)


def test_a_stream_resumes_from_its_position_mid_shard_and_across_epochs(tmp_path):
    shards = numbered_shards(tmp_path, [3, 5, 2, 4])
    for taken in (1, 4, 7, 15, 23):  # mid-shard, at a shard's end, in the second and third epoch
        reference = ShardStream(shards, seed=3, kind=0, stream=1, streams=2)
        keys(reference, taken)
        position = json.loads(json.dumps(reference.position))  # saved as JSON in the checkpoint's COMPLETE marker
        resumed = ShardStream(shards, seed=3, kind=0, stream=1, streams=2, position=position)
        assert keys(resumed, 9) == keys(reference, 9), taken


def test_unreadable_shards_are_named_counted_and_skipped(tmp_path, capsys):
    shards = numbered_shards(tmp_path, [3, 3, 3, 3])
    Path(shards[1]).unlink()  # missing
    data = Path(shards[2]).read_bytes()
    Path(shards[2]).write_bytes(data[: 1024 + 700])  # truncated inside its second member
    stream = ShardStream(shards, seed=0, kind=0, stream=0, streams=1)
    seen = Counter(keys(stream, 30))  # more than two epochs
    assert {f"{k:06d}" for k in (0, 1, 2, 9, 10, 11)} <= set(seen)
    assert not {f"{k:06d}" for k in (3, 4, 5)} & set(seen)
    assert stream.unreadable_shards >= 4  # two bad shards, once an epoch
    err = capsys.readouterr().err
    assert shards[1] in err and shards[2] in err and "skipped" in err
    for shard in shards:
        Path(shard).unlink(missing_ok=True)
    with pytest.raises(RuntimeError, match="read no sample from its shards"):
        next(ShardStream(shards, seed=0, kind=0, stream=0, streams=1))


def test_pairs_come_from_txt_or_a_json_caption_and_bad_text_is_none():
    assert pair_of({"png": b"x", "txt": b"a red circle"}) == (b"x", "a red circle")
    assert pair_of({"jpg": b"y", "json": json.dumps({"caption": "two squares"}).encode()}) == (b"y", "two squares")
    assert pair_of({"webp": b"z", "json": b'{"text": "hi"}'}) == (b"z", "hi")
    assert pair_of({"png": b"x", "txt": b"\xff\xfe not utf-8"}) == (b"x", None)
    assert pair_of({"txt": b"no image"}) == (None, "no image")


def make_batches(sources, tokenizer, **kwargs):
    return StreamingPretrainingBatches(
        sources, tokenizer, BatchOptions({"pair": 3}, 64, 8, max_text_length=32), **kwargs
    )


def loader(dataset, workers):
    return list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_resume_exactly_from_the_positions_they_carry(world, workers):
    paths, tokenizer, shards, _ = world
    sources = load_sources(pairs=[str(shards / "pairs-{000..004}.tar")], streaming=True)
    uninterrupted = loader(make_batches(sources, tokenizer, num_steps=9, num_workers=workers), workers)
    state = {}
    for batch in uninterrupted[:5]:  # what the Engine keeps of the first 5 steps
        state = {
            "workers": batch["data_state"]["workers"],
            "streams": {**state.get("streams", {}), **batch["data_state"]["streams"]},
        }
    resumed = loader(
        make_batches(sources, tokenizer, start_step=5, num_steps=4, num_workers=workers, positions=state), workers
    )
    for a, b in zip(uninterrupted[5:], resumed):
        for key in ("pixel_values", "input_ids", "labels"):
            assert torch.equal(a["pair"][key], b["pair"][key]), key
    texts = {
        tokenizer.decode(ids, skip_special_tokens=True)
        for batch in uninterrupted[:8]
        for ids in batch["pair"]["input_ids"]
    }
    assert len(texts) > 12  # 24 samples go by in 8 steps of 3: the stream moves on
    with pytest.raises(ValueError, match=r"5 pair shards cannot feed 6 streams \(2 processes x 3 loader workers\)"):
        make_batches(sources, tokenizer, num_workers=3, world_size=2)
    with pytest.raises(ValueError, match="taken with 2 data-loader workers"):
        make_batches(sources, tokenizer, num_workers=3, positions={"workers": 2, "streams": {}})


def test_samples_without_caption_or_with_a_broken_image_are_skipped_and_counted(world, tmp_path, capsys):
    paths, tokenizer, _, _ = world
    good = (paths["images"] / "00000.png").read_bytes()
    samples = [
        {"__key__": "a", "png": good, "txt": "a red circle"},
        {"__key__": "b", "png": good},  # no caption
        {"__key__": "c", "png": b"\x89PNG broken", "txt": "a blue square"},
        {"__key__": "d", "png": good, "txt": "   "},
        {"__key__": "e", "png": good, "txt": "two circles"},
        {"__key__": "f", "png": good, "txt": "a square"},
    ]
    shard = write_shards(iter(samples), str(tmp_path / "p-%d.tar"), shard_size=10)
    batches = make_batches(load_sources(pairs=shard, streaming=True), tokenizer, num_steps=1)
    batch = next(iter(batches))
    assert batch["counts"]["skipped_pair"] == 3 and batch["counts"]["unreadable_shards"] == 0
    got = [tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") for ids in batch["pair"]["input_ids"]]
    assert len(got) == 3
    err = capsys.readouterr().err
    assert "b in " in err and "no caption" in err and "c in " in err


def test_streaming_needs_shards_and_shards_need_streaming(world, tmp_path):
    paths, tokenizer, shards, _ = world
    with pytest.raises(ValueError, match="must be webdataset shards"):
        load_sources(pairs=[str(paths["pairs"])], streaming=True)
    with pytest.raises(ValueError, match="needs data.streaming: true"):
        load_sources(images=str(shards / "pairs-{000..004}.tar"))
    with pytest.raises(ValueError, match="only streaming reads"):
        load_sources(pairs=[str(shards / "pairs-{000..004}.tar")])
    with pytest.raises(ValueError, match="None of the 2 pair shards exists"):
        load_sources(pairs=[str(tmp_path / "gone-{0..1}.tar")], streaming=True)
    with pytest.raises(TypeError, match="use StreamingPretrainingBatches"):
        PretrainingBatches(
            load_sources(pairs=[str(shards / "pairs-{000..004}.tar")], streaming=True),
            tokenizer,
            BatchOptions({"pair": 2}, 64, 8),
        )
    images = load_sources(
        images=str(shards / "pairs-{000..004}.tar"), streaming=True
    )  # the image kind from pair shards
    batch = next(iter(StreamingPretrainingBatches(images, None, BatchOptions({"image": 4}, 64, 8), num_steps=1)))
    assert batch["image"]["pixel_values"].shape == (4, 3, 64, 64) and batch["counts"]["skipped_image"] == 0


def test_text_files_stream_in_pieces_that_hold_every_line_once(tmp_path, capsys):
    lines = [f"text number {i} " + "x" * (i % 7) for i in range(50)]
    plain = tmp_path / "a.txt"
    plain.write_text("\n".join(lines[:30]) + "\n")
    structured = tmp_path / "b.jsonl"
    structured.write_bytes(
        ("\n".join(json.dumps({"text": t}) for t in lines[30:]) + "\n").encode() + b'\xff\xfe\n{"text": 3}\n'
    )
    pieces = text_pieces([str(plain), str(structured)], min_pieces=7)
    assert len(pieces) >= 7
    read = [sample["text"] for piece in pieces for sample in text_samples(piece, on_error=None)]
    assert [t for t in read if t is not None] == lines and read.count(
        None
    ) == 2  # every line once, in order; 2 bad lines
    stream_a = ShardStream(pieces, seed=0, kind=Stream.TEXT, stream=0, streams=2, read=text_samples)
    stream_b = ShardStream(pieces, seed=0, kind=1, stream=1, streams=2, read=text_samples)
    for _ in range(20):
        next(stream_a)
    resumed = ShardStream(
        pieces, seed=0, kind=1, stream=0, streams=2, read=text_samples, position=dict(stream_a.position)
    )
    assert [next(resumed)["text"] for _ in range(40)] == [next(stream_a)["text"] for _ in range(40)]
    mine = [set(map(int, stream._mine(0))) for stream in (stream_a, stream_b)]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(len(pieces)))  # the two streams split the pieces


def test_streamed_texts_fill_text_batches_and_skip_bad_lines(world, tmp_path, capsys):
    _, tokenizer, _, _ = world
    (tmp_path / "t.jsonl").write_bytes(b'{"text": "a red circle"}\n\xff\n{"text": "two blue squares"}\n' * 4)
    sources = load_sources(texts=[str(tmp_path / "t.jsonl")], streaming=True)
    batch = next(iter(StreamingPretrainingBatches(sources, tokenizer, BatchOptions({"text": 6}, 64, 8), num_steps=1)))
    assert batch["text"]["input_ids"].shape[0] == 6 and batch["counts"]["skipped_text"] >= 2
    assert "t.jsonl at byte" in capsys.readouterr().err
