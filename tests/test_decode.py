"""dataset.decode: libjpeg-turbo decodes the pixels Pillow decodes (turbo), or downscales in the
IDCT for the eval resize (turbo_dct); files it cannot decode go to Pillow; the option names runs
and caches only when set."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mim_agg.data import ProbeDataModule
from mim_agg.data.decode import EncodedFiles, ImageFile, TurboDecode
from mim_agg.data.sources import UnreadableImage, load_image
from mim_agg.data.transforms import build_transform
from mim_agg.errors import ConfigError
from mim_agg.validation import check_ranges
from tests.helpers import FAST, compose_config

pytest.importorskip("simplejpeg")  # the fastjpeg extra; the dev extra installs it

MEAN, STD = [0.5] * 3, [0.25] * 3


def photo(width: int, height: int, seed: int = 0, noise: float = 12) -> np.ndarray:
    """Smooth colour fields with grain: what a JPEG encoder meets in a photograph."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float64)
    return np.clip(smooth + rng.normal(0, noise, (height, width, 1)), 0, 255).astype(np.uint8)


def save_jpeg(path, pixels: np.ndarray, **options) -> str:
    Image.fromarray(pixels).save(path, "JPEG", quality=90, **options)
    return str(path)


@pytest.mark.parametrize(
    "options",
    [{}, {"subsampling": 0}, {"progressive": True}, {"mode": "L"}],
    ids=["4:2:0", "4:4:4", "progressive", "grayscale"],
)
def test_turbo_decodes_the_pixels_pillow_decodes(tmp_path, options):
    pixels = photo(61, 47)  # odd sizes: partial MCUs at both edges
    if options.pop("mode", None) == "L":
        pixels = pixels[..., 0]
    path = save_jpeg(tmp_path / "a.jpg", pixels, **options)
    turbo = np.asarray(TurboDecode()(ImageFile(path)))
    assert np.array_equal(turbo, np.asarray(load_image(path)))


def test_turbo_dct_decodes_at_the_smallest_scale_that_still_reaches_the_resize(tmp_path):
    """libjpeg-turbo scales by n/8 (n = 1..16) and rounds sizes up; 500 x 375 for a 256 px
    resize: 3/4 gives 375 x 282 (5/8 would give 235 rows); an image already below the resize
    side is decoded whole."""
    decode = TurboDecode(min_side=256)
    assert Image.open(save_jpeg(tmp_path / "big.jpg", photo(500, 375))).size == (500, 375)
    assert decode(ImageFile(str(tmp_path / "big.jpg"))).size == (375, 282)
    small = save_jpeg(tmp_path / "small.jpg", photo(300, 200))
    assert decode(ImageFile(small)).size == (300, 200)
    tall = save_jpeg(tmp_path / "tall.jpg", photo(300, 1100))  # 7/8: 263 x 963
    assert decode(ImageFile(tall)).size == (263, 963)


def test_the_eval_transform_under_turbo_dct_stays_close_to_pillows(tmp_path):
    """The one path that changes pixels: the same 224 px crop of the same image, a few 8-bit
    levels apart on average (the scaled IDCT's filter against bicubic's; they differ most on
    fine grain, which the benchmark's figures include)."""
    path = save_jpeg(tmp_path / "a.jpg", photo(500, 375, noise=3))
    pil = build_transform(False, 224, MEAN, STD)(load_image(path))
    dct = build_transform(False, 224, MEAN, STD, decode="turbo_dct")(ImageFile(path))
    assert "TurboDecode(min_side=256)" in repr(
        build_transform(False, 224, MEAN, STD, 0.875, "turbo_dct")
    )
    levels = (pil - dct).abs() * STD[0] * 255
    assert dct.shape == pil.shape == (3, 224, 224)
    assert 0 < levels.mean() < 2.5 and levels.max() < 32


def test_the_training_crop_under_turbo_equals_pillows(tmp_path):
    """Full-size decoding for random-resized crops, in both turbo modes: the same pixels, so
    under the same random state the same crop and flip."""
    path = save_jpeg(tmp_path / "a.jpg", photo(90, 70))
    crops = []
    for decode, image in (("pil", load_image(path)), ("turbo", ImageFile(path))):
        for dct in ("", "_dct") if decode == "turbo" else ("",):
            random.seed(3), torch.manual_seed(3)
            crops.append(build_transform(True, 32, MEAN, STD, decode=decode + dct)(image))
    assert all(torch.equal(crops[0], crop) for crop in crops[1:])


