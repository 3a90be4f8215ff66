"""Real images: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``."""

import gzip
import shutil
from pathlib import Path

import pytest

from mim_agg.runs.runner import run_task as run
from tests.helpers import FAST, compose_config

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]

pytestmark = pytest.mark.data


@pytest.fixture
def fashion_root(tmp_path) -> Path:
    if not all((DEBIAN_DIR / f"{name}.gz").is_file() for name in FILES):
        pytest.skip(
            f"Fashion-MNIST files not in {DEBIAN_DIR}: apt-get install dataset-fashion-mnist"
        )
    raw = tmp_path / "FashionMNIST" / "raw"  # where torchvision looks
    raw.mkdir(parents=True)
    for name in FILES:
        with gzip.open(DEBIAN_DIR / f"{name}.gz") as source, open(raw / name, "wb") as target:
            shutil.copyfileobj(source, target)
    return tmp_path


def test_probe_on_real_fashion_mnist_beats_chance_by_far(fashion_root, tmp_path):
    overrides = [
        *FAST,
        "dataset=fashion_mnist",
        f"dataset.root={fashion_root}",
        "dataset.download=false",
        "dataset.num_workers=0",
        "dataset.train_size=3000",
        "dataset.test_size=1000",
        "aggregator=cls_mean",
        "probe.epochs=4",
        "probe.batch_size=64",
        "probe.blr=0.5",
    ]
    summary = run(compose_config(overrides, tmp_path))
    assert summary["test/acc1"] > 0.5  # 10 classes: chance is 0.1
