"""Video frames -> patches and prompt tokens, numerically identical to transformers' Qwen3-VL video processor.

What `Qwen3VLVideoProcessor` and `Qwen3VLProcessor` (transformers 5.23) do for Qwen3.5, from decoded RGB
frames and the clip's metadata (frame count, frame rate):

- sample `int(total / clip_fps * fps)` frames, clamped to [min_frames, min(max_frames, total)], at
  `linspace(0, total - 1, n).round()` (`sample_indices`);
- resize every frame to one size chosen for the whole clip (`video_smart_resize`: the pixel budget is
  shared by the frames), bicubic with antialias on torch tensors as torchvision does (`resize_frame`),
  not through PIL as images are, so values differ slightly from the image path;
- rescale and normalise fused ((x - mean*255) / (std*255) in fp32), pad the frame count to a multiple of
  temporal_patch_size with the last frame, and cut patches in the image layout (`patchify`);
- in the prompt, the template's one `<|video_pad|>` becomes, per temporal group, `<t seconds>` +
  `<|vision_start|>` + `<|video_pad|>` x tokens per group + `<|vision_end|>` (`video_placeholder_ids`),
  t the mean time of the group's first and last frame.

The decoding itself (PyAV) is runtime/video.py's; nothing here reads a file but the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InputError
from .preprocess import read_processor_config

CONFIG_FILES = (  # transformers' order: the nested processor config, the video one, then the image one
    ("processor_config.json", "video_processor"),
    ("video_preprocessor_config.json", None),
    ("preprocessor_config.json", None),
)


@dataclass
class VideoProcessorConfig:
    """What the checkpoint's video processor config says; defaults are Qwen3VLVideoProcessor's."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 32 * 32  # size.shortest_edge: pixels of the whole clip, all frames together
    max_pixels: int = 32 * 32 * 768  # size.longest_edge
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    cap_pixels_per_frame: bool = False  # transformers 5.23's default (None: uncapped, with a warning)
    max_video_tokens: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoProcessorConfig:
        kw: dict[str, Any] = {}
        for key in ("min_frames", "max_frames", "patch_size", "temporal_patch_size", "merge_size"):
            if d.get(key) is not None:
                kw[key] = int(d[key])
        for key in ("fps", "rescale_factor"):
            if d.get(key) is not None:
                kw[key] = float(d[key])
        if d.get("max_video_tokens") is not None:
            kw["max_video_tokens"] = int(d["max_video_tokens"])
        if d.get("cap_pixels_per_frame") is not None:
            kw["cap_pixels_per_frame"] = bool(d["cap_pixels_per_frame"])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                v = d[key]
                kw[key] = tuple(float(x) for x in (v if isinstance(v, list) else [v] * 3))
        size = d.get("size") if isinstance(d.get("size"), dict) else {}
        if size.get("shortest_edge") is not None:
            kw["min_pixels"] = int(size["shortest_edge"])
        if size.get("longest_edge") is not None:
            kw["max_pixels"] = int(size["longest_edge"])
        return cls(**kw)

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> VideoProcessorConfig:
        """The first of processor_config.json's `video_processor`, video_preprocessor_config.json and
        preprocessor_config.json that the checkpoint has (transformers' own order: a checkpoint without a
        video config gets its image config's values); the class defaults when it has none."""
        return read_processor_config(Path(model_dir), CONFIG_FILES, cls.from_dict) or cls()


def sample_count(total: int, clip_fps: float | None, fps: float, cfg: VideoProcessorConfig) -> int:
    """How many frames Qwen3VLVideoProcessor.sample_frames takes from a clip of `total` frames."""
    n = int(total / (clip_fps or 24) * fps)  # it assumes 24 fps when the clip says none
    return min(max(n, cfg.min_frames), cfg.max_frames, total)


