"""dataset.decode=gpu on the CPU device: loader workers read files and draw the random crops,
``finish_images`` decodes (``decode_jpeg``) and transforms whole batches where the backbone
runs. Its eval batch is the documented computation, its training crops are pil's, files the
device decoder cannot take go to Pillow or are named, and real runs record the decoder (a
source without files is refused by name: ``tests/test_decode.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as TF
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from mim_agg.cache.extract import Views
from mim_agg.data import ProbeDataModule
from mim_agg.data.decode import ImageFile
from mim_agg.data.device_decode import PendingBatch, collate, finish_images
from mim_agg.data.sources import UnreadableImage, load_image
from mim_agg.data.transforms import build_transform
from tests.helpers import FAST, compose_config
from tests.test_decode import photo, save_jpeg

MEAN, STD = [0.5] * 3, [0.25] * 3
SIZE, RESIZE = 32, 36  # img_size 32 at crop_pct 0.875: Resize(36) + CenterCrop(32)
# Against pil, in 8-bit levels: Pillow rounds to 8 bits after each of its two resize passes,
# the tensor resize neither (measured here: 0.3 on average, under 3 at most on these images).
PIL_MEAN_LEVELS, PIL_MAX_LEVELS = 0.6, 5.0
# (width, height, Pillow's save options): odd sizes, portrait, 4:4:4, progressive, grayscale.
FILES = [(61, 47, {}), (40, 64, {"subsampling": 0}), (50, 50, {"progressive": True}), (45, 70, {})]


def image_folder(root: Path, per_class: int = 4) -> Path:
    """Two classes of JPEGs of the ``FILES`` kinds (the last class's last file grayscale), the
    same files in train/ and val/."""
    for split in ("train", "val"):
        for label in range(2):
            for k in range(per_class):
                width, height, options = FILES[k % len(FILES)]
                pixels = photo(width, height, seed=10 * label + k)
                if label == 1 and k == per_class - 1:
                    pixels = pixels[..., 0]
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                save_jpeg(folder / f"{k}.jpg", pixels, **options)
    return root


def module(root: Path, decode: str, batch_size: int = 4) -> ProbeDataModule:
    dataset = {"name": "image_folder", "root": str(root), "num_classes": 2, "decode": decode}
    dataset.update(num_workers=0, heldout_fraction=0.0)
    data = ProbeDataModule.from_config(
        dataset, img_size=SIZE, mean=MEAN, std=STD, batch_size=batch_size
    )
    data.setup()
    return data


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(finish_images(images, "cpu"), labels) for images, labels in loader]


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() * STD[0] * 255


def documented_eval(path: str) -> torch.Tensor:
    """The eval transform as README states it, on torchvision's decoding: the shorter side
    resized to 36 (bicubic, antialiased, float), the centre 32 x 32, values clamped to
    [0, 255], then (x / 255 - mean) / std."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    image = decode_jpeg(data, mode=ImageReadMode.RGB).float()[None]
    height, width = image.shape[-2:]
    longer = int(RESIZE * max(height, width) / min(height, width))
    shape = (RESIZE, longer) if height <= width else (longer, RESIZE)
    image = TF.interpolate(image, size=shape, mode="bicubic", antialias=True, align_corners=False)
    top, left = round((shape[0] - SIZE) / 2), round((shape[1] - SIZE) / 2)
    crop = image[0, :, top : top + SIZE, left : left + SIZE].clamp(0, 255) / 255
    return (crop - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("jpegs"))


def test_the_eval_batch_is_decode_jpeg_and_the_documented_steps(folder):
    """The test loader's batches: workers hand over file bytes; finished, every image is the
    documented computation (1e-4 of a level) and within a fraction of a level of pil's."""
    gpu, pil = module(folder, "gpu"), module(folder, "pil")
    raw = next(iter(gpu.test_dataloader()))[0]
    assert isinstance(raw, PendingBatch) and isinstance(raw.items[0].data, bytearray)
    files = [path for path, _ in gpu.splits["test"].base.samples]
    finished = torch.cat([images for images, _ in batches(gpu.test_dataloader())])
    expected = torch.stack([documented_eval(path) for path in files])
    assert finished.shape == (8, 3, SIZE, SIZE)
    assert levels(finished, expected).max() < 1e-4
    reference = torch.cat([images for images, _ in batches(pil.test_dataloader())])
    assert levels(finished, reference).mean() < PIL_MEAN_LEVELS
    assert levels(finished, reference).max() < PIL_MAX_LEVELS


def test_training_batches_and_cached_views_draw_pils_crops(folder):
    """The random-resized crop and flip are drawn in the worker under the sample's random
    state, with the timm steps pil's transform uses: the same crops, a fraction of a level
    apart, in the training loader and in an extraction's views; another epoch's crops (what
    a drifted random stream would give) are tens of levels away."""
    gpu, pil = module(folder, "gpu"), module(folder, "pil")
    pairs = zip(batches(gpu.train_loader()), batches(pil.train_loader()), strict=True)
    for (ours, labels), (theirs, their_labels) in pairs:
        assert torch.equal(labels, their_labels)
        assert levels(ours, theirs).mean() < PIL_MEAN_LEVELS
    other_epoch = batches(pil.train_loader(epoch=1))[-1][0]
    assert levels(ours, other_epoch).mean() > 10 * PIL_MEAN_LEVELS

    def views(data: ProbeDataModule) -> torch.Tensor:
        loader = DataLoader(Views(data.splits["train"], 2, True), batch_size=8, collate_fn=collate)
        return torch.cat([images for images, _ in batches(loader)])

    ours, theirs = views(gpu), views(pil)
    assert ours.shape == theirs.shape == (8, 2, 3, SIZE, SIZE)
    assert levels(ours, theirs).mean() < PIL_MEAN_LEVELS


def test_files_the_device_decoder_cannot_take_go_to_pillow_or_are_named(tmp_path):
    """A PNG under a .JPEG name and a CMYK JPEG: Pillow's pixels, from the worker; a file that
    is no image, or a JPEG whose header reads but whose data is cut short (the device decoder
    refuses it in the batch, then alone): named as under pil."""
    png = tmp_path / "a.JPEG"
    Image.fromarray(photo(40, 30)).save(png, "PNG")
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo(40, 30)).convert("CMYK").save(cmyk, "JPEG")
    good = save_jpeg(tmp_path / "good.jpg", photo(40, 30))
    truncated = tmp_path / "truncated.jpg"
    data = Path(good).read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 4])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    read = build_transform(False, SIZE, MEAN, STD, decode="gpu").transforms[0]  # ReadForDevice
    items = [read(ImageFile(str(path))) for path in (png, cmyk, good)]
    for item, path in zip(items[:2], (png, cmyk), strict=True):
        assert np.array_equal(item.data, np.asarray(load_image(str(path))))
    finished = finish_images(collate([(item, 0) for item in items])[0], "cpu")
    assert levels(finished[2], documented_eval(good)).max() < 1e-4
    with pytest.raises(UnreadableImage, match="broken.jpg.*dataset.verify=true"):
        read(ImageFile(str(broken)))
    pending = collate([(read(ImageFile(path)), 0) for path in (good, str(truncated))])[0]
    with pytest.raises(UnreadableImage, match="truncated.jpg.*dataset.verify=true"):
        finish_images(pending, "cpu")


