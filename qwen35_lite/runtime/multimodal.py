"""A prompt with images → what the generator feeds: expanded ids, embeddings with the image rows, 3-D positions.

The chat template writes one `<|vision_start|><|image_pad|><|vision_end|>` per image. Here each image is
loaded and preprocessed, its `<|image_pad|>` is expanded to the image's token count, the vision tower's
rows replace those tokens' embeddings, and the M-RoPE positions are computed for this prompt alone and
shifted by what the cache already holds (`offset + rope_delta`), which is what recomputing them over the
whole conversation gives (vision/positions.py). The returned `rope_delta` is added to the cache's once the
prompt is fed (generate.prefill), so later tokens take the right positions.
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
from ..plan.memory import images_nbytes
from .engine import Engine
from .generate import context_hint


@dataclass
class ImagePrompt:
    ids: list[int]  # the prompt with every <|image_pad|> expanded to its image's token count
    embeds: torch.Tensor  # [T, D] on the model's device and dtype, image rows scattered in
    positions: torch.Tensor  # [3, T] absolute M-RoPE positions (already shifted by the cache)
    rope_delta: int  # add to cache.rope_delta after the prompt is fed


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


def image_room(engine: Engine) -> int | None:
    """Bytes the memory plan leaves for decoding and preprocessing images as it stands: what it reserved
    for `run --image`'s images plus what the budget holds beyond its total (None when loaded without a
    plan). room_for_images can make more."""
    plan = engine.plan
    if plan is None:
        return None
    return plan.image_bytes + max(0, plan.cpu_budget - plan.cpu_total)


@contextmanager
def room_for_images(engine: Engine, paths: Sequence[Path | str]) -> Iterator[int | None]:
    """Room to decode and preprocess `paths` for the time of the block: image_room, and where that is
    short of what the images' headers say they take, expert RAM slots given back to the OS for the time
    (the expert cache shrinks, and grows back when the block ends; the evicted experts are read again when
    next wanted, so the tokens are the same). Yields the room load_images checks each image against
    (an image that still does not fit is refused from its header, undecoded); None without a plan."""
    room = image_room(engine)
    if room is None:
        yield None
        return
    need = images_nbytes(paths, engine.model_dir)
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
    images: Sequence[Path | str],
    cache: ModelCache,
    on_encode: Callable[[int, int], None] | None = None,
) -> ImagePrompt:
    """Turn rendered-and-tokenised `ids` (one `<|image_pad|>` per image) plus the image files into an ImagePrompt.

    Raises InputError (bad image, placeholder count, too many tokens for the context) before anything is
    fed, and CheckpointError when the checkpoint has no vision tower; the cache is never touched.
    on_encode(blocks done, total blocks) reports the tower's progress.
    """
    cfg, model = engine.cfg, engine.model
    engine.check_vision()  # before decoding anything: the likeliest mistake is a text-only checkpoint
    image_cfg = engine.image_config()
    with room_for_images(engine, images) as room:  # the decoded pixels are gone when the room ends
        pixel_values, grid = preprocess(load_images(images, image_cfg, room), image_cfg)
        merge = cfg.vision.spatial_merge_size
        expanded = expand_image_placeholders(list(ids), grid, cfg.image_token_id, merge)
        model_max = engine.cfg.text.max_position_embeddings
        _check_context(
            engine.max_context, model_max, cache, len(ids), expanded, cfg.image_token_id, image_cfg
        )
        positions, delta = mrope_positions(expanded, grid, cfg.image_token_id, merge)
        features = engine.vision().encode(pixel_values, grid, on_encode)  # the tower loads on first use
        del pixel_values
    embeds = model.embed_ids(torch.tensor(expanded, dtype=torch.long))
    embeds = scatter_image_features(embeds, expanded, features, cfg.image_token_id)
    return ImagePrompt(expanded, embeds, positions + cache.offset + cache.rope_delta, delta)


def _check_context(
    limit: int,
    model_max: int,
    cache: ModelCache,
    n_unexpanded: int,
    expanded: list[int],
    image_token_id: int,
    image_cfg: ImageProcessorConfig,
) -> None:
    """The images' tokens must fit; a text that alone is over the limit is left to generate.check_context."""
    needed = cache.offset + len(expanded)
    if cache.offset + n_unexpanded >= limit or needed < limit:
        return
    per_image = image_cfg.max_pixels // image_cfg.factor**2  # one token per merged factor x factor block
    raise InputError(
        f"image too large for the context: the prompt needs {needed} tokens "
        f"({expanded.count(image_token_id)} of them for the image(s)) but the limit is {limit}",
        context_hint(
            f"use a smaller image (this checkpoint's preprocessor allows {image_cfg.max_pixels} pixels, "
            f"about {per_image} tokens, per image)",
            cache.offset,
            limit,
            model_max,
        ),
    )
