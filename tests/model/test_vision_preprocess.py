"""Image loading and preprocessing against transformers' PIL Qwen2-VL image processor (the oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageFile
from vision_helpers import PREPROCESSOR, make_image, reference_image_processor

from qwen35_lite.errors import ConfigError, InputError
from qwen35_lite.model.vision import ImageProcessorConfig, load_image, preprocess, smart_resize

MIN_PIXELS, MAX_PIXELS = 64 * 64, 192 * 192  # small bounds keep every case a few dozen patches


@pytest.fixture(scope="module")
def proc_dir(module_tmp):
    d = module_tmp("proc")
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return d


@pytest.fixture(scope="module")
def reference(proc_dir):
    return reference_image_processor(proc_dir)


@pytest.fixture(scope="module")
def ours(proc_dir):
    return ImageProcessorConfig.from_dir(proc_dir)


def check_same(images, ours, reference, ref_images=None):
    pv, grid = preprocess(images, ours)
    ref = reference(ref_images or images, return_tensors="pt")
    assert pv.dtype == torch.float32 and grid.dtype == torch.long
    assert torch.equal(grid, ref["image_grid_thw"])
    assert pv.shape == ref["pixel_values"].shape
    assert (pv - ref["pixel_values"]).abs().max() <= 1e-6


def test_config_from_dir(ours):
    assert (ours.min_pixels, ours.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
    assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (16, 2, 2)


@pytest.mark.parametrize(
    "width,height",
    [
        (20, 30),  # below min_pixels: scaled up
        (1000, 700),  # above max_pixels: scaled down
        (97, 133),  # odd sizes
        (128, 96),  # already a multiple of 32
        (640, 48),  # wide
        (41, 333),  # tall
        (3, 500),  # extreme aspect ratio below the limit
    ],
)
def test_sizes_match_reference(width, height, ours, reference):
    check_same([make_image(width, height, seed=width)], ours, reference)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "1", "CMYK", "I;16"])
def test_modes_match_reference(mode, ours, reference):
    image = make_image(150, 110, mode="RGBA" if mode == "LA" else mode, seed=3)
    if mode == "LA":
        image = image.convert("LA")
    check_same([image], ours, reference)


def test_palette_with_transparency_from_file(tmp_path, ours, reference):
    image = make_image(90, 70, mode="P", seed=4)
    image.info["transparency"] = 5  # palette index 5 is transparent: composited onto white
    path = tmp_path / "t.png"
    image.save(path, transparency=5)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    with Image.open(path) as raw:
        check_same([loaded], ours, reference, ref_images=[raw.copy()])


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "gif", "bmp"])
def test_files_match_reference(tmp_path, ext, ours, reference):
    image = make_image(123, 77, mode="RGBA" if ext in ("png", "webp") else "RGB", seed=5)
    path = tmp_path / f"x.{ext}"
    image.save(path)
    with Image.open(path) as raw:
        check_same([load_image(path)], ours, reference, ref_images=[raw.copy()])


def test_batch_of_images(ours, reference):
    images = [make_image(300, 200, seed=1), make_image(40, 90, mode="RGBA", seed=2), make_image(64, 64)]
    check_same(images, ours, reference)


def test_config_variants(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    d = {**PREPROCESSOR, "min_pixels": 32 * 32, "max_pixels": 96 * 96, "image_mean": [0.4, 0.5, 0.6]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    cfg, ref = ImageProcessorConfig.from_dir(tmp_path), Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
    check_same([make_image(500, 300)], cfg, ref)
    assert ImageProcessorConfig.from_dir(tmp_path / "nowhere") == ImageProcessorConfig()
    assert ImageProcessorConfig().min_pixels == 256 * 256 and ImageProcessorConfig().max_pixels == 4096 * 4096
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError):
        ImageProcessorConfig.from_dir(tmp_path)


def test_smart_resize_matches_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref_resize

    for h in (1, 7, 31, 32, 33, 48, 100, 257, 1000, 4099):
        for w in (5, 16, 47, 64, 301, 999, 2048):
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(InputError):
                    smart_resize(h, w, 32, MIN_PIXELS, MAX_PIXELS)
                continue
            assert smart_resize(h, w, 32, MIN_PIXELS, MAX_PIXELS) == ref_resize(
                h, w, 32, MIN_PIXELS, MAX_PIXELS
            )


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(InputError, match="not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize("content", [b"hello, this is text\n", b""])
def test_not_an_image(tmp_path, content):
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="not an image"):
        load_image(path)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated(tmp_path, ext, monkeypatch):
    path = tmp_path / f"cut.{ext}"
    make_image(200, 150).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # must not hide the truncation
    with pytest.raises(InputError, match="truncated or corrupt") as e:
        load_image(path)
    assert e.value.hint
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global flag is restored
