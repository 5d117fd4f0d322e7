"""python -m beit3.predict: each task runs on local images with a tiny model and prints its answer."""

import pytest
from conftest import tiny_config

from beit3 import train_sentencepiece
from beit3.data.synthetic import write_shapes_world
from beit3.modeling_heads import (
    Beit3ForCaptioning,
    Beit3ForImageClassification,
    Beit3ForImageTextRetrieval,
    Beit3ForVisualQuestionAnswering,
    Beit3ForVisualReasoning,
)
from beit3.predict import main, predict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    paths = write_shapes_world(folder / "data", 30)
    tokenizer = train_sentencepiece(
        folder / "tok", vocab_size=36, files=[paths["texts"]], model_max_length=16, quiet=True
    )
    images = [str(paths["images"] / f"0000{i}.png") for i in range(2)]
    labels = {0: "red", 1: "blue", 2: "green"}
    models = {
        "caption": Beit3ForCaptioning(tiny_config(mask_token_id=tokenizer.mask_token_id)),
        "vqa": Beit3ForVisualQuestionAnswering(tiny_config(num_labels=3, id2label=labels)),
        "nlvr2": Beit3ForVisualReasoning(tiny_config(num_labels=2)),
        "retrieve": Beit3ForImageTextRetrieval(tiny_config()),
        "classify": Beit3ForImageClassification(tiny_config(num_labels=3, id2label=labels)),
    }
    for task, model in models.items():
        model.save_pretrained(folder / task)
        tokenizer.save_pretrained(folder / task)
    return folder, images


def test_each_task_prints_its_result(setup):
    folder, images = setup
    captions = predict("caption", str(folder / "caption"), images, max_length=8)
    assert len(captions) == 2 and captions[0].startswith(images[0] + ": ")
    answers = predict("vqa", str(folder / "vqa"), images[:1], ["what color is the circle?"], top=2)
    assert len(answers) == 1 and any(name in answers[0] for name in ("red", "blue", "green"))
    verdict = predict("nlvr2", str(folder / "nlvr2"), images, ["there is a red circle"])
    assert "p(true) =" in verdict[0] and ("true" in verdict[0] or "false" in verdict[0])
    matches = predict("retrieve", str(folder / "retrieve"), images, ["a big red circle", "a small blue square"])
    assert len(matches) == 2 and "best match" in matches[0]
    classes = predict("classify", str(folder / "classify"), images, top=3)
    assert all(name in classes[0] for name in ("red", "blue", "green"))


def test_bad_input_is_refused_with_a_message(setup, tmp_path):
    folder, images = setup
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match=f"cannot read image {broken}"):
        main(["classify", "--model", str(folder / "classify"), "--images", str(broken)])
    with pytest.raises(SystemExit, match="needs non-empty"):
        main(["vqa", "--model", str(folder / "vqa"), "--images", images[0], "--text", " "])
    with pytest.raises(SystemExit, match="exactly two --images"):
        main(["nlvr2", "--model", str(folder / "nlvr2"), "--images", images[0], "--text", "x"])
    with pytest.raises(SystemExit, match="no model folder"):
        main(["caption", "--model", str(tmp_path / "missing"), "--images", images[0]])


def test_a_folder_of_another_task_is_refused_naming_both_heads(setup):
    folder, images = setup
    with pytest.raises(
        SystemExit,
        match=r"holds Beit3ForCaptioning \(try `caption`\), but `vqa` needs a Beit3ForVisualQuestionAnswering: "
        r"\d+ of its head's tensors are not in the folder \(head\.0\.bias",
    ):
        main(["vqa", "--model", str(folder / "caption"), "--images", images[0], "--text", "what color?"])
    with pytest.raises(SystemExit, match="`classify` needs a Beit3ForImageClassification"):
        main(["classify", "--model", str(folder / "retrieve"), "--images", images[0]])


def test_a_decompression_bomb_is_a_clear_error(setup, monkeypatch):
    from PIL import Image

    folder, images = setup
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 64 px test images are then over twice the limit
    with pytest.raises(SystemExit, match=f"cannot read image {images[0]}.*decompression bombs"):
        main(["classify", "--model", str(folder / "classify"), "--images", images[0]])


def test_a_model_folder_without_a_tokenizer_is_refused_until_one_is_passed(setup, tmp_path, capsys):
    """A folder converted from an official checkpoint holds weights and config alone: a question must not become a
    row of <unk> there (AutoTokenizer on such a folder builds XLM-R's stand-in of five special tokens)."""
    folder, images = setup
    bare = tmp_path / "vqa-weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / "vqa" / name).read_bytes())
    with pytest.raises(SystemExit, match=r"holds no tokenizer .* Pass it with --tokenizer"):
        main(["vqa", "--model", str(bare), "--images", images[0], "--text", "what color is the circle?"])
    main(
        [
            "vqa",
            "--model",
            str(bare),
            "--images",
            images[0],
            "--text",
            "what color?",
            "--tokenizer",
            str(folder / "vqa"),
        ]
    )
    assert "what color?:" in capsys.readouterr().out


def test_a_folder_that_lost_its_config_or_whose_weights_are_damaged_is_one_error_line(setup, tmp_path):
    import json
    import shutil

    folder, images = setup
    for damage in ("no config.json", "truncated weights", "empty weights", "a field of the wrong type"):
        copy = tmp_path / damage.replace(" ", "-")
        shutil.copytree(folder / "classify", copy)
        weights = copy / "model.safetensors"
        if damage == "no config.json":
            (copy / "config.json").unlink()
            expected = r"holds no config.json, so the model's sizes are unknown\. A from_pretrained folder"
        elif damage == "truncated weights":
            with open(weights, "r+b") as handle:
                handle.truncate(weights.stat().st_size - 100)
            expected = rf"^error: {weights} is damaged \(\d+ bytes where its tensors need \d+\)"
        elif damage == "empty weights":
            weights.write_bytes(b"")
            expected = rf"^error: {weights} is damaged \(a header of 0 bytes in a file of 0\)"
        else:
            config = json.loads((copy / "config.json").read_text())
            (copy / "config.json").write_text(json.dumps({**config, "hidden_size": "abc"}))
            expected = r"^error: Invalid Beit3Config: hidden_size 'abc' must be a positive integer$"
        with pytest.raises(SystemExit, match=expected) as error:
            main(["classify", "--model", str(copy), "--images", images[0]])
        assert "\n" not in str(error.value), damage
