"""The fine-tuning tasks (beit3/training/tasks/) in one process, without DeepSpeed or the demo's run: each task reads its
split of a small generated world (the standard formats), trains a step of a tiny model, and scores and predicts.
The fast tier of the fine-tuning tests; test_finetune.py runs the same tasks as users do, through the scripts."""

import json

import pytest
import torch
import yaml
from transformers.image_utils import IMAGENET_DEFAULT_MEAN

from beit3 import train_sentencepiece
from beit3.data.synthetic import write_task_world
from beit3.package_files import CONFIG_DIR
from beit3.training.finetune import FinetuneModel, initial_model
from beit3.training.tasks import TASKS, TaskData

TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(the world's data folder, a tokenizer trained on its captions)."""
    folder = tmp_path_factory.mktemp("world")
    paths = write_task_world(
        folder / "data",
        seed=0,
        size=32,
        pretrain_images=8,
        train_images=16,
        val_images=8,
        test_images=8,
        nlvr2_train=8,
        nlvr2_dev=8,
        classification_train=18,
        classification_val=9,
        questions_per_image=2,
    )
    tokenizer = train_sentencepiece(folder / "tokenizer", 36, files=[paths["pretrain_texts"]], quiet=True)
    return folder / "data", tokenizer


def _task_and_model(name: str, world, settings: dict | None = None, text_positions: int = 40):
    """The task with the demo config's data and eval sections (its paths pointed at this module's world) and the data
    ``settings`` given over them, set up with a tiny model of random weights."""
    data_folder, tokenizer = world
    text = (CONFIG_DIR / "tasks" / f"{name}_demo.yaml").read_text().replace("runs/demo/data", str(data_folder))
    config = yaml.safe_load(text)
    task = TASKS[name]({**config["data"], **(settings or {})}, {**config.get("eval", {}), "batch_size": 8})
    section = FinetuneModel(
        preset="beit3_tiny_paper_patch16_224", overrides={**TINY, "max_position_embeddings": text_positions}
    )
    model = initial_model(type(task), section, tokenizer, task.config_overrides())
    task.setup(tokenizer, model.config)
    return task, model


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_trains_a_step_then_scores_and_predicts_in_its_format(name, world, tmp_path):
    task, model = _task_and_model(name, world)
    task.prepare_model(model, None)
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in range(4)])
    before = {key: p.detach().clone() for key, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, values = task.step(model, batch, step=0)
    assert (
        loss.ndim == 0
        and torch.isfinite(loss)
        and all(torch.isfinite(torch.as_tensor(v)).all() for v in values.values())
    )
    loss.backward()
    optimizer.step()
    moved = {key.split(".")[0] for key, p in model.named_parameters() if not torch.equal(before[key], p.detach())}
    assert "beit3" in moved and moved - {"beit3"}, (
        f"{name}: the step reached {sorted(moved)}, not the backbone and the head"
    )

    model.eval()
    scores = task.evaluate(model, tmp_path)
    assert isinstance(scores[task.metric], float) and 0.0 <= scores[task.metric] <= 100.0, scores
    # The scores of the tasks with an official tool say which tool and version they reproduce.
    named = {"vqa": "vqaEval.py 2021", "retrieval": "unilm", "captioning": "pycocoevalcap 1.2, PTB tokenizer"}
    assert named.get(name, "") in scores.get("evaluation", "")
    if name == "vqa":
        task.data.vqa_evaluation = "2016"
        assert task.evaluate(model, tmp_path)["evaluation"].startswith("vqaEval.py 2016: ")
    path = task.predict(model, tmp_path)
    assert path.is_file() and path.stat().st_size > 0
    if path.suffix == ".json":
        json.loads(path.read_text())  # complete, not torn


def test_the_blind_control_scores_the_same_examples_with_the_images_of_others(world, tmp_path):
    task, model = _task_and_model("vqa", world)
    model.eval()
    seen = task.evaluate(model, tmp_path)
    task.blind = True
    blind = task.evaluate(model, tmp_path)
    assert task.eval_file("eval_results.json") == "blind_eval_results.json"
    assert seen.keys() == blind.keys() and seen["per_question_type"].keys() == blind["per_question_type"].keys()
    # The answers change when the images do: the model reads its image (random weights, but an image-dependent output).
    answers = {
        name: json.loads((tmp_path / name).read_text())
        for name in ("vqa_eval_predictions.json", "blind_vqa_eval_predictions.json")
    }
    assert answers["vqa_eval_predictions.json"] != answers["blind_vqa_eval_predictions.json"]


RECIPES = sorted(path.name for path in (CONFIG_DIR / "tasks").glob("*.yaml") if not path.stem.endswith("_demo"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_a_step_with_its_own_data_settings(recipe, world):
    """The packaged recipes' data settings (augmentation, mixup, loss, masking), which the demo's configs leave at
    their simplest, on the world's files: every setting but the paths and the answer threshold (its 16 images hold
    no answer 9 times)."""
    name = recipe.split("_")[0]
    data = yaml.safe_load((CONFIG_DIR / "tasks" / recipe).read_text())["data"]
    settings = {
        key: value
        for key, value in data.items()
        if not isinstance(value, dict) and not str(value).startswith("/") and key != "answer_min_count"
    }
    task, model = _task_and_model(name, world, settings, text_positions=2 + 64)  # the recipes' texts: 64 tokens at most
    assert task.data.augment == data["augment"]
    task.prepare_model(model, None)
    dataset = task.train_dataset()
    loss, _ = task.step(model, task.collate([dataset[i] for i in range(4)]), step=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    transform = task.image_transform(train=True)
    if data["augment"] != "none":  # normalized as the recipe's models expect: ImageNet's statistics or mean = std = 0.5
        (normalize,) = [t for t in transform.transforms if type(t).__name__ == "Normalize"]
        expected = IMAGENET_DEFAULT_MEAN if data["augment"] == "imagenet" else (0.5, 0.5, 0.5)
        assert torch.allclose(torch.as_tensor(normalize.mean, dtype=torch.float), torch.tensor(expected))


def test_a_task_model_from_a_pretrained_folder_says_in_one_line_what_starts_fresh(world, tmp_path, capsys):
    from beit3 import Beit3Config
    from beit3.modeling_heads import Beit3ForMaskedDataModeling

    _, tokenizer = world
    config = Beit3Config.from_preset("beit3_tiny_patch16_224", **TINY, vocab_size=len(tokenizer), itm_weight=1.0)
    Beit3ForMaskedDataModeling(config).save_pretrained(tmp_path / "pretrained")
    capsys.readouterr()
    section = FinetuneModel(init=str(tmp_path / "pretrained"))
    model = initial_model(TASKS["vqa"], section, tokenizer, {"id2label": {0: "yes", 1: "no", 2: "2"}})
    out = capsys.readouterr()
    assert model.config.num_labels == 3
    text = out.out + out.err
    assert "LOAD REPORT" not in text and "MISSING" not in text, text
    assert "starting fresh: head.* (" in text and "pooler.* (" in text and "not used: itm_head.* (" in text, text
    # A folder that lacks backbone tensors is not a start: an error, not a silently random backbone
    broken = Beit3ForMaskedDataModeling(config)
    broken.beit3.layers = broken.beit3.layers[:1]
    broken.save_pretrained(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"lacks \d+ backbone tensors \(e.g. beit3.layers.1"):
        initial_model(TASKS["vqa"], FinetuneModel(init=str(tmp_path / "broken")), tokenizer, {})


# -- the registry --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_declares_what_the_programs_read_and_its_label_tensor_exists(name):
    from beit3 import Beit3Config

    task_class = TASKS[name]
    assert task_class.name == name and task_class.metric and task_class.metric_label and task_class.predictions_file
    assert task_class.predict_verb and issubclass(task_class.Data, TaskData)
    config = Beit3Config.from_preset("beit3_tiny_patch16_224", **TINY, num_labels=5)
    head = task_class.model_class(config)
    if task_class.label_key is not None:  # what beit3 convert sizes an official head by: (labels, ...)
        assert head.state_dict()[task_class.label_key].shape[0] == 5


def test_a_name_or_verb_another_task_holds_is_refused():
    from beit3.training.tasks import register_task, task_named

    assert task_named("caption") is TASKS["captioning"] and task_named("captioning") is TASKS["captioning"]
    with pytest.raises(KeyError, match="unknown task 'fly'; the tasks are captioning, classification"):
        task_named("fly")
    clash = type("Clash", (TASKS["vqa"],), {"name": "vqa2", "predict_verb": "caption"})
    with pytest.raises(ValueError, match=r"is named 'caption', as the task 'captioning' is"):
        register_task(clash)
    assert "vqa2" not in TASKS


# A task of another package: a module and its entry point in the group beit3.tasks, nothing else.
TOY_TASK = '''
from dataclasses import dataclass

import torch

from beit3.data.common import split_batch
from beit3.io import write_json_atomic
from beit3.modeling_heads import Beit3ForImageClassification
from beit3.training.tasks import FinetuneTask, TaskData, register_task


@dataclass
class BrightnessData(TaskData):
    split_keys = ("count",)


class Squares(torch.utils.data.Dataset):
    """Plain images, dark (label 0) or bright (1) by turns."""

    def __init__(self, count, size):
        self.count, self.size = count, size

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        level = 0.8 if index % 2 else -0.8
        return {"pixel_values": torch.full((3, self.size, self.size), level), "labels": torch.tensor(index % 2)}


@register_task
class BrightnessTask(FinetuneTask):
    name, model_class, Data = "brightness", Beit3ForImageClassification, BrightnessData
    metric, metric_label = "accuracy", "accuracy (%)"
    reads_text = False
    label_key = "head.weight"
    predict_verb = "brightness"
    predictions_file = "brightness.json"

    def config_overrides(self):
        return {"id2label": {0: "dark", 1: "bright"}}

    def dataset(self, split):
        return Squares(self.split(split)["count"], self.model_config.image_size)

    def train_dataset(self):
        return self.dataset("train")

    def step(self, module, batch, step):
        inputs, _ = split_batch(batch)
        out = module(**inputs)
        return out.loss, {"accuracy": (out.logits.argmax(-1) == inputs["labels"]).float().mean()}

    def guesses(self, model, split):
        batch = next(iter(self.eval_batches(self.dataset(split))))[0]
        return model(pixel_values=batch["pixel_values"]).logits.argmax(-1), batch["labels"]

    def evaluate(self, model, output_dir):
        with torch.no_grad():
            guesses, labels = self.guesses(model, "eval")
        return {"accuracy": 100.0 * (guesses == labels).float().mean().item()}

    def predict(self, model, output_dir):
        with torch.no_grad():
            guesses, _ = self.guesses(model, "predict")
        path = output_dir / self.predictions_file
        write_json_atomic(path, [model.config.id2label[int(g)] for g in guesses])
        return path

    @classmethod
    def predict_examples(cls, model, image_processor, tokenizer, images, texts, options):
        pixel_values = image_processor(list(images.values()), return_tensors="pt")["pixel_values"]
        guesses = model(pixel_values=pixel_values).logits.argmax(-1)
        return [f"{path}: {model.config.id2label[int(g)]}" for path, g in zip(images, guesses)]
'''


@pytest.mark.e2e
def test_a_task_registered_by_another_package_is_fine_tuned_and_predicts_through_the_commands(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    (tmp_path / "toy_task.py").write_text(TOY_TASK)
    meta = tmp_path / "toy_task-0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-task\nVersion: 0\n")
    (meta / "entry_points.txt").write_text("[beit3.tasks]\nbrightness = toy_task:BrightnessTask\n")
    overrides = {**TINY, "num_hidden_layers": 1}
    config = {
        "model": {"preset": "beit3_tiny_patch16_224", "overrides": overrides},
        "data": {"train": {"count": 16}, "eval": {"count": 8}, "predict": {"count": 4}},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "save_every": 2, "micro_batch_size": 4},
        "eval": {"batch_size": 8},
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(config))
    for level, name in ((30, "dark.png"), (220, "bright.png")):
        Image.new("RGB", (32, 32), (level,) * 3).save(tmp_path / name)
    environment = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}

    def beit3(*arguments):
        done = subprocess.run(
            [sys.executable, "-m", "beit3.cli", *arguments], env=environment, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert "brightness" in beit3("finetune", "--help")
    beit3("finetune", "brightness", "--config", str(tmp_path / "toy.yaml"))
    scores = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert scores["task"] == "brightness" and 0.0 <= scores["accuracy"] <= 100.0
    beit3("finetune", "brightness", "--config", str(tmp_path / "toy.yaml"), "--mode", "predict")
    assert len(json.loads((tmp_path / "run" / "brightness.json").read_text())) == 4
    images = [str(tmp_path / "dark.png"), str(tmp_path / "bright.png")]
    lines = beit3("predict", "brightness", "--model", str(tmp_path / "run" / "final"), "--images", *images)
    printed = dict(line.rsplit(": ", 1) for line in lines.splitlines())
    assert printed.keys() == set(images) and set(printed.values()) <= {"dark", "bright"}, lines
    assert "brightness" in beit3("convert", "--help")  # an official checkpoint of the task converts with its head
