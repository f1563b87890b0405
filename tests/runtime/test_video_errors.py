"""Bad and odd video inputs: each is one InputError line with a hint (or one note), nothing left open.

Clips are written here with PyAV: a text file named .mp4, a truncated MP4, an audio-only file, a 1x1
stream, a clip with rotation metadata, one with a variable frame rate, an hour-long clip."""

from __future__ import annotations

import fractions
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from qwen35_lite.errors import InputError
from qwen35_lite.model.vision.video import VideoProcessorConfig
from qwen35_lite.runtime import video as video_mod
from qwen35_lite.runtime.video import ClipInfo, Video, decode, load_video, plan_clip, probe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "video"
CFG = VideoProcessorConfig.from_dir(FIXTURES)


def write(path: Path, w: int, h: int, n: int, rate: int = 10, pts=None, rotation=None, fmt="yuv420p") -> Path:
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, fmt
        if rotation is not None:
            s.set_display_rotation(rotation)
        if pts is not None:
            s.codec_context.time_base = fractions.Fraction(1, 1000)
        for k in range(n):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), k * 7 % 255, np.uint8), format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[k], fractions.Fraction(1, 1000)
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def open_files() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def refused(path: Path | Video, match: str) -> InputError:
    before = open_files()
    with pytest.raises(InputError, match=match) as e:
        load_video(path, CFG)
    assert e.value.hint and "\n" not in e.value.message
    assert open_files() <= before  # the container is closed again
    return e.value


def test_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n")
    refused(path, "not a video we read")


def test_truncated(tmp_path):
    data = (FIXTURES / "rate10.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    refused(path, "truncated or corrupt")


def test_missing_and_directory(tmp_path):
    refused(tmp_path / "nope.mp4", "not found")
    refused(tmp_path, "is not a file")


def test_audio_only(tmp_path):
    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            out.mux(p)
    refused(path, r"has no video \(audio only\)")


def test_one_pixel_stream(tmp_path):
    refused(write(tmp_path / "dot.mp4", 1, 1, 4, fmt="yuv444p"), "1x1: smaller than one 16-pixel patch")


def test_huge_frames_and_zero_frames_refused_from_metadata():
    big = ClipInfo(Path("big.mp4"), 20000, 20000, 10, 25.0, "h264")
    with pytest.raises(InputError, match="20000x20000, 400 megapixels a frame"):
        video_mod._check_info(big)
    with pytest.raises(InputError, match="no frames"):
        video_mod._check_info(ClipInfo(Path("empty.mp4"), 64, 64, 0, 25.0, "h264"))


def test_hour_long_clip_is_sampled_down_with_a_note(tmp_path):
    path = write(tmp_path / "hour.mp4", 32, 32, 3600, rate=1)  # 1 fps: an hour in 3600 tiny frames
    v = load_video(path, CFG)
    assert v.frames == CFG.max_frames
    assert v.notes == [
        f"hour.mp4 is 60 min long: {CFG.max_frames} frames sampled (--max-frames), one every 450.0 s instead of 2 a second"
    ]


def test_clip_too_long_to_decode_refused_before_decoding(tmp_path, monkeypatch):
    path = write(tmp_path / "long.mp4", 32, 32, 40)
    monkeypatch.setattr(video_mod, "MAX_DECODED_FRAMES", 20)
    monkeypatch.setattr(video_mod, "decode", lambda *a, **k: pytest.fail("decoded"))
    refused(path, "decoding 40 frames, over the limit of 20")


def test_variable_frame_rate_and_rotation_notes(tmp_path):
    vfr = write(tmp_path / "vfr.mkv", 64, 48, 10, pts=[0, 100, 200, 300, 1000, 1100, 1200, 2500, 2600, 2700])
    assert any("variable frame rate" in n for n in load_video(vfr, CFG).notes)
    rot = write(tmp_path / "phone.mp4", 64, 48, 8, rotation=90)
    notes = load_video(rot, CFG).notes
    assert len(notes) == 1 and "rotated 90°: the frames are used as stored" in notes[0]


def test_room_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(video_mod, "decode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(InputError, match="the memory budget leaves 0 MiB for it"):
        load_video(FIXTURES / "rate10.mp4", CFG, room=0)


def test_fps_and_max_frames_per_video():
    info = probe(FIXTURES / "long.mp4")  # 96 frames at 12 fps
    assert len(plan_clip(info, CFG).indices) == 8  # max_frames of the config
    assert len(plan_clip(info, CFG, max_frames=6).indices) == 6
    assert len(plan_clip(info, CFG, fps=0.5).indices) == 4  # 8 s at 0.5 fps, min_frames 4
    v = load_video(Video(str(FIXTURES / "long.mp4"), fps=0.5), CFG)
    assert v.frames == 4 and v.grid[0] == 2


def test_decode_reports_progress():
    plan = plan_clip(probe(FIXTURES / "long.mp4"), CFG)
    seen = []
    frames, _ = decode(plan, lambda done, total: seen.append((done, total)))
    assert frames.dtype == torch.uint8 and frames.shape[0] == 8
    assert seen[-1] == (96, 96) and all(t == 96 for _, t in seen)


def test_a_template_without_video_parts_is_one_line():
    from qwen35_lite.runtime.multimodal import _check_video_placeholders

    with pytest.raises(InputError, match=r"the chat template does not render video parts") as e:
        _check_video_placeholders([1, 2, 3], 1, 248057)
    assert "official Qwen3.5 chat template" in e.value.hint
    with pytest.raises(InputError, match="2 video placeholder"):
        _check_video_placeholders([248057, 5, 248057], 1, 248057)


@pytest.mark.parametrize(
    "args, words",
    [
        (["chat", "--max-frames", "0"], "--max-frames"),
        (["run", "--video-fps", "-1", "--video", "x.mp4", "hi"], "--video-fps"),
        (["run", "--raw", "--video", "x.mp4", "hi"], "videos need the chat template"),
        (["run", "--video", "/nonexistent/clip.mp4", "hi"], "video file not found"),
    ],
)
def test_cli_video_flags_checked_before_the_load(args, words, monkeypatch):
    from typer.testing import CliRunner

    from qwen35_lite.cli import app
    from qwen35_lite.runtime.engine import Engine

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    r = CliRunner().invoke(app, [args[0], "-m", "/nonexistent-model", *args[1:]])
    assert r.exit_code != 0 and words in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ")
