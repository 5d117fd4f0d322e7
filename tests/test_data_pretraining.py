"""The pretraining mixture: every kind in every batch, determinism by step, corrupt images, webdataset shards,
and image targets from precomputed codes (tokenizers/encode_images.py)."""

import importlib.util
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit3 import train_sentencepiece
from beit3.data.common import load_rgb
from beit3.data.images import read_codes, tokenizer_transform
from beit3.data.pretraining import BatchOptions, PretrainingBatches, finish_batch
from beit3.data.sources import load_sources
from beit3.data.synthetic import write_shapes_world
from beit3.visual_tokenizers import VQKD, VQKDConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture")
    paths = write_shapes_world(folder, 24)
    tokenizer = train_sentencepiece(
        folder / "tok", vocab_size=36, files=[paths["texts"]], model_max_length=32, quiet=True
    )
    return paths, tokenizer


PLACEMENT = ("seed", "rank", "world_size", "start_step", "num_steps")


def batches(sources, tokenizer, sizes=None, **kwargs):
    """PretrainingBatches of 64 px images in 8 px patches; kwargs are BatchOptions' fields and the placement's."""
    placement = {key: kwargs.pop(key) for key in PLACEMENT if key in kwargs}
    options = BatchOptions(
        batch_sizes=sizes or {"image": 3, "text": 3, "pair": 3},
        **{"image_size": 64, "patch_size": 8, "max_text_length": 32, **kwargs},
    )
    return PretrainingBatches(sources, tokenizer, options, **placement)


def test_every_batch_has_all_kinds_with_masks(world):
    paths, tokenizer = world
    batch = batches(load_sources(paths["images"], [paths["texts"]], [paths["pairs"]]), tokenizer)[0]
    assert batch["image"]["pixel_values"].shape == (3, 3, 64, 64) and batch["image"]["bool_masked_pos"].shape == (3, 64)
    assert (batch["image"]["bool_masked_pos"].sum(-1) == round(64 * 75 / 196)).all()
    assert batch["image"]["num_masked_patches"] == 3 * round(64 * 75 / 196)  # the model gathers by these counts
    assert batch["image"]["pixel_values"].dtype == batch["pair"]["pixel_values"].dtype == torch.uint8  # as cropped
    finish_batch(batch)
    assert 0 <= batch["image"]["tokenizer_pixel_values"].min() and batch["image"]["tokenizer_pixel_values"].max() <= 1
    assert -1 <= batch["image"]["pixel_values"].min() and batch["image"]["pixel_values"].max() <= 1  # mean = std = 0.5
    masks = {}  # (a batch without padding has no attention_mask: all ones)
    for kind in ("text", "pair"):
        chosen = batch[kind]["labels"] != -100
        assert batch[kind]["num_masked_text_tokens"] == int(chosen.sum())
        assert chosen.any() and batch[kind]["input_ids"].shape[0] == 3 and batch[kind]["input_ids"].shape[1] <= 32
        masks[kind] = batch[kind].get("attention_mask", torch.ones_like(batch[kind]["input_ids"]))
        assert masks[kind][:, -1].any()  # padded to the longest text, not beyond
    pair_rate = (batch["pair"]["labels"] != -100).sum() / (masks["pair"].sum() - 6)
    text_rate = (batch["text"]["labels"] != -100).sum() / (masks["text"].sum() - 6)
    assert pair_rate > text_rate  # 50% of pair text against 15% of plain text


def test_batches_depend_only_on_seed_step_and_rank(world):
    paths, tokenizer = world
    sources = load_sources(paths["images"], [paths["texts"]], [paths["pairs"]])
    a = batches(sources, tokenizer, seed=1)[5]
    b = batches(sources, tokenizer, seed=1, start_step=5)[0]  # a resumed run starting at step 5
    for kind in ("image", "text", "pair"):
        for key, value in a[kind].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[kind][key])), (kind, key)
    other_rank = batches(sources, tokenizer, seed=1, rank=1, world_size=2)[5]
    assert not torch.equal(other_rank["image"]["pixel_values"], a["image"]["pixel_values"])


