"""ImageNet-style class folders: labels from sorted training folders, datasets' imagefolder agreeing, the Dataset feeding the head."""

import pytest
import torch
from conftest import tiny_config, train_with_transformers_trainer
from PIL import Image

from beit3 import Beit3ImageProcessor
from beit3.data.imagenet import ImageClassificationDataset, ImageFolderSplit, ImageRecord, read_image_folder
from beit3.modeling_heads import Beit3ForImageClassification

CLASSES = ["n02085620", "n01440764", "n01443537"]  # written out of order; labels follow the sorted names


def write_folders(root):
    for split, per_class in (("train", 3), ("val", 1)):
        for number, name in enumerate(CLASSES):
            if split == "val" and name == "n01443537":
                continue  # a class absent from val must keep its training label elsewhere
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 36), (number * 80, i * 60, 50)).save(folder / f"{name}_{i}.JPEG")
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image")


def test_labels_are_sorted_training_folders_and_val_reuses_them(tmp_path):
    write_folders(tmp_path)
    train = read_image_folder(tmp_path / "train")
    assert train.classes == sorted(CLASSES) and len(train.records) == 9
    assert [r.label for r in train.records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.records[0].image_path == str(tmp_path / "train" / "n01440764" / "n01440764_0.JPEG")
    val = read_image_folder(tmp_path / "val", classes=train.classes)
    assert [(r.label, r.image_path.split("/")[-2]) for r in val.records] == [(0, "n01440764"), (2, "n02085620")]
    assert [r.label for r in read_image_folder(tmp_path / "val").records] == [
        0,
        1,
    ]  # on its own, val would shift the labels
    with pytest.raises(ValueError, match=r"class folders that the given classes lack: \['n02085620'\]"):
        read_image_folder(tmp_path / "val", classes=["n01440764"])
    with pytest.raises(FileNotFoundError, match="No image folder"):
        read_image_folder(tmp_path / "nowhere")


def read_hf_imagefolder(root, split="train") -> ImageFolderSplit:
    """The records of datasets' imagefolder builder on the same folder: the oracle for read_image_folder."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    data = load_dataset("imagefolder", data_dir=str(root), split=split).cast_column("image", ImageFeature(decode=False))
    return ImageFolderSplit(
        [ImageRecord(row["image"]["path"], row["label"]) for row in data], list(data.features["label"].names)
    )


def test_datasets_imagefolder_gives_the_same_records(tmp_path):
    write_folders(tmp_path)
    ours = read_image_folder(tmp_path / "train")
    theirs = read_hf_imagefolder(tmp_path / "train")
    assert theirs.classes == ours.classes
    assert sorted((r.image_path, r.label) for r in theirs.records) == sorted(
        (r.image_path, r.label) for r in ours.records
    )


def test_dataset_feeds_the_classification_head_and_names_corrupt_images(tmp_path):
    write_folders(tmp_path)
    split = read_image_folder(tmp_path / "train")
    data = ImageClassificationDataset(split.records, Beit3ImageProcessor.for_imagenet(size=32))
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=9)))
    assert set(batch) == {"pixel_values", "labels"} and batch["pixel_values"].shape == (9, 3, 32, 32)
    model = Beit3ForImageClassification(tiny_config(num_labels=len(split.classes)))
    out = model(**batch)
    assert out.logits.shape == (9, 3) and torch.isfinite(out.loss)
    broken = tmp_path / "train" / "n01443537" / "n01443537_1.JPEG"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ValueError, match=f"Cannot read the image {broken}"):
        data[4]  # n01443537 is the second class: records 3..5


def test_any_callable_transform_works_and_a_wrong_one_is_named(tmp_path):
    from timm.data import create_transform

    write_folders(tmp_path)
    records = read_image_folder(tmp_path / "train").records
    training = create_transform(
        32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25
    )  # the official recipe's
    assert ImageClassificationDataset(records, training)[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(TypeError, match=r"must give a \(C, H, W\) tensor; it gave Image"):
        ImageClassificationDataset(records, lambda image: image)[0]


def test_transformers_trainer_trains_the_classification_head_on_the_dataset(tmp_path):
    write_folders(tmp_path)
    split = read_image_folder(tmp_path / "train")
    data = ImageClassificationDataset(split.records, Beit3ImageProcessor.for_imagenet(size=32))
    train_with_transformers_trainer(
        Beit3ForImageClassification(tiny_config(num_labels=len(split.classes))), data, tmp_path / "trainer"
    )


def test_a_datasets_imagefolder_dataset_is_taken_as_it_is(tmp_path):
    from datasets import load_dataset

    write_folders(tmp_path)
    (tmp_path / "train" / "n01440764" / "notes.txt").unlink()
    data = load_dataset("imagefolder", data_dir=str(tmp_path / "train"), split="train")
    items = ImageClassificationDataset(data, Beit3ImageProcessor.for_imagenet(size=32))
    assert len(items) == 9 and items[0]["pixel_values"].shape == (3, 32, 32)
    assert sorted(int(items[i]["labels"]) for i in range(9)) == sorted(data["label"])
    train_with_transformers_trainer(Beit3ForImageClassification(tiny_config(num_labels=3)), items, tmp_path / "trainer")
    with pytest.raises(ValueError, match=r"no column 'category'; its columns are \['image', 'label'\]"):
        ImageClassificationDataset(data, Beit3ImageProcessor.for_imagenet(size=32), label_column="category")
