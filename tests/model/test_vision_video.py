"""vision/video.py pieces on their own: the config files' order, frame sampling, sizes, timestamps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwen35_lite.errors import ConfigError, InputError
from qwen35_lite.model.vision.video import (
    VideoProcessorConfig,
    group_timestamps,
    patchify,
    resize_frame,
    sample_indices,
    video_smart_resize,
)


def test_config_files_in_transformers_order(tmp_path):
    assert VideoProcessorConfig.from_dir(tmp_path) == VideoProcessorConfig()  # the class defaults
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 10, "longest_edge": 20}})
    )
    assert VideoProcessorConfig.from_dir(tmp_path).max_pixels == 20  # no video config: the image one's
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"fps": 1, "max_frames": 9}))
    cfg = VideoProcessorConfig.from_dir(tmp_path)
    assert (cfg.fps, cfg.max_frames, cfg.max_pixels) == (1.0, 9, 32 * 32 * 768)
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"min_frames": 2}}))
    assert VideoProcessorConfig.from_dir(tmp_path).min_frames == 2
    (tmp_path / "processor_config.json").write_text("{")
    with pytest.raises(ConfigError, match="malformed"):
        VideoProcessorConfig.from_dir(tmp_path)


@pytest.mark.parametrize(
    "total,rate,fps", [(20, 10, 2), (3, 25, 2), (7200, 24, 2), (100, None, 1), (301, 29.97, 0.5)]
)
def test_sampling_formula(total, rate, fps):
    cfg = VideoProcessorConfig()
    n = min(max(int(total / (rate or 24) * fps), cfg.min_frames), cfg.max_frames, total)
    assert sample_indices(total, rate, fps, cfg) == np.linspace(0, total - 1, n).round().astype(int).tolist()


def test_sizes_and_refusals():
    cfg = VideoProcessorConfig()
    h, w = video_smart_resize(16, 720, 1280, cfg)
    assert h % 32 == w % 32 == 0 and 16 * h * w <= cfg.max_pixels
    with pytest.raises(InputError, match="aspect ratio"):
        video_smart_resize(4, 32, 32 * 300, cfg)


def test_timestamps_pad_the_last_group():
    assert group_timestamps([0, 10, 20], 10.0, 2) == [0.5, 2.0]


def test_resize_keeps_a_frame_of_the_right_size_and_patchify_pads():
    frame = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    same = resize_frame(frame, (64, 96))
    assert torch.equal(same, torch.from_numpy(frame).permute(2, 0, 1))
    cfg = VideoProcessorConfig()
    patches, grid = patchify(torch.zeros(3, 3, 64, 96), cfg)
    assert grid == (2, 4, 6) and patches.shape == (2 * 4 * 6, 3 * 2 * 16 * 16)
