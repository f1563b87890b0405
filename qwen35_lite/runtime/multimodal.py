"""A prompt with images and videos → what the generator feeds: expanded ids, embeddings with the vision
rows, 3-D positions.

The chat template writes one `<|vision_start|><|image_pad|><|vision_end|>` per image. Here each image is
loaded and preprocessed, its `<|image_pad|>` is expanded to the image's token count, the vision tower's
rows replace those tokens' embeddings, and the M-RoPE positions are computed for this prompt alone and
shifted by what the cache already holds (`offset + rope_delta`), which is what recomputing them over the
whole conversation gives (vision/positions.py). The returned `rope_delta` is added to the cache's once the
prompt is fed (generate.prefill), so later tokens take the right positions.

A video part renders as `<|vision_start|><|video_pad|><|vision_end|>`; its clip is decoded and sampled
(runtime/video.py), and its `<|video_pad|>` becomes, per temporal group of frames, a `<t seconds>`
timestamp and a block of video tokens (vision/video.py), as transformers' Qwen3-VL processor writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import InputError
from ..model.cache import ModelCache
from ..model.vision import (
    expand_image_placeholders,
    load_image,
    mrope_positions,
    preprocess,
    scatter_image_features,
)
from ..model.vision.preprocess import ImageProcessorConfig, held_nbytes
from ..model.vision.video import VideoProcessorConfig, expand_video_placeholders, video_placeholder_ids
from ..plan.memory import images_nbytes
from .engine import Engine
from .generate import context_hint
from .video import Video, VideoInput, load_video, plan_video, video_nbytes


@dataclass
class ImagePrompt:
    ids: list[int]  # the prompt with every <|image_pad|> / <|video_pad|> expanded
    embeds: torch.Tensor  # [T, D] on the model's device and dtype, image and video rows scattered in
    positions: torch.Tensor  # [3, T] absolute M-RoPE positions (already shifted by the cache)
    rope_delta: int  # add to cache.rope_delta after the prompt is fed
    video_frames: int = 0  # frames sampled from the videos
    video_tokens: int = 0


Media = Path | str | Video  # a prompt's media in order: image paths and Video parts


def split_media(media: Sequence[Media]) -> tuple[list[Path | str], list[Video]]:
    """(image paths, videos), each in prompt order."""
    return [m for m in media if not isinstance(m, Video)], [m for m in media if isinstance(m, Video)]


def load_images(
    paths: Sequence[Path | str], cfg: ImageProcessorConfig | None = None, room: int | None = None
) -> list[Image.Image]:
    """Open and fully decode every image (RGB); a missing, non-image or truncated file is an InputError.

    room: bytes the memory budget leaves for the images (image_room); an image whose decoding and
    preprocessing would not fit what the ones before it leave is refused from its header, undecoded."""
    images = []
    for p in paths:
        images.append(load_image(Path(p).expanduser(), cfg, room))
        if room is not None:
            room -= held_nbytes(images[-1], cfg or ImageProcessorConfig())
    return images


def check_images(paths: Sequence[Path | str]) -> None:
    """The header checks of load_images alone (the file exists, is an image we read, within the pixel
    limit): before a load, when the budget is not yet known, nothing is decoded."""
    for p in paths:
        load_image(Path(p).expanduser(), decode=False)


def check_videos(videos: Sequence[Video], model_dir: Path | str | None = None) -> None:
    """The metadata checks of a clip (a video stream we read, its size, its length), nothing decoded:
    before a load, so a wrong file fails before the model is read."""
    vcfg = VideoProcessorConfig.from_dir(model_dir) if model_dir is not None else VideoProcessorConfig()
    for v in videos:
        plan_video(v, vcfg)


def image_room(engine: Engine) -> int | None:
    """Bytes the memory plan leaves for decoding and preprocessing images as it stands: what it reserved
    for `run --image`'s images plus what the budget holds beyond its total (None when loaded without a
    plan). room_for_images can make more."""
    plan = engine.plan
    if plan is None:
        return None
    return plan.image_bytes + max(0, plan.cpu_budget - plan.cpu_total)


@contextmanager
def room_for_images(engine: Engine, paths: Sequence[Media]) -> Iterator[int | None]:
    """Room to decode and preprocess `paths` for the time of the block: image_room, and where that is
    short of what the images' headers say they take, expert RAM slots given back to the OS for the time
    (the expert cache shrinks, and grows back when the block ends; the evicted experts are read again when
    next wanted, so the tokens are the same). Yields the room load_images checks each image against
    (an image that still does not fit is refused from its header, undecoded); None without a plan."""
    room = image_room(engine)
    if room is None:
        yield None
        return
    images, videos = split_media(paths)
    need = images_nbytes(images, engine.model_dir) if images else 0
    if videos:
        vcfg = VideoProcessorConfig.from_dir(engine.model_dir)
        need += sum(video_nbytes(plan_video(v, vcfg)) for v in videos)
    provider, released = engine.provider, 0
    if need > room and hasattr(provider, "release_ram"):
        released = provider.release_ram(need - room)
    try:
        yield room + released
    finally:
        if released:
            provider.regrow_ram()


def image_prompt(
    engine: Engine,
    ids: Sequence[int],
    images: Sequence[Media],
    cache: ModelCache,
    on_encode: Callable[[int, int], None] | None = None,
    on_decode: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> ImagePrompt:
    """Turn rendered-and-tokenised `ids` (one `<|image_pad|>` per image, one `<|video_pad|>` per video) plus
    the media (image paths and Video parts, in prompt order) into an ImagePrompt.

    Raises InputError (bad image or video, placeholder count, too many tokens for the context) before
    anything is fed, and CheckpointError when the checkpoint has no vision tower; the cache is never
    touched. on_encode(blocks done, total blocks) reports the tower's progress, on_decode(frames decoded,
    frames to decode) a video's decoding, on_note(line) what the user should know about a clip (sampled
    down, variable frame rate, rotation).
    """
    cfg, model = engine.cfg, engine.model
    engine.check_vision()  # before decoding anything: the likeliest mistake is a text-only checkpoint
    image_paths, videos = split_media(images)
    if videos:
        _check_video_placeholders(ids, len(videos), cfg.video_token_id)
    image_cfg = engine.image_config()
    merge = cfg.vision.spatial_merge_size
    with room_for_images(engine, images) as room:  # the decoded pixels are gone when the room ends
        pixel_values, grid = preprocess(load_images(image_paths, image_cfg, room), image_cfg)
        if room is not None and image_paths:
            room -= int(pixel_values.numel() * pixel_values.element_size())
        clips = _load_videos(engine, videos, room, on_decode, on_note)
        expanded = expand_image_placeholders(list(ids), grid, cfg.image_token_id, merge)
        expanded = expand_video_placeholders(
            expanded, [_clip_ids(engine, c, merge) for c in clips], cfg.video_token_id
        )
        model_max = engine.cfg.text.max_position_embeddings
        _check_context(engine.max_context, model_max, cache, len(ids), expanded, cfg, image_cfg)
        video_grid = [c.grid for c in clips]
        positions, delta = mrope_positions(
            expanded, grid, cfg.image_token_id, merge, video_grid, cfg.video_token_id
        )
        tower = engine.vision()  # loaded on first use
        features = tower.encode(pixel_values, grid, on_encode) if image_paths else None
        del pixel_values
        video_features = None
        if clips:
            video_pv = torch.cat([c.pixel_values for c in clips])
            clips = [_drop_pixels(c) for c in clips]
            video_features = tower.encode(video_pv, torch.tensor(video_grid, dtype=torch.long), on_encode)
            del video_pv
    embeds = model.embed_ids(torch.tensor(expanded, dtype=torch.long))
    if features is not None:
        embeds = scatter_image_features(embeds, expanded, features, cfg.image_token_id)
    if video_features is not None:
        embeds = scatter_image_features(embeds, expanded, video_features, cfg.video_token_id)
    return ImagePrompt(
        expanded,
        embeds,
        positions + cache.offset + cache.rope_delta,
        delta,
        sum(c.frames for c in clips),
        sum(c.tokens for c in clips),
    )


def _check_video_placeholders(ids: Sequence[int], n_videos: int, video_token_id: int) -> None:
    n = sum(1 for i in ids if i == video_token_id)
    if n == 0:
        raise InputError(
            "the chat template does not render video parts (the prompt has no <|video_pad|>)",
            "use the checkpoint's official Qwen3.5 chat template, which writes one per video",
        )
    if n != n_videos:
        raise InputError(
            f"the prompt has {n} video placeholder(s) but {n_videos} video(s) were given",
            "do not type <|video_pad|> in the prompt; attach videos with --video",
        )


def _load_videos(
    engine: Engine,
    videos: Sequence[Video],
    room: int | None,
    on_decode: Callable[[int, int], None] | None,
    on_note: Callable[[str], None] | None,
) -> list[VideoInput]:
    """Decode and preprocess each clip in turn, each against what the ones before it leave of `room`."""
    if not videos:
        return []
    vcfg = VideoProcessorConfig.from_dir(engine.model_dir)
    clips = []
    for v in videos:
        clip = load_video(v, vcfg, room, on_decode)
        for note in clip.notes:
            if on_note:
                on_note(note)
        if room is not None:
            room -= int(clip.pixel_values.numel() * clip.pixel_values.element_size())
        clips.append(clip)
    return clips


def _clip_ids(engine: Engine, clip: VideoInput, merge: int) -> list[int]:
    cfg, tok = engine.cfg, engine.tokenizer
    return video_placeholder_ids(
        clip.grid,
        clip.timestamps,
        merge,
        tok.encode,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    )


def _drop_pixels(clip: VideoInput) -> VideoInput:
    clip.pixel_values = torch.empty(0)
    return clip


def _check_context(
    limit: int,
    model_max: int,
    cache: ModelCache,
    n_unexpanded: int,
    expanded: list[int],
    cfg,
    image_cfg: ImageProcessorConfig,
) -> None:
    """The media's tokens must fit; a text that alone is over the limit is left to generate.check_context."""
    needed = cache.offset + len(expanded)
    if cache.offset + n_unexpanded >= limit or needed < limit:
        return
    n_image, n_video = expanded.count(cfg.image_token_id), expanded.count(cfg.video_token_id)
    per_image = image_cfg.max_pixels // image_cfg.factor**2  # one token per merged factor x factor block
    if n_video:
        what = f"{n_video} of them for the video(s)" + (f", {n_image} for the image(s)" if n_image else "")
        fix = "use a shorter clip, or a lower --video-fps or --max-frames"
    else:
        what = f"{n_image} of them for the image(s)"
        fix = (
            f"use a smaller image (this checkpoint's preprocessor allows {image_cfg.max_pixels} pixels, "
            f"about {per_image} tokens, per image)"
        )
    noun = "video" if n_video else "image"
    raise InputError(
        f"{noun} too large for the context: the prompt needs {needed} tokens ({what}) but the limit is {limit}",
        context_hint(fix, cache.offset, limit, model_max),
    )
