"""Image loading and preprocessing, numerically identical to transformers' PIL Qwen2-VL image processor.

The pipeline is the one `Qwen2VLImageProcessorPil` (transformers 5.23) runs for Qwen3.5: composite any
transparency onto white, convert to RGB, bicubic-resize the uint8 image with PIL to a size that is a
multiple of patch * merge (`smart_resize`), rescale in float64 then cast to float32, normalise in float32,
and cut into patches laid out merge-block by merge-block (architecture notes, section 4.1).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ...errors import ConfigError, InputError

MAX_ASPECT_RATIO = 200
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # the formats we document, and the only ones opened
FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"
# Pillow's own DecompressionBombWarning threshold (a 1 GiB RGBA-sized image; ~89.5 megapixels, e.g. 9459x9459).
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


@dataclass
class ImageProcessorConfig:
    """What `preprocessor_config.json` says; defaults are the Qwen3.5 release values."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 256 * 256
    max_pixels: int = 4096 * 4096
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        kw: dict[str, Any] = {}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if key in d:
                kw[key] = int(d[key])
        if "rescale_factor" in d:
            kw["rescale_factor"] = float(d["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in d:
                v = d[key]
                kw[key] = tuple(float(x) for x in (v if isinstance(v, list) else [v] * 3))
        size = d.get("size") if isinstance(d.get("size"), dict) else {}
        # transformers lets top-level min_pixels / max_pixels override `size` (backward compatibility).
        lo = d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        hi = d.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if lo is not None:
            kw["min_pixels"] = int(lo)
        if hi is not None:
            kw["max_pixels"] = int(hi)
        return cls(**kw)

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` (or the `image_processor` part of `processor_config.json`)."""
        files = (("preprocessor_config.json", None), ("processor_config.json", "image_processor"))
        return read_processor_config(Path(model_dir), files, cls.from_dict) or cls()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion as transformers does it: transparency (alpha band or tRNS key) composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    path: Path | str, cfg: ImageProcessorConfig | None = None, room: int | None = None, decode: bool = True
) -> Image.Image:
    """Open, fully decode and convert an image file to RGB; any failure is an InputError with a hint.

    Only the formats we document are tried (Pillow would otherwise hand an EPS file, whatever its name,
    to Ghostscript), and the size in the header is checked before any pixel is decoded: against the
    pixel limit, and, given `room` (bytes the memory budget leaves for images), against what decoding
    and preprocessing it would take (image_nbytes). decode=False stops after those header checks.
    """
    path = Path(path)
    if "\0" in str(path):
        raise InputError("an image path cannot hold a NUL byte", "check the path given for the image")
    if not path.exists():
        raise InputError(f"image file not found: {path}", "check the path given to --image")
    if not path.is_file():
        raise InputError(f"{path} is not a file", f"pass the path of an image file ({FORMAT_NAMES})")
    # A global PIL flag can make truncated files decode silently padded with grey; force strict decoding.
    # Pillow's own pixel check is off while we open: it prints a raw warning, and _check_pixels says more.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            _check_pixels(path, im.width, im.height)
            if room is not None:
                transparent = "A" in im.getbands() or im.info.get("transparency") is not None
                need = image_nbytes(im.width, im.height, im.mode, transparent, cfg or ImageProcessorConfig())
                _check_room(path, need, room)
            if not decode:
                return im
            im.load()
            return to_rgb(im)
    except UnidentifiedImageError as e:
        raise InputError(
            f"{path} is not an image we read ({FORMAT_NAMES})", "convert it to PNG or JPEG first"
        ) from e
    except PermissionError as e:
        raise InputError(f"cannot read {path}: permission denied", "check the file's permissions") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise InputError(f"{path} is truncated or corrupt ({e})", "re-export or re-download the image") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(path: Path, width: int, height: int) -> None:
    """Refuse, from the header alone, an image whose decoded size would be unreasonable."""
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{path} is {width}x{height}, {width * height / 1e6:.0f} megapixels: over the"
            f" {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit for an image",
            "downscale it first (the model sees at most a few megapixels of it anyway)",
        )


def image_nbytes(width: int, height: int, mode: str, transparent: bool, cfg: ImageProcessorConfig) -> int:
    """Bytes to decode an image and preprocess it, from its header (size, mode, transparency): an upper
    estimate that adds the steps' buffers although some are freed before others are made.

    Decoded at Pillow's bytes per pixel for its mode, converted to RGB (4 bytes a pixel in Pillow; through
    two more RGBA images when there is transparency) and kept so until preprocessing ends; preprocess
    copies it to RGB once more and resizes it (a horizontal pass first: target width x source height);
    then, per target pixel: the uint8 array (3), float64 (24), three float32 arrays (12 each) and the
    patches repeated over the temporal axis, twice (2 x 24, the last one concatenated).
    """
    w, h = width, height
    th, tw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    decode = w * h * (per_pixel + 4 * (3 if transparent else 1))
    resize = w * h * 4 + tw * h * 4
    return w * h * 4 + decode + resize + th * tw * (3 + 24 + 3 * 12 + 2 * 24)


def held_nbytes(image: Image.Image, cfg: ImageProcessorConfig) -> int:
    """What of image_nbytes stays held while the next image is decoded: the RGB image and its patches."""
    w, h = image.size
    th, tw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return w * h * 4 + th * tw * 2 * 24


def _check_room(path: Path, need: int, room: int) -> None:
    if need > room:
        raise InputError(
            f"{path} needs about {need / MiB:.0f} MiB to decode and preprocess, but the memory budget "
            f"leaves {max(room, 0) / MiB:.0f} MiB for images",
            "use a smaller image, or a larger --cpu-mem",
        )


MiB = 1 << 20


def smart_resize(
    height: int, width: int, factor: int = 32, min_pixels: int = 256 * 256, max_pixels: int = 4096 * 4096
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if min(height, width) <= 0:
        raise InputError(f"image has an empty side ({width}x{height})", "use a non-empty image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is over {MAX_ASPECT_RATIO}:1",
            "crop or pad the image to a less extreme shape",
        )
    # Python's round (half to even) on purpose: it is what the reference uses.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _normalised_chw(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """Resize and normalise one RGB image -> float32 [3, h, w] with h, w multiples of cfg.factor."""
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(image.resize((w, h), resample=cfg.resample))  # [h, w, 3] uint8
    # Same operation order and precisions as the reference: rescale in float64, cast, then (x - m) / s in fp32.
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, h, w]


def _patchify(x: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    """[C, H, W] -> ([gh*gw, C*T*P*P], gh, gw), patches ordered merge block by merge block."""
    c, height, width = x.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p)  # [C, bh, mh, P, bw, mw, P]
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, mh, mw, C, P, P]
    # A still image is its own second frame: repeat every patch over the temporal axis.
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # [bh, bw, mh, mw, C, T, P, P]
    return x.reshape(gh * gw, c * t * p * p), gh, gw


def preprocess(
    images: list[Image.Image], cfg: ImageProcessorConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values float32 [sum of gh*gw, C*T*P*P], image_grid_thw int64 [n_images, 3])."""
    cfg = cfg or ImageProcessorConfig()
    patches, grids = [], []
    for image in images:
        flat, gh, gw = _patchify(_normalised_chw(to_rgb(image), cfg), cfg)
        patches.append(flat)
        grids.append([1, gh, gw])
    if not patches:
        return torch.zeros(0, 3 * cfg.temporal_patch_size * cfg.patch_size**2), torch.zeros(
            0, 3, dtype=torch.long
        )
    pixel_values = torch.from_numpy(np.concatenate(patches, axis=0))
    return pixel_values, torch.tensor(grids, dtype=torch.long)


def read_processor_config(model_dir: Path, files, from_dict):
    """from_dict of the first of `files` ((file name, key or None for the whole file)) that the checkpoint
    has and that holds the key; None when none does. A malformed one is a ConfigError naming it."""
    for name, key in files:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            d = json.loads(path.read_text())
            if key is not None:
                d = d.get(key)
                if d is None:
                    continue
            return from_dict(d)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
            raise ConfigError(
                f"{name} in {model_dir} is malformed ({e})", "re-download the checkpoint"
            ) from e
    return None
