import numpy as np
import pytest
from PIL import Image

from mim_agg.data import ProbeDataModule, Source, sources
from mim_agg.data.sources import ArrayImages, DataError
from mim_agg.data.transforms import build_transform
from mim_agg.errors import ConfigError

MEAN, STD = [0.5] * 3, [0.25] * 3


def datamodule(batch_size: int = 8, **dataset) -> ProbeDataModule:
    """From ``dataset.*`` keys, flat as a config writes them (the source's own among them)."""
    dataset = {"name": "synthetic", "num_classes": 4, "num_workers": 0, **dataset}
    return ProbeDataModule.from_config(
        dataset, img_size=32, mean=MEAN, std=STD, batch_size=batch_size
    )


def load(name: str, num_classes=None, **options):
    """``(train, test)`` of source ``name`` with ``options``, from seed 0."""
    return Source(name, options).load(num_classes, 0)


def test_heldout_is_a_stratified_seeded_part_of_train_only():
    data = datamodule(heldout_fraction=0.25, seed=3)
    data.setup()
    train, heldout, test = (data.splits[s] for s in ("train", "heldout", "test"))
    assert set(train.indices).isdisjoint(heldout.indices)
    assert heldout.base is train.base and test.base is not train.base
    assert len(train) + len(heldout) == 200 and len(test) == 80
    counts = np.bincount(heldout.targets)
    assert counts.sum() == 50 and counts.max() - counts.min() <= 1  # stratified
    again = datamodule(heldout_fraction=0.25, seed=3)
    again.setup()
    assert np.array_equal(again.splits["heldout"].indices, heldout.indices)


def test_no_heldout_split_is_allowed():
    data = datamodule(heldout_fraction=0.0)
    data.setup()
    assert len(data.splits["heldout"]) == 0 and data.val_dataloader() == []
    assert len(data.splits["train"]) == 200


def test_train_and_test_sizes_subsample_stratified():
    data = datamodule(train_size=40, test_size=20, heldout_fraction=0.0)
    data.setup()
    assert np.bincount(data.splits["train"].targets).tolist() == [10, 10, 10, 10]
    assert len(data.splits["test"]) == 20


def test_splits_use_train_and_eval_transforms():
    data = datamodule()
    data.setup()
    image, label = data.splits["test"][0]
    assert tuple(image.shape) == (3, 32, 32) and isinstance(label, int)
    assert data.splits["heldout"].transform is data.eval_transform
    assert data.splits["train"].transform is data.train_transform


def test_digits_are_real_and_split_reproducibly():
    train, test = load("digits", 10)
    assert len(train) + len(test) == 1797 and len(test) == 540
    image, label = train[0]
    assert image.size == (8, 8) and 0 <= label < 10
    assert np.asarray(image).max() > 200  # ink is scaled from 0..16 to 0..255
    again, _ = load("digits", 10)
    assert np.array_equal(again.targets, train.targets)


def test_eval_transform_is_resize_then_center_crop_bicubic():
    transform = build_transform(False, 224, MEAN, STD)
    names = [type(t).__name__ for t in transform.transforms[1].transforms]
    assert names[:2] == ["Resize", "CenterCrop"]
    assert transform.transforms[1].transforms[0].size == 256
    train_names = [
        type(t).__name__ for t in build_transform(True, 224, MEAN, STD).transforms[1].transforms
    ]
    assert train_names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert "ColorJitter" not in train_names


def make_image_folder(root, splits=("train", "val"), classes=("a", "b"), per_class=3):
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (20, 20), (index * 200, k * 40, 0)).save(folder / f"{k}.png")


def test_image_folder_reads_the_imagenet_layout(tmp_path):
    make_image_folder(tmp_path)
    train, test = load("image_folder", 2, root=tmp_path)
    assert len(train) == 6 and len(test) == 6 and list(train.targets) == [0, 0, 0, 1, 1, 1]


