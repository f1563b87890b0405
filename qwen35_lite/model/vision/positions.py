"""Image placeholders in the prompt and 3-D (M-RoPE) positions, as transformers' `get_rope_index`.

Positions during decode: after a prefill that returned `rope_delta`, a new token at cache length
`cache_len` (the number of tokens already in the KV/DeltaNet caches) gets the three positions
`(cache_len + rope_delta,) * 3`. rope_delta is <= 0 for prompts with images (an image block of
gh/m x gw/m tokens only advances the position counter by max(gh, gw)/m) and 0 for pure text.

A later prompt appended to a live cache (next chat turn): compute its positions and delta alone, then
add `cache.offset + cache.rope_delta` to the positions and add the delta to `cache.rope_delta`; this is
what recomputing over the whole conversation would give.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import InputError


def _grid_list(grid_thw: torch.Tensor | Sequence[Sequence[int]] | None) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)


def tokens_per_image(grid: tuple[int, int, int], merge: int) -> int:
    t, h, w = grid
    return t * (h // merge) * (w // merge)


def expand_image_placeholders(
    ids: Sequence[int] | torch.Tensor,
    grid_thw: torch.Tensor | Sequence[Sequence[int]],
    image_token_id: int,
    merge: int,
) -> list[int]:
    """Replace the i-th single `<|image_pad|>` by tokens_per_image(grid i) copies of it."""
    ids = _as_list(ids)
    grids = _grid_list(grid_thw)
    n_pads = sum(1 for i in ids if i == image_token_id)
    if n_pads != len(grids):
        raise InputError(
            f"the prompt has {n_pads} image placeholder(s) but {len(grids)} image(s) were given",
            "give one image per <|image_pad|> (the chat template writes one per image part)",
        )
    out: list[int] = []
    it = iter(grids)
    for tok in ids:
        if tok == image_token_id:
            out.extend([image_token_id] * tokens_per_image(next(it), merge))
        else:
            out.append(tok)
    return out


def mrope_positions(
    input_ids: Sequence[int] | torch.Tensor,
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int]:
    """Expanded prompt ids -> (positions int64 [3, T] rows (t, h, w), rope_delta).

    A text token takes (cur, cur, cur) and advances cur by 1. The k-th image's block of
    t * gh/m * gw/m tokens takes, in raster order over (frame, row, col), (cur + frame, cur + row,
    cur + col); afterwards cur advances by max(gh, gw) / m (the frame count is not added).
    rope_delta = max(position) + 1 - T, used for every later token (see the module docstring).
    """
    ids = _as_list(input_ids)
    grids = _grid_list(image_grid_thw)
    m = spatial_merge_size
    rows: list[torch.Tensor] = []
    cur, i, k = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            rows.append(torch.arange(cur, cur + j - i).expand(3, -1))  # [3, run]
            cur += j - i
            i = j
            continue
        if k >= len(grids):
            raise InputError(
                "the prompt has more image tokens than the images given produce",
                "do not type <|image_pad|> in the prompt; attach images with --image",
            )
        t, gh, gw = grids[k]
        n = tokens_per_image(grids[k], m)
        if ids[i : i + n] != [image_token_id] * n:
            raise InputError(
                f"image {k + 1} needs {n} consecutive image tokens in the prompt",
                "expand placeholders with expand_image_placeholders before computing positions",
            )
        frame, row, col = torch.meshgrid(
            torch.arange(t), torch.arange(gh // m), torch.arange(gw // m), indexing="ij"
        )  # each [t, gh/m, gw/m]
        rows.append(torch.stack([frame, row, col]).reshape(3, -1) + cur)  # [3, n]
        cur += max(gh, gw) // m
        i += n
        k += 1
    if k != len(grids):
        raise InputError(
            f"{len(grids)} image(s) given but the prompt has image tokens for only {k}",
            "give one image per <|image_pad|> placeholder",
        )
    if not rows:
        return torch.zeros(3, 0, dtype=torch.long), 0
    positions = torch.cat(rows, dim=1)  # [3, T]
    return positions, int(positions.max()) + 1 - len(ids)


def scatter_image_features(
    embeds: torch.Tensor, input_ids: Sequence[int] | torch.Tensor, features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Write the vision tower's rows, in order, over the embeddings of the image tokens (masked_scatter)."""
    ids = torch.as_tensor(_as_list(input_ids), device=embeds.device)
    mask = ids == image_token_id  # [T]
    n = int(mask.sum())
    if n != features.shape[0]:
        raise InputError(
            f"the prompt has {n} image tokens but the images produce {features.shape[0]} features",
            "expand placeholders with expand_image_placeholders using the same image_grid_thw",
        )
    out = embeds.clone()
    out[mask] = features.to(embeds.device, embeds.dtype)
    return out
