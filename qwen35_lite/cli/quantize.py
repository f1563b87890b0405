"""`qwen35-lite quantize SRC OUT`: routed experts (or every Linear layer of the community recipe, `--scope
all`) to int4 or int8 (compressed-tensors W4A16 / W8A16), with a progress bar and a summary of what was
quantised and what stayed bf16.

The work is qwen35_lite/convert/quantize.py (what is quantised: recipe.py); this module parses the flags and renders. `register(app)` adds the
command with the same one-line error handling as the others.
"""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..convert.quantize import (
    DEFAULT_SHARD_BYTES,
    GROUP_SIZES,
    QuantizeProgress,
    QuantizeResult,
    default_group_size,
    quantize_checkpoint,
)
from ..convert.recipe import KEPT, Recipe, head_scheme
from ..errors import InputError
from ..experts.formats import QuantScheme
from ..weights.hub import resolve_model
from .errors import friendly_errors
from .options import Offline
from .ui import UI, human_bytes, plural


class Scope(str, Enum):
    experts = "experts"
    all = "all"


def register(app: typer.Typer) -> None:

    app.command()(friendly_errors(quantize))


def quantize(
    src: Annotated[
        str, typer.Argument(help="bf16 or FP8 checkpoint: a directory or a hub id.", show_default=False)
    ],
    out: Annotated[
        Path, typer.Argument(help="Directory to write the quantised checkpoint to.", show_default=False)
    ],
    scope: Annotated[
        Scope,
        typer.Option(
            "--scope",
            help="experts: the routed experts only. all: every Linear layer the community (llm-compressor)"
            " recipe quantises: the experts, attention, DeltaNet and the shared experts. Kept bf16: "
            + "; ".join(f"{what} ({why})" for what, why in KEPT)
            + ".",
        ),
    ] = Scope.experts,
    bits: Annotated[
        int,
        typer.Option(
            "--bits",
            help="Bits per weight, 4 (W4A16) or 8 (W8A16, near lossless): the experts, and with --scope all"
            " the resident layers unless --resident-bits.",
        ),
    ] = 4,
    resident_bits: Annotated[
        int | None,
        typer.Option(
            "--resident-bits",
            help="With --scope all: bits of the resident (non-expert) layers, 4 or 8. Default: --bits.",
            show_default=False,
        ),
    ] = None,
    head_bits: Annotated[
        int | None,
        typer.Option(
            "--head-bits",
            help="With --scope all: quantise lm_head too, e.g. 8 (W8A16: int8, one scale a row). Default: lm_head "
            "kept as it is.",
            show_default=False,
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size",
            help="Weights per scale: 32, 64 or 128 (smaller: more accurate). Default: the largest of them"
            " that divides every expert's input features (128 on the Qwen3.5 releases). A resident layer"
            " it does not divide gets one scale per output channel.",
            show_default=False,
        ),
    ] = None,
    symmetric: Annotated[
        bool,
        typer.Option("--symmetric/--asymmetric", help="Zero-point-free scales, or a zero-point per group."),
    ] = True,
    mse_clip: Annotated[
        bool,
        typer.Option("--mse-clip", help="Per group, search the clipped range with the least error (slower)."),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty OUT.")] = False,
    shard_size_mb: Annotated[
        int, typer.Option("--shard-size-mb", min=1, help="Cap on each output shard, MiB.")
    ] = DEFAULT_SHARD_BYTES >> 20,
    offline: Offline = False,
) -> None:
    """Quantise the routed experts (--scope all: every Linear layer but the router, the shared-expert gate,
    DeltaNet's in_proj_a/b and lm_head) to int4 or int8 (round-to-nearest, compressed-tensors
    pack-quantized W4A16 / W8A16); everything else is kept (an FP8 source's other weights become bf16). An
    interrupted run resumes when the same command is run again."""
    for flag, value in (("--resident-bits", resident_bits), ("--head-bits", head_bits)):
        if value is not None and scope is not Scope.all:
            raise InputError(f"{flag} applies to the resident layers", "add --scope all")
    ui = UI()
    src_dir = resolve_model(src, offline)
    if group_size is None:
        group_size = default_group_size(src_dir)
        if group_size != GROUP_SIZES[-1]:
            ui.info(
                f"--group-size {group_size}: the largest of 128, 64, 32 that divides every expert's inputs"
            )
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    recipe = Recipe(
        scheme,
        resident=replace(scheme, bits=resident_bits or bits) if scope is Scope.all else None,
        head=head_scheme(scheme, head_bits),
    )
    bar = Progress(
        TextColumn("quantizing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("shard {task.fields[shard]}"),
        console=ui.err,
        transient=True,
        disable=not ui.err.is_terminal,
    )
    task = bar.add_task("quantize", total=None, shard="")

    def on_progress(p: QuantizeProgress) -> None:
        bar.update(
            task, completed=p.done_bytes, total=p.total_bytes, shard=f"{p.shards_done}/{p.shards_total}"
        )

    try:
        with bar:
            result = quantize_checkpoint(
                src_dir,
                out,
                recipe,
                force=force,
                mse_clip=mse_clip,
                shard_bytes=shard_size_mb << 20,
                on_progress=on_progress,
            )
    except KeyboardInterrupt:
        ui.info("the finished shards are kept: run the same command again to resume")
        raise
    kept = f", {result.resumed_shards} kept from the interrupted run" if result.resumed_shards else ""
    ui.out.print(
        f"wrote {result.out} ({human_bytes(result.total_bytes)} in {plural(result.shards, 'shard')}{kept})",
        markup=False,
    )
    _summary(ui, result, recipe)
    ui.out.print(f"try:  qwen35-lite chat --model {result.out}", markup=False)


def _summary(ui: UI, result: QuantizeResult, recipe: Recipe) -> None:
    """Which layers got which scheme, and what was kept and why."""
    for layers, scheme in result.layers:
        ui.out.print(f"  {scheme}: {layers}", markup=False)
    if recipe.scope == "experts":
        ui.out.print("  kept as they were: the other layers (--scope all quantises them too)", markup=False)
        return
    kept = [(what, why) for what, why in KEPT if not (what == "lm_head" and recipe.head is not None)]
    ui.out.print("  kept unquantised: " + "; ".join(f"{what} ({why})" for what, why in kept), markup=False)