def test_image_folder_without_train_says_what_to_do(tmp_path):
    make_image_folder(tmp_path, splits=("val",))
    with pytest.raises(
        FileNotFoundError, match=r"has no train/ folder.*root/train/<class>/<image>"
    ):
        load("imagenet", 2, root=tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    make_image_folder(tmp_path)
    broken = tmp_path / "train" / "a" / "1.png"
    broken.write_bytes(b"not a png")
    train, _ = load("image_folder", 2, root=tmp_path)
    with pytest.raises(OSError, match=r"Cannot read image '.*1\.png'"):
        train[1]


def test_missing_torchvision_set_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR10 not found under '.*cifar-10-batches-py'"):
        load("cifar10", 10, root=tmp_path)


def test_too_few_classes_configured_is_an_error():
    data = datamodule(name="digits", num_classes=3)
    with pytest.raises(
        DataError, match=r"train split .* outside \[0, 3\); set dataset.num_classes=10"
    ):
        data.setup()


def test_a_class_missing_from_one_split_is_an_error_naming_it(tmp_path):
    make_image_folder(tmp_path, splits=("train",), classes=("a", "b", "c"))
    make_image_folder(tmp_path, splits=("val",), classes=("a", "c", "d"))
    with pytest.raises(DataError, match=r"only in train/: b; only in val/: d"):
        load("image_folder", root=tmp_path)


def test_image_folder_classes_are_counted_and_a_wrong_count_refused(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b", "c"))
    data = datamodule(name="image_folder", root=str(tmp_path), num_classes=None, heldout_fraction=0)
    data.setup()
    assert data.num_classes == 3
    with pytest.raises(DataError, match=r"dataset.num_classes=5, but .* has 3 classes"):
        datamodule(name="image_folder", root=str(tmp_path), num_classes=5).setup()


def test_an_empty_class_folder_is_named(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "val" / "b" / "0.png").unlink()
    for k in (1, 2):
        (tmp_path / "val" / "b" / f"{k}.png").rename(tmp_path / "val" / "b" / f"{k}.txt")
    with pytest.raises(DataError, match=r"In .*val: .*b"):
        load("image_folder", root=tmp_path)


def test_a_test_label_out_of_range_fails_before_training(monkeypatch):
    def shifted(num_classes, seed):
        train, test = sources.synthetic(num_classes, seed)
        test.targets = test.targets + 1  # the last class becomes label 4 of 4
        return train, test

    monkeypatch.setitem(sources.SOURCES, "shifted", shifted)
    with pytest.raises(DataError, match=r"The test split .* has labels \[4\] outside \[0, 4\)"):
        datamodule(name="shifted").setup()


def test_odd_image_modes_become_8_bit_rgb(tmp_path):
    from mim_agg.data.sources import load_image

    gradient = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    images = {
        "gray16.png": Image.fromarray(gradient),
        "cmyk.jpg": Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
        "palette.png": Image.new("P", (16, 16), 3),
        "rgba.png": Image.new("RGBA", (16, 16), (10, 20, 30, 128)),
        "gray.png": Image.new("L", (16, 16), 77),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
        loaded = load_image(str(tmp_path / name))
        assert loaded.mode == "RGB" and loaded.size == (16, 16), name
    pixels = np.asarray(load_image(str(tmp_path / "gray16.png")))
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255  # rescaled, not clipped to white
    assert 100 < pixels[8, 0, 0] < 155
    assert np.asarray(load_image(str(tmp_path / "cmyk.jpg")))[0, 0, 0] > 200  # red stays red


def test_verify_names_every_broken_image_before_training(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "val" / "b" / "2.png").write_bytes(b"truncated")
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"")
    data = datamodule(name="image_folder", root=str(tmp_path), num_classes=None, verify=True)
    with pytest.raises(
        DataError,
        match=r"2 images cannot be read \(train: 1 of 6, test: 1 of 6\):\n"
        r"  Cannot read image '.*a/0\.png'.*\n  Cannot read image '.*b/2\.png'",
    ):
        data.setup()  # both splits' broken files in one message


def test_split_files_list_images_with_labels(tmp_path):
    for split, count in (("train", 4), ("val", 2)):
        lines = []
        for index in range(count):
            path = tmp_path / "pictures" / f"{split} {index}.png"  # a space in the name
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(path)
            lines.append(f"pictures/{split} {index}.png {index % 2}")
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    train, test = load("image_folder", 2, root=tmp_path, split_file=str(tmp_path / "{split}.txt"))
    assert len(train) == 4 and len(test) == 2 and train.targets == [0, 1, 0, 1]
    image, label = test[1]
    assert image.size == (8, 8) and label == 1

    (tmp_path / "val.txt").write_text("pictures/val 0.png zero\n")
    with pytest.raises(DataError, match=r"val.txt:1: expected '<path> <integer label>'"):
        load("image_folder", 2, root=tmp_path, split_file=str(tmp_path / "{split}.txt"))
    (tmp_path / "val.txt").write_text("pictures/gone.png 0\n")
    with pytest.raises(DataError, match="1 images listed in .*val.txt do not exist"):
        load("image_folder", 2, root=tmp_path, split_file=str(tmp_path / "{split}.txt"))


def test_a_source_option_for_another_source_is_refused():
    """Outside Hydra too (a config refuses it at composition: tests/test_dataset_sources.py)."""
    with pytest.raises(
        ConfigError,
        match="dataset.split_file does not apply to dataset 'digits'; it is an option of "
        "image_folder / imagenet",
    ):
        Source("digits", {"split_file": "x/{split}.txt"})
    with pytest.raises(ConfigError, match="dataset=image_folder needs dataset.root"):
        Source("image_folder")


def test_every_source_option_is_reachable():
    """``test_fraction`` reaches digits (1,797 images, default 0.3); ``per_class`` and
    ``image_size`` reach synthetic."""
    _, default = load("digits", 10)
    _, half = load("digits", 10, test_fraction=0.5)
    assert (len(default), len(half)) == (540, 899)
    with pytest.raises(ConfigError, match="it is an option of digits"):
        load("synthetic", 4, test_fraction=0.5)
    train, test = load("synthetic", 4, per_class=[3, 2], image_size=8)
    assert (len(train), len(test)) == (12, 8) and train[0][0].size == (8, 8)


def split_files(root, labels: dict[str, list[int]]) -> str:
    """``root/{split}.txt`` listing one small PNG per label of ``labels[split]``."""
    for split, split_labels in labels.items():
        lines = []
        for index, label in enumerate(split_labels):
            path = root / "pictures" / f"{split}-{index}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), (label * 60, index, 0)).save(path)
            lines.append(f"pictures/{path.name} {label}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return str(root / "{split}.txt")


def listed_data(root, split_file, num_classes):
    return datamodule(
        name="image_folder",
        root=str(root),
        split_file=split_file,
        num_classes=num_classes,
        heldout_fraction=0,
    )


def test_classes_without_a_training_image_are_refused_naming_them(tmp_path):
    split_file = split_files(tmp_path, {"train": [0, 1, 2, 0, 1, 2], "val": [0, 1, 2]})
    with pytest.raises(
        DataError,
        match=r"read as 10 classes, but its train split has no image of class\(es\) 3, 4, 5, 6, "
        r"7, 8, 9 \(7 of 10\).*set dataset.num_classes=3, or null",
    ):
        listed_data(tmp_path, split_file, 10).setup()
    inferred = listed_data(tmp_path, split_file, None)  # null: the labels' count
    inferred.setup()
    assert inferred.num_classes == 3

    with pytest.raises(DataError, match=r"class\(es\) 10, 11, .* 19 \(10 of 20\).*num_classes=10"):
        datamodule(name="digits", num_classes=20).setup()


@pytest.mark.parametrize(
    "labels", [{"train": [0, 2, 0, 2], "val": [0, 2]}, {"train": [0, 1, 0, 1], "val": [1, 2]}]
)
def test_gaps_and_test_only_classes_are_refused_with_the_fix(tmp_path, labels):
    """A gap in the labels, or a class of the test split alone: no smaller num_classes fits."""
    missing = ({0, 1, 2} - set(labels["train"])).pop()
    with pytest.raises(
        DataError,
        match=rf"no image of class\(es\) {missing} \(1 of 3\).*add training images of them in "
        r"dataset.split_file, or remove their labels and number the classes 0..1",
    ):
        listed_data(tmp_path, split_files(tmp_path, labels), None).setup()


def rare_class(num_classes, seed):
    """60 + 60 images of classes 0 and 1, two of class 2."""
    labels = np.array([0] * 60 + [1] * 60 + [2] * 2)
    images = np.full((len(labels), 8, 8), 128, dtype=np.uint8)
    return ArrayImages(images, labels), ArrayImages(images, labels)


@pytest.mark.parametrize(
    "options", [dict(train_size=10, heldout_fraction=0), dict(heldout_fraction=0.9)]
)
def test_a_class_left_without_training_images_by_subsampling_is_refused(monkeypatch, options):
    monkeypatch.setitem(sources.SOURCES, "rare", rare_class)
    data = datamodule(name="rare", num_classes=3, **options)
    with pytest.raises(DataError, match=r"leave class\(es\) 2 of dataset 'rare' without a train"):
        data.setup()


def test_a_train_size_below_the_class_count_names_the_key():
    with pytest.raises(DataError, match=r"Cannot draw dataset.train_size=3 of 200 images .*4"):
        datamodule(train_size=3).setup()
    with pytest.raises(DataError, match=r"train_size=201 asks for more than the 200 images"):
        datamodule(train_size=201).setup()


@pytest.mark.parametrize("batch_size", [16, 100, 10_000])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_trains_its_share_as_train_epoch_counts(batch_size, world_size):
    """What the learning rate is scaled by (``train_epoch``) is what the loaders yield, and a
    rank whose share is smaller than a batch trains on it rather than on nothing."""
    data = datamodule(batch_size=batch_size, heldout_fraction=0.25)  # 150 training images
    data.setup()
    loaders = [data.train_loader(world_size, rank) for rank in range(world_size)]
    batches = [list(loader.batch_sampler) for loader in loaders]
    images = sum(len(batch) for rank_batches in batches for batch in rank_batches)
    assert {len(rank_batches) for rank_batches in batches} == {data.train_epoch(world_size)[0]}
    assert images == data.train_epoch(world_size)[1] > 0
    if batch_size >= 150:
        assert images == 150 + (-150 % world_size)  # all of them, shares padded alike


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({}, "Dataset 'synthetic': 150 train, 50 held-out, 80 test images of 4 classes"),
        (
            dict(shots=10, subset_seed=7),
            "Dataset 'synthetic': 32 train, 8 held-out, 80 test images of 4 classes; low-shot: "
            "10 images of each class (train and held-out together), subset seed 7",
        ),
        (
            dict(fraction=0.2),
            "; low-shot: a fraction 0.2 of each class (train and held-out together), subset seed 0",
        ),
    ],
)
def test_setup_says_once_how_many_images_each_split_holds(caplog, options, said):
    """Every task reads its images through ``setup``: one line gives the counts."""
    data = datamodule(heldout_fraction=0.25, **options)
    with caplog.at_level("INFO", logger="mim_agg.data.datamodule"):
        data.setup()
        data.setup()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dataset")]
    assert said in line