def test_corrupt_images_are_replaced_and_counted(world, tmp_path):
    paths, tokenizer = world
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 60, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    sources = load_sources(folder)
    data = batches(sources, tokenizer, {"image": 5})
    total = sum(data[step]["counts"]["skipped_image"] for step in range(4))
    assert total == 4  # the broken file comes up once per pass over 5 images


def test_webdataset_shards_give_pairs(world, tmp_path):
    paths, tokenizer = world
    shard = tmp_path / "pairs-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            buffer = io.BytesIO()
            Image.new("RGB", (48, 48), (0, 80 * i, 0)).save(buffer, format="JPEG")
            text = (
                f"a big green square number {i}" if i < 3 else " "
            )  # an empty caption is left out, as in the text kind
            for name, data in ((f"s{i}.jpg", buffer.getvalue()), (f"s{i}.txt", text.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sources = load_sources(pairs=[str(shard), str(paths["pairs"])])
    assert len(sources["pair"]) == 3 + 24
    data = batches(sources, tokenizer, {"pair": 27})
    assert data[0]["pair"]["pixel_values"].shape == (27, 3, 64, 64) and data[0]["counts"]["skipped_pair"] == 0


def test_a_users_saved_datasets_dataset_is_a_source_of_every_kind(world, tmp_path):
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    paths, tokenizer = world
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    images = [Image.new("RGB", (40, 40), color) for color in colors]
    captions = ["a red square", "a green square", "  "]  # an empty caption is left out, as everywhere
    data = Dataset.from_dict({"picture": images, "caption": captions}).cast_column("picture", ImageFeature())
    DatasetDict({"train": data}).save_to_disk(tmp_path / "mine")
    before = sorted(p.name for p in (tmp_path / "mine").rglob("*"))
    spec = {"dataset": str(tmp_path / "mine"), "image": "picture", "text": "caption"}
    sources = load_sources(images=spec, texts=spec, pairs=spec)
    assert (len(sources["image"]), len(sources["text"]), len(sources["pair"])) == (3, 2, 2)
    assert (
        set(sources["pair"].column_names) == {"path", "image_bytes", "text"}
        and sources["text"][1]["text"] == "a green square"
    )
    batch = batches(sources, tokenizer, {"image": 3, "text": 2, "pair": 2}, max_text_length=32)[0]
    assert batch["pair"]["pixel_values"].shape == (2, 3, 64, 64) and batch["counts"]["skipped_pair"] == 0
    assert batch["image"]["pixel_values"].shape[0] == 3
    pixels = load_rgb(None, sources["pair"][0]["image_bytes"]).getpixel((20, 20))
    assert pixels == colors[0]  # the saved image's own bytes
    assert sorted(p.name for p in (tmp_path / "mine").rglob("*")) == before  # nothing written into the user's folder
    with pytest.raises(
        ValueError, match=r"has no column 'text' for the pair source; its columns are \['picture', 'caption'\]"
    ):
        load_sources(pairs={"dataset": str(tmp_path / "mine"), "image": "picture"})
    with pytest.raises(ValueError, match=r"holds the splits \['train'\], not 'validation'"):
        load_sources(pairs={**spec, "split": "validation"})
    with pytest.raises(ValueError, match="No dataset saved with save_to_disk"):
        load_sources(pairs={**spec, "dataset": str(tmp_path / "nothing")})


def encode(tokenizer_dir: Path, images: Path, output: Path) -> dict[str, torch.Tensor]:
    """Runs tokenizers/encode_images.py (in this process) and returns what it wrote: {path relative to images: codes}."""
    spec = importlib.util.spec_from_file_location("encode_images_script", ROOT / "tokenizers" / "encode_images.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (
        script.main(
            [
                "--tokenizer",
                str(tokenizer_dir),
                "--images",
                str(images),
                "--output",
                str(output),
                "--device",
                "cpu",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    codes, index = read_codes(output)
    return {entry["path"]: codes[entry["row"]] for entry in index}


@pytest.fixture(scope="module")
def visual_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqkd") / "tokenizer"
    torch.manual_seed(0)
    VQKD(VQKDConfig.from_preset("vqkd_tiny", image_size=64)).save_pretrained(folder)  # 8x8 codes from 64 px, 64 codes
    return folder


def noise_images(folder: Path, names, seed=0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:  # noise of different sizes and shapes: distinct codes, and a real resize + center crop
        height, width = rng.integers(48, 96, 2)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)


def center_view(path) -> torch.Tensor:
    """The model's view of the crop encode_images.py gives the tokenizer (here both 64 px), normalized as the model's."""
    return tokenizer_transform(64)(load_rgb(path)) * 2 - 1


def used_image(data: PretrainingBatches, step: int, slot: int, broken=()) -> tuple[Path, int]:
    """The image a slot ends up with, the first of its stream from its own position on that is not broken, and
    how many broken ones it passed."""
    for shift in range(8):
        path = Path(data.sources["image"][data._position("image", step, slot, shift)[0]]["path"])
        if path.name not in broken:
            return path, shift
    raise AssertionError("no readable image")


def test_batches_from_codes_carry_the_codes_encode_images_wrote(world, visual_tokenizer, tmp_path):
    paths, tokenizer = world
    images = Path(paths["images"])
    written = encode(visual_tokenizer, images, tmp_path / "codes")
    assert (
        len(written) == 24 and len({tuple(c.tolist()) for c in written.values()}) > 12
    )  # images get codes of their own
    sources = load_sources(images, [paths["texts"]], [paths["pairs"]], image_codes=tmp_path / "codes")
    data = batches(sources, tokenizer, color_jitter=0.0)
    for step in (0, 3, 9):  # 9: past the first epoch of 24 images (3 per step)
        batch = data[step]
        image = batch["image"]
        # no tokenizer view: the codes are given
        assert set(image) == {"pixel_values", "bool_masked_pos", "num_masked_patches", "image_labels"}
        assert image["image_labels"].shape == (3, 64) and image["image_labels"].dtype == torch.long
        for slot in range(3):
            path, _ = used_image(data, step, slot)
            assert torch.equal(image["image_labels"][slot], written[path.relative_to(images).as_posix()]), (
                step,
                slot,
                path,
            )
            # the same fixed crop the codes describe: no random crop, no flip
            torch.testing.assert_close(image["pixel_values"][slot], center_view(path))
        assert batch["pair"]["pixel_values"].shape == (3, 3, 64, 64) and "text" in batch

    # With the default color jitter the view changes color only, and every batch is still a function of (seed, step, rank).
    jittered = batches(sources, tokenizer, seed=1)
    a, b = jittered[5], batches(sources, tokenizer, seed=1, start_step=5)[0]
    for key, value in a["image"].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["image"][key])), key
    assert not torch.equal(
        a["image"]["pixel_values"], batches(sources, tokenizer, seed=1, color_jitter=0.0)[5]["image"]["pixel_values"]
    )
    assert torch.equal(
        a["image"]["image_labels"], batches(sources, tokenizer, seed=1, color_jitter=0.0)[5]["image"]["image_labels"]
    )


def test_images_without_codes_are_an_error_before_any_batch(world, visual_tokenizer, tmp_path):
    noise_images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    encode(visual_tokenizer, tmp_path / "images", tmp_path / "codes")
    noise_images(tmp_path / "images" / "new", ["d.png", "e.png"], seed=1)  # added after encoding
    with pytest.raises(
        ValueError,
        match=r"2 of the 5 images below .* have no codes in .*index\.jsonl, e\.g\. new/d\.png.*encode_images\.py",
    ):
        load_sources(tmp_path / "images", image_codes=tmp_path / "codes")
    with pytest.raises(FileNotFoundError, match="no codes.safetensors"):
        load_sources(tmp_path / "images", image_codes=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no images source"):
        load_sources(texts=[world[0]["texts"]], image_codes=tmp_path / "codes")


def test_corrupt_images_are_replaced_with_their_codes(world, visual_tokenizer, tmp_path):
    _, tokenizer = world
    folder = tmp_path / "images"
    noise_images(folder, [f"{i}.png" for i in range(4)])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # encode_images.py skips it: no codes row
    written = encode(visual_tokenizer, folder, tmp_path / "codes")
    assert sorted(written) == ["0.png", "1.png", "2.png", "3.png"]
    (folder / "3.png").write_bytes((folder / "3.png").read_bytes()[:40])  # broken after it was encoded: it has codes
    sources = load_sources(folder, image_codes=tmp_path / "codes")
    data = batches(sources, tokenizer, {"image": 5}, color_jitter=0.0)
    total = 0
    for step in range(4):
        batch = data[step]
        passed = 0
        for slot in range(5):
            path, shift = used_image(data, step, slot, broken=("broken.png", "3.png"))
            passed += shift
            assert torch.equal(
                batch["image"]["image_labels"][slot], written[path.name]
            )  # the replacement's codes came with it
            torch.testing.assert_close(batch["image"]["pixel_values"][slot], center_view(path))
        assert batch["counts"]["skipped_image"] == passed
        total += passed
    assert (
        total >= 8
    )  # each broken file comes up at least once per pass over 5 images (a replacement can be broken too)
    with pytest.raises(ValueError, match="64 codes per image .* 4x4 patches"):
        batches(sources, tokenizer, {"image": 5}, patch_size=16)  # 4x4 patches, 8x8 codes


def test_matching_batches_pair_each_text_with_its_image_and_with_another_captions_image(world):
    paths, tokenizer = world
    sources = load_sources(paths["images"], [paths["texts"]], [paths["pairs"]])
    make = lambda **kw: batches(sources, tokenizer, {"pair": 8}, max_text_length=32, itm_negatives=0.5, **kw)
    batch = make(seed=3)[2]
    itm, pair = batch["itm"], batch["pair"]
    assert itm["itm_labels"].tolist() == [1] * 4 + [0] * 4
    assert (
        torch.equal(itm["input_ids"][:4], itm["input_ids"][4:]) and (itm["input_ids"] != tokenizer.mask_token_id).all()
    )  # unmasked
    assert torch.equal(itm["pixel_values"][:4], pair["pixel_values"][:4])  # the positives: each text with its own image
    captions = tokenizer.batch_decode(itm["input_ids"][:4], skip_special_tokens=True)
    rows = [sources["pair"][make(seed=3)._position("pair", 2, slot)[0]] for slot in range(8)]
    for caption, image in zip(captions, itm["pixel_values"][4:]):
        source = [slot for slot in range(8) if torch.equal(pair["pixel_values"][slot], image)]
        assert source and all(
            rows[slot]["text"].strip() != caption.strip() for slot in source
        )  # the image of another caption
    again = make(seed=3, start_step=2)[0]  # a pure function of (seed, step, rank), as every kind
    for key, value in itm.items():
        assert torch.equal(value, again["itm"][key]), key
    assert "itm" not in batches(sources, tokenizer, {"pair": 8})[0]  # off by default

    with pytest.raises(ValueError, match="data.itm_negatives must be a number >= 0 and <= 1; got 1.5"):
        batches(sources, tokenizer, {"pair": 8}, itm_negatives=1.5)
    with pytest.raises(ValueError, match="pair batches of 2 or more"):
        batches(sources, tokenizer, {"pair": 1}, itm_negatives=0.5)


def test_batch_options_refuse_a_share_outside_zero_to_one_and_an_unknown_kind():
    for field in ("image_mask_ratio", "itm_negatives", "itm_text_swaps", "pair_hflip"):
        with pytest.raises(ValueError, match=f"data.{field} must be a number >= 0 and <= 1; got 2"):
            BatchOptions({"pair": 4}, 64, 8, **{field: 2})
    with pytest.raises(ValueError, match=r"batch sizes for \['video'\]: the kinds are image, text, pair"):
        BatchOptions({"video": 4}, 64, 8)


def test_the_image_mask_ratio_sets_the_masked_patches_of_every_image(world):
    paths, tokenizer = world
    sources = load_sources(paths["images"])
    assert BatchOptions({"image": 3}, 224, 16).masked_patches == 75  # BEiT's 75 of 196 by default
    for ratio, patches in ((0.5, 32), (0.25, 16)):
        masks = batches(sources, tokenizer, {"image": 3}, image_mask_ratio=ratio)[0]["image"]["bool_masked_pos"]
        assert masks.shape == (3, 64) and masks.sum(-1).tolist() == [patches] * 3


def test_tokenizer_views_alone_are_the_views_a_full_batch_gives_the_tokenizer(world):
    paths, tokenizer = world
    sources = load_sources(paths["images"])
    full = batches(sources, None, {"image": 4}, seed=2)[3]["image"]
    alone = batches(sources, None, {"image": 4}, seed=2, tokenizer_views_only=True)[3]["image"]
    assert set(alone) == {"tokenizer_pixel_values"}  # no model view, no masks: what a visual tokenizer trains on
    assert torch.equal(alone["tokenizer_pixel_values"], full["tokenizer_pixel_values"])


def test_a_text_batch_without_padding_goes_without_an_attention_mask(world, tmp_path):
    paths, tokenizer = world
    same = tmp_path / "same-length.txt"
    same.write_text("a red circle\n" * 8)  # every text the same length: no padding in any batch
    plain = batches(load_sources(texts=[same]), tokenizer, {"text": 3})[0]["text"]
    assert "attention_mask" not in plain and set(plain) == {"input_ids", "labels", "num_masked_text_tokens"}
    mixed = batches(load_sources(texts=[paths["texts"]]), tokenizer, {"text": 8})[0]["text"]
    assert "attention_mask" in mixed and not mixed["attention_mask"].all()


def test_views_leave_the_loader_as_uint8_and_finish_batch_converts_them_as_the_views_do(world):
    from beit3.views import TwoViewTransform

    paths, tokenizer = world
    batch = batches(load_sources(paths["images"], [paths["texts"]], [paths["pairs"]]), tokenizer, itm_negatives=1.0)[0]
    raw = {kind: dict(batch[kind]) for kind in ("image", "pair", "itm")}
    assert all(raw[kind]["pixel_values"].dtype == torch.uint8 for kind in raw)
    finish_batch(batch)
    views = TwoViewTransform()
    model, tokenizer_view = views.finish(raw["image"]["pixel_values"], raw["image"]["tokenizer_pixel_values"])
    assert torch.equal(batch["image"]["pixel_values"], model)
    assert torch.equal(batch["image"]["tokenizer_pixel_values"], tokenizer_view)
    for kind in ("pair", "itm"):
        assert torch.equal(batch[kind]["pixel_values"], views.finish(raw[kind]["pixel_values"])[0])
    assert finish_batch(batch)["image"]["pixel_values"] is batch["image"]["pixel_values"]  # floats stay as they are


def test_group_by_length_puts_texts_of_one_length_together_and_keeps_every_sample(world, tmp_path):
    import random

    from beit3.data.pretraining import StreamingPretrainingBatches

    _, tokenizer = world
    lengths = [1, 2, 4, 6] * 12
    random.Random(0).shuffle(lengths)
    file = tmp_path / "lengths.txt"
    file.write_text("".join(" ".join(["red"] * n) + "\n" for n in lengths))
    sources = load_sources(texts=[file])
    plain = batches(sources, tokenizer, {"text": 3})
    grouped = batches(sources, tokenizer, {"text": 3}, group_by_length=8)

    def unpadded(data, steps):
        return sum("attention_mask" not in data[step]["text"] for step in steps)

    def texts(data, steps):  # the unmasked texts of these steps, without padding
        found = []
        for step in steps:
            part = data[step]["text"]
            ids = torch.where(part["labels"] != -100, part["labels"], part["input_ids"])
            keep = part.get("attention_mask", torch.ones_like(ids)).bool()
            found += [tuple(row[mask].tolist()) for row, mask in zip(ids, keep)]
        return sorted(found)

    window = range(8)
    assert unpadded(grouped, range(16)) >= 10 and unpadded(grouped, range(16)) > 2 * unpadded(plain, range(16))
    assert texts(grouped, window) == texts(plain, window)  # the window's samples, regrouped: none lost or repeated
    assert texts(grouped, window) != texts(plain, range(8, 16))
    resumed = batches(sources, tokenizer, {"text": 3}, group_by_length=8, start_step=5)
    for step in (5, 9):  # a function of (seed, step, rank), as without grouping
        assert texts(resumed, [step - 5]) == texts(grouped, [step])
    with pytest.raises(ValueError, match="data.group_by_length must be an integer >= 0; got -1"):
        BatchOptions({"text": 3}, 64, 8, group_by_length=-1)
    with pytest.raises(ValueError, match="the \\['text'\\] kinds are streamed. Set data.group_by_length to 0"):
        StreamingPretrainingBatches(
            load_sources(texts=[file], streaming=True), tokenizer, BatchOptions({"text": 3}, 64, 8, group_by_length=8)
        )