@pytest.mark.slow  # trains for seconds
def test_a_resumed_fit_under_gpu_trains_the_uninterrupted_batches(folder, tmp_path):
    """Crashed mid-epoch right after a checkpoint and resumed: the batches (labels and
    pixels, crops included) of a fit never interrupted."""
    from tests.test_loader_state import CheckpointThenCrash, crashed, fit, resumed

    uninterrupted = fit(module(folder, "gpu"))
    assert len(uninterrupted) == 3 * 2  # EPOCHS x 2 batches
    stop = CheckpointThenCrash("batch", 3, tmp_path / "last.ckpt")
    before = crashed(module(folder, "gpu"), stop)
    after, _ = resumed(module(folder, "gpu"), stop.path)
    assert before + after == uninterrupted


def run_overrides(folder: Path) -> list[str]:
    overrides = [*FAST, "dataset=image_folder", f"dataset.root={folder}", "aggregator=mean"]
    return [*overrides, "dataset.heldout_fraction=0", "dataset.num_workers=0", "logger=csv"]


@pytest.mark.slow  # trains for seconds
def test_a_probe_run_under_gpu_trains_and_is_named_by_it(folder, tmp_path):
    """A real run through the CLI's task runner: Lightning's loops get their batches finished
    in the data module's ``on_after_batch_transfer``; the run's name carries the decoder."""
    from mim_agg.runs.identity import result_config
    from mim_agg.runs.runner import run_task

    overrides = [*run_overrides(folder), "probe.epochs=1", "probe.warmup_epochs=0"]
    probe = compose_config([*overrides, "dataset.decode=gpu"], tmp_path)
    assert result_config(probe)["dataset"]["decode"] == "gpu"
    result = run_task(probe)
    assert result["winner"] == "mean" and 0 <= result["heads"]["mean"]["test/acc1"] <= 1


@pytest.mark.slow  # extracts for seconds
def test_an_extraction_under_gpu_is_named_by_it_and_stores_pils_features_nearly(folder, tmp_path):
    """The extraction finishes its batches in its own loop: the cache's key carries the
    decoder, and its features are a pil extraction's up to the pixel difference."""
    from mim_agg.cache import TokenCache
    from mim_agg.runs.runner import run_task
    from tests.helpers import cached_features

    caches = {}
    for decode in ("gpu", "pil"):
        overrides = [*run_overrides(folder), "task=extract", "dataset.augment=false"]
        done = run_task(compose_config([*overrides, f"dataset.decode={decode}"], tmp_path / decode))
        caches[decode] = TokenCache(done["cache_dir"])
    assert caches["gpu"].manifest["identity"]["decode"] == "gpu"
    assert "decode" not in caches["pil"].manifest["identity"]
    for split in ("train", "test"):
        (ours, labels), (theirs, their_labels) = (
            cached_features(caches[d], split, "mean()") for d in ("gpu", "pil")
        )
        assert np.array_equal(labels, their_labels) and len(labels) == 8
        cosine = TF.cosine_similarity(torch.from_numpy(ours), torch.from_numpy(theirs))
        assert cosine.min() > 0.999
