"""A video file -> the frames the model sees: probed, planned, decoded with PyAV, preprocessed.

The container's metadata (frame count, frame rate, size) is read first, and everything is decided from it
before any frame is decoded: which frames to sample (vision/video.py, as transformers' Qwen3-VL video
processor samples), the size they are resized to, the tokens they make, and the bytes decoding and
preprocessing take (refused when the room the memory plan leaves is short). Frames are then decoded in
order up to the last one sampled; each sampled frame is converted to RGB and resized at once, so only
the small resized frames are held, never the clip at its own size.

Every bad input ends as one InputError: not a video, truncated, no frames, audio only, a frame too small
or too large, a clip too long to decode. Notes (a clip sampled down to max_frames, a variable frame rate,
rotation metadata) go to `on_note`, one line each. Nothing stays open afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if (
    TYPE_CHECKING
):  # torch and the vision code load with the first clip: session.py imports Video for every chat
    import torch

    from ..model.vision.video import VideoProcessorConfig

MAX_FRAME_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # the image limit (vision/preprocess.MAX_FRAME_PIXELS)
MIN_SIDE = 16  # one patch: a smaller stream shows the model nothing
MAX_DECODED_FRAMES = 360_000  # frames decoded to reach the last sample: 100 min at 60 fps, 4 h at 25 fps
MAX_COUNTED_PACKETS = MAX_DECODED_FRAMES  # containers that do not store a frame count are counted up to this
FORMATS = "MP4, MOV, MKV, WebM, AVI"
MiB = 1 << 20


@dataclass(frozen=True)
class Video:
    """A video part of a prompt: its file, and the sampling asked for it (None: the checkpoint's)."""

    path: str
    fps: float | None = None
    max_frames: int | None = None

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


@dataclass
class ClipInfo:
    """What the container says, before any frame is decoded."""

    path: Path
    width: int
    height: int
    frames: int
    fps: (
        float | None
    )  # the stream's average rate (None when it has none: 24 is assumed, as transformers does)
    codec: str

    @property
    def duration(self) -> float:
        return self.frames / (self.fps or 24)


@dataclass
class ClipPlan:
    """What will be decoded and how it is preprocessed: all from ClipInfo."""

    info: ClipInfo
    indices: list[int]  # frames sampled
    size: tuple[int, int]  # (height, width) each is resized to
    grid: tuple[int, int, int]  # (temporal groups, patch rows, patch columns)
    merge: int
    wanted: int  # frames the fps alone asks for (more than len(indices) when max_frames cut it)

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * (h // self.merge) * (w // self.merge)


@dataclass
class VideoInput:
    """One clip ready for the tower and the prompt."""

    pixel_values: torch.Tensor  # [t*gh*gw, 3*T*P*P] float32
    grid: tuple[int, int, int]
    timestamps: list[float]  # seconds of each temporal group
    frames: int  # frames sampled
    tokens: int
    notes: list[str] = field(default_factory=list)


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - a broken install
        raise InputError("reading videos needs PyAV (the `av` package)", "pip install av") from e
    return av


def probe(path: Path | str) -> ClipInfo:
    """The first video stream's size, frame count and rate; InputError for anything we cannot read."""
    path = Path(path).expanduser()
    _check_file(path)
    av = _av()
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            streams = container.streams.video
            if not streams:
                kinds = "audio only" if container.streams.audio else "no video stream"
                raise InputError(f"{path} has no video ({kinds})", "pass a file with a video track")
            stream = streams[0]
            frames = int(stream.frames or 0) or _count_packets(container, stream)
            rate = stream.average_rate or stream.guessed_rate
            info = ClipInfo(
                path,
                int(stream.width),
                int(stream.height),
                frames,
                float(rate) if rate else None,
                stream.name,
            )
    except av.error.FFmpegError as e:
        raise _unreadable(path, e) from None
    _check_info(info)
    return info


def _check_file(path: Path) -> None:
    if "\0" in str(path):
        raise InputError("a video path cannot hold a NUL byte", "check the path given for the video")
    if not path.exists():
        raise InputError(f"video file not found: {path}", "check the path given to --video")
    if not path.is_file():
        raise InputError(f"{path} is not a file", f"pass the path of a video file ({FORMATS})")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {path}: permission denied", "check the file's permissions")


def _unreadable(path: Path, e: Exception) -> InputError:
    av = _av()
    if isinstance(e, av.error.InvalidDataError):
        return InputError(
            f"{path} is not a video we read, or it is truncated or corrupt",
            f"pass a complete video file ({FORMATS}); re-export or re-download it",
        )
    return InputError(f"cannot read {path} as a video ({e})", "re-export the clip as MP4 (H.264)")


def _count_packets(container, stream) -> int:
    """Frames of a container that stores no count (WebM, MKV): its packets, demuxed but not decoded."""
    n = 0
    for packet in container.demux(stream):
        if packet.size:
            n += 1
            if n > MAX_COUNTED_PACKETS:
                break
    container.seek(0)
    return n


def _check_info(info: ClipInfo) -> None:
    path, w, h = info.path, info.width, info.height
    if info.frames <= 0:
        raise InputError(f"{path} has a video stream with no frames", "pass a clip with at least one frame")
    if min(w, h) < MIN_SIDE:
        raise InputError(
            f"{path} is {w}x{h}: smaller than one {MIN_SIDE}-pixel patch", "use a video at least 32x32"
        )
    if w * h > MAX_FRAME_PIXELS:
        raise InputError(
            f"{path} is {w}x{h}, {w * h / 1e6:.0f} megapixels a frame: over the"
            f" {MAX_FRAME_PIXELS / 1e6:.0f}-megapixel limit",
            "downscale it first (the model sees well under a megapixel of each frame)",
        )


def plan_clip(
    info: ClipInfo, cfg: VideoProcessorConfig, fps: float | None = None, max_frames: int | None = None
) -> ClipPlan:
    """Frames to sample (at `fps`, at most `max_frames`; the checkpoint's values when None) and their size."""
    from ..model.vision.video import sample_indices, video_smart_resize

    if max_frames is not None:
        cfg = replace(cfg, max_frames=max_frames, min_frames=min(cfg.min_frames, max_frames))
    fps = cfg.fps if fps is None else fps
    indices = sample_indices(info.frames, info.fps, fps, cfg)
    if indices[-1] >= MAX_DECODED_FRAMES:
        raise InputError(
            f"{info.path} is {_minutes(info.duration)} long: reaching its last sampled frame means decoding "
            f"{indices[-1] + 1} frames, over the limit of {MAX_DECODED_FRAMES}",
            "cut the part you want first (e.g. ffmpeg -ss START -t SECONDS -i in.mp4 -c copy part.mp4)",
        )
    n = max(len(indices), cfg.temporal_patch_size)  # a 1-frame clip is padded by repeating it
    size = video_smart_resize(n, info.height, info.width, cfg)
    t = -(-n // cfg.temporal_patch_size)
    grid = (t, size[0] // cfg.patch_size, size[1] // cfg.patch_size)
    wanted = int(info.frames / (info.fps or 24) * fps)
    return ClipPlan(info, indices, size, grid, cfg.merge_size, wanted)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.1f} s"


def video_nbytes(plan: ClipPlan) -> int:
    """Bytes to decode and preprocess the clip, from its plan (an upper estimate): the decoder's frames in
    flight (YUV at 1.5 bytes a pixel, a few of them with threads) and one RGB conversion at the clip's own
    size; then the resized uint8 frames held, their fp32 copy and the patches (another fp32 copy)."""
    w, h = plan.info.width, plan.info.height
    th, tw = plan.size
    decode = w * h * (6 * 1.5 + 3) + th * w * 3 * 4  # frames in flight, RGB, the resize's horizontal pass
    t = plan.grid[0] * 2
    held = t * 3 * th * tw
    return int(decode + held + 2 * 4 * held)


def sampling_note(plan: ClipPlan, fps: float) -> str | None:
    n = len(plan.indices)
    if plan.wanted <= n:
        return None
    every = plan.info.duration / n
    return (
        f"{plan.info.path.name} is {_minutes(plan.info.duration)} long: {n} frames sampled (--max-frames), "
        f"one every {every:.1f} s instead of {fps:g} a second"
    )


def decode(
    plan: ClipPlan, on_progress: Callable[[int, int], None] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Decode up to the last sampled frame; each sampled one converted to RGB and resized at once.
    Returns (frames uint8 [n, 3, h, w], notes). on_progress(frames decoded, frames to decode)."""
    import torch

    from ..model.vision.video import resize_frame

    av, info = _av(), plan.info
    wanted: dict[int, int] = {}
    for i in plan.indices:
        wanted[i] = wanted.get(i, 0) + 1
    last = plan.indices[-1]
    out: list[torch.Tensor] = []
    pts: list[int] = []
    rotation = 0
    i = -1
    try:
        with av.open(str(info.path), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if frame.pts is not None:
                    pts.append(frame.pts)
                if i in wanted:
                    if i == plan.indices[0]:
                        rotation = int(getattr(frame, "rotation", 0) or 0)
                    if (frame.width, frame.height) != (info.width, info.height):
                        raise InputError(
                            f"{info.path} changes size mid-stream ({info.width}x{info.height} to "
                            f"{frame.width}x{frame.height})",
                            "re-encode it at one size",
                        )
                    resized = resize_frame(frame.to_ndarray(format="rgb24"), plan.size)
                    out.extend([resized] * wanted[i])
                if on_progress and (i % 16 == 0 or i == last):
                    on_progress(i + 1, last + 1)
                if i >= last:
                    break
    except av.error.FFmpegError as e:
        if not out:
            raise _unreadable(info.path, e) from None
        raise InputError(
            f"{info.path} is truncated or corrupt: decoding stopped at frame {i + 1} of {info.frames}",
            "re-export or re-download the clip",
        ) from None
    if not out:
        raise InputError(f"{info.path} has no frames that decode", "re-export or re-download the clip")
    if len(out) < len(plan.indices):
        raise InputError(
            f"{info.path} is truncated: it says {info.frames} frames but only {i + 1} decode",
            "re-export or re-download the clip",
        )
    return torch.stack(out), _notes(info, pts, rotation)


def _notes(info: ClipInfo, pts: list[int], rotation: int) -> list[str]:
    notes = []
    steps = [b - a for a, b in zip(pts, pts[1:]) if b > a]
    if len(steps) > 2 and max(steps) > 1.5 * min(steps):
        notes.append(
            f"{info.path.name} has a variable frame rate: its timestamps are frame number / average rate "
            f"({info.fps or 24:.3g} fps), as transformers computes them"
        )
    if rotation % 360:
        notes.append(
            f"{info.path.name} asks to be shown rotated {rotation}°: the frames are used as stored, as "
            "transformers reads them (re-encode it upright for the model to see it so)"
        )
    return notes


def load_video(
    video: Video | Path | str,
    cfg: VideoProcessorConfig,
    room: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> VideoInput:
    """Probe, plan, check the room, decode and preprocess one clip."""
    from ..model.vision.video import group_timestamps, normalise, patchify

    fps = getattr(video, "fps", None)
    plan = plan_clip(probe(video), cfg, fps, getattr(video, "max_frames", None))
    check_room(plan, room)
    frames, notes = decode(plan, on_progress)
    if note := sampling_note(plan, cfg.fps if fps is None else fps):
        notes.insert(0, note)
    pixel_values, grid = patchify(normalise(frames, cfg), cfg)
    del frames
    timestamps = group_timestamps(plan.indices, plan.info.fps, cfg.temporal_patch_size)
    return VideoInput(pixel_values, grid, timestamps, len(plan.indices), plan.tokens, notes)


def check_room(plan: ClipPlan, room: int | None) -> None:
    if room is None:
        return
    need = video_nbytes(plan)
    if need > room:
        raise InputError(
            f"{plan.info.path} needs about {need / MiB:.0f} MiB to decode and preprocess "
            f"({len(plan.indices)} frames at {plan.size[1]}x{plan.size[0]}), but the memory budget leaves "
            f"{max(room, 0) / MiB:.0f} MiB for it",
            "use a shorter or smaller clip, a lower --video-fps or --max-frames, or a larger --cpu-mem",
        )


def plan_video(video: Video | Path | str, cfg: VideoProcessorConfig) -> ClipPlan:
    """The plan of a clip from its metadata alone (for checks before a load and for the room to make)."""
    return plan_clip(probe(video), cfg, getattr(video, "fps", None), getattr(video, "max_frames", None))


__all__ = [
    "ClipInfo",
    "ClipPlan",
    "Video",
    "VideoInput",
    "check_room",
    "decode",
    "load_video",
    "plan_clip",
    "plan_video",
    "probe",
    "video_nbytes",
]