def sample_indices(total: int, clip_fps: float | None, fps: float, cfg: VideoProcessorConfig) -> list[int]:
    """The frame indices sampled, in order (np.linspace(...).round(): half to even, as numpy rounds)."""
    n = sample_count(total, clip_fps, fps, cfg)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def video_smart_resize(
    num_frames: int, height: int, width: int, cfg: VideoProcessorConfig
) -> tuple[int, int]:
    """(height, width) every frame is resized to: multiples of factor, the clip's pixels in the bounds."""
    factor, t_factor = cfg.factor, cfg.temporal_patch_size
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        frame_cap = cfg.max_video_tokens * factor * factor
        per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    if num_frames < t_factor:
        raise InputError(
            f"a clip needs at least {t_factor} frames, this one gives {num_frames}",
            "use a longer clip (or a checkpoint whose min_frames is at least 2)",
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"the video's aspect ratio {max(height, width) / min(height, width):.0f}:1 is over 200:1",
            "crop the video to a less extreme shape",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / t_factor) * t_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _native_uint8(cpu: bool) -> bool:
    """torchvision's choice: bicubic resizes uint8 directly on a CPU (its own AVX kernels), else in fp32."""
    return cpu


def resize_frame(frame: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One RGB frame [H, W, 3] uint8 -> [3, h, w] uint8, as torchvision.transforms.v2.functional.resize
    (bicubic, antialias) resizes each frame of transformers' [T, 3, H, W] batch."""
    x = torch.as_tensor(frame).permute(2, 0, 1).contiguous()  # [3, H, W], as transformers lays frames out
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # torchvision returns the input untouched when the size is already right
    x = x[None]
    native = _native_uint8(x.device.type == "cpu")
    y = F.interpolate(
        x if native else x.float(), size=list(size), mode="bicubic", align_corners=False, antialias=True
    )
    if not native:
        y = y.clamp_(0, 255).round_().to(torch.uint8)
    return y[0]


def normalise(frames: torch.Tensor, cfg: VideoProcessorConfig) -> torch.Tensor:
    """uint8 [T, 3, h, w] -> float32, rescale and normalise fused as transformers does it: mean and std
    scaled by 1 / rescale_factor in fp32, then (x - mean) / std."""
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    return frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def patchify(frames: torch.Tensor, cfg: VideoProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """float32 [T, 3, h, w] -> (patches [t*gh*gw, 3*T'*P*P], grid (t, gh, gw)): the frame count padded to a
    multiple of temporal_patch_size with the last frame, patches merge block by merge block."""
    n, c, height, width = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pad := -n % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        n += pad
    gt, gh, gw = n // tp, height // p, width // p
    x = frames.view(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, bh, bw, mh, mw, C, T', P, P]
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def group_timestamps(indices: Sequence[int], clip_fps: float | None, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal group: the mean of its first and last frame's index / clip fps (the last
    index repeated to fill the last group, as the padding repeats the last frame)."""
    idx = list(indices)
    fps = clip_fps or 24
    if pad := -len(idx) % temporal_patch_size:
        idx.extend([idx[-1]] * pad)
    times = [i / fps for i in idx]
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)
    ]


def video_placeholder_ids(
    grid: tuple[int, int, int],
    timestamps: Sequence[float],
    merge: int,
    encode: Callable[[str], list[int]],
    video_token_id: int,
    vision_start_id: int,
    vision_end_id: int,
) -> list[int]:
    """The ids that replace one video's `<|video_pad|>`: per temporal group `<t seconds>` tokenised alone
    (the processor's text is split at the special tokens around it), then start, pads, end."""
    t, h, w = grid
    per_group = (h // merge) * (w // merge)
    out: list[int] = []
    for g in range(t):
        out.extend(encode(f"<{timestamps[g]:.1f} seconds>"))
        out.append(vision_start_id)
        out.extend([video_token_id] * per_group)
        out.append(vision_end_id)
    return out


def expand_video_placeholders(
    ids: Sequence[int], replacements: Sequence[list[int]], video_token_id: int
) -> list[int]:
    """Replace the i-th single `<|video_pad|>` of the rendered prompt by replacements[i]."""
    ids = list(ids)
    n_pads = ids.count(video_token_id)
    if n_pads != len(replacements):
        raise InputError(
            f"the prompt has {n_pads} video placeholder(s) but {len(replacements)} video(s) were given",
            "give one video per <|video_pad|> (the chat template writes one per video part)",
        )
    out: list[int] = []
    it = iter(replacements)
    for tok in ids:
        out.extend(next(it) if tok == video_token_id else [tok])
    return out