def test_what_libjpeg_turbo_cannot_decode_goes_to_pillow(tmp_path):
    """A PNG under a .JPEG name and a CMYK JPEG decode as under pil; a damaged file is named
    by Pillow's message, as under pil."""
    png = tmp_path / "a.JPEG"
    Image.fromarray(photo(40, 30)).save(png, "PNG")
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo(40, 30)).convert("CMYK").save(cmyk, "JPEG")
    for path in (str(png), str(cmyk)):
        assert np.array_equal(np.asarray(TurboDecode()(ImageFile(path))), load_image(path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(UnreadableImage, match="broken.jpg.*dataset.verify=true"):
        TurboDecode()(ImageFile(str(broken)))


def make_folder(root) -> None:
    for split in ("train", "val"):
        for label in range(2):
            (root / split / str(label)).mkdir(parents=True)
            for k in range(3):
                save_jpeg(root / split / str(label) / f"{k}.jpg", photo(48, 40, 10 * label + k))


def folder_module(root, decode: str) -> ProbeDataModule:
    dataset = {"name": "image_folder", "root": str(root), "num_classes": 2, "decode": decode}
    dataset.update(num_workers=0, heldout_fraction=0.0)
    module = ProbeDataModule.from_config(dataset, img_size=32, mean=MEAN, std=STD, batch_size=4)
    module.setup()
    return module


def test_a_folder_under_turbo_loads_the_batches_pillow_loads(tmp_path):
    """Through the data module's own loaders: the training epoch (seeded crops) and the test
    split, with the files kept encoded until the transform; the same labels and indices."""
    make_folder(tmp_path)
    pil, turbo = folder_module(tmp_path, "pil"), folder_module(tmp_path, "turbo")
    assert isinstance(turbo.splits["train"].base, EncodedFiles)
    assert turbo.splits["train"].base.samples == pil.splits["train"].base.samples
    for loader in ("train_loader", "test_dataloader"):
        for (a, y), (b, z) in zip(getattr(pil, loader)(), getattr(turbo, loader)(), strict=True):
            assert torch.equal(a, b) and torch.equal(y, z)


@pytest.mark.parametrize("decode", ["turbo", "gpu"])
def test_a_source_without_files_refuses_turbo_and_gpu_by_name(decode):
    module = ProbeDataModule.from_config(
        {"name": "digits", "num_classes": 10, "num_workers": 0, "decode": decode},
        img_size=32, mean=MEAN, std=STD, batch_size=4,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=f"dataset.decode={decode} decodes image files.*'digits'"):
        module.setup()


def test_an_unknown_decoder_is_refused_by_name(tmp_path):
    cfg = compose_config([*FAST, "dataset.decode=jpeg"], tmp_path)
    with pytest.raises(ConfigError, match="dataset.decode=jpeg is invalid.*pil.*turbo_dct"):
        check_ranges(cfg)


def test_turbo_without_simplejpeg_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "simplejpeg" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install simplejpeg.*\.\[fastjpeg\]"):
        build_transform(False, 32, MEAN, STD, decode="turbo")


def test_the_decoder_names_runs_and_caches_only_when_set(tmp_path):
    """turbo and turbo_dct are other runs and caches; pil, the default the key was added with,
    is left out of both, so earlier runs and caches keep their names."""
    from mim_agg.backbones import TokenRequest
    from mim_agg.cache.identity import cache_identity
    from mim_agg.runs.identity import result_config

    configs = [compose_config([*FAST, f"dataset.decode={d}"], tmp_path) for d in ("pil", "turbo")]
    assert "decode" not in result_config(configs[0])["dataset"]
    assert result_config(configs[1])["dataset"]["decode"] == "turbo"
    identities = [cache_identity(c, TokenRequest(), {}, {}, 10) for c in configs]
    assert "decode" not in identities[0] and identities[1]["decode"] == "turbo"
    assert {k: v for k, v in identities[1].items() if k != "decode"} == identities[0]


def test_the_config_key_reaches_the_data_module(tmp_path):
    """``dataset.decode`` as composed, through the builder every task uses."""
    from mim_agg.builders import build_datamodule

    make_folder(tmp_path / "data")
    overrides = [*FAST, "dataset=image_folder", f"dataset.root={tmp_path / 'data'}"]
    overrides.append("dataset.heldout_fraction=0")
    module = build_datamodule(compose_config([*overrides, "dataset.decode=turbo_dct"], tmp_path))
    module.setup()
    assert isinstance(module.splits["test"].base, EncodedFiles)
    assert "TurboDecode(min_side=36)" in repr(module.eval_transform)  # 32 px at crop_pct 0.875
    assert "TurboDecode(min_side=None)" in repr(module.train_transform)
