"""How typer presents help and usage errors, adjusted in one place.

Typer (0.29) prints a `<bool>` type beside every flag, writes a required argument as `{prompt}` in the
usage line, and frames usage errors in a box. We want git/ollama-style help (flags without a type,
`PROMPT`) and usage errors in the same two lines as every other error (`error:` and `hint:`). Typer has no
setting for these, so `install()` wraps the methods that render them; everything else is typer's own.
Each patch applies only where this typer has the method (older ones render flags and usage differently).
"""

from __future__ import annotations

import functools

import typer.core
import typer.rich_utils
from rich.console import Console
from rich.text import Text


def install() -> None:
    """Apply the rendering fixes (idempotent: the CLI module calls it once at import)."""
    if getattr(typer.core, "_qwen35_lite_help", False):
        return
    typer.core._qwen35_lite_help = True
    _flags_without_type()
    _arguments_in_capitals()
    if hasattr(typer.rich_utils, "rich_format_error"):
        typer.rich_utils.rich_format_error = _usage_error_lines


def _flags_without_type() -> None:
    original = getattr(typer.core.TyperOption, "display_type_rich", None)
    if original is None:
        return

    @functools.wraps(original)
    def display_type_rich(self, ctx):
        if self.is_flag:  # an on/off switch takes no value, so it has no type to show
            return None
        return original(self, ctx)

    typer.core.TyperOption.display_type_rich = display_type_rich


def _arguments_in_capitals() -> None:
    def usage_name(self) -> str:
        name = (self.metavar or self.name).upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    if hasattr(typer.core.TyperArgument, "_usage_display_name"):
        typer.core.TyperArgument._usage_display_name = usage_name
    original = getattr(typer.core.TyperArgument, "display_type_rich", None)
    if original is not None:
        # an argument named by its metavar (PROMPT) needs no `<list[str]>` beside it
        typer.core.TyperArgument.display_type_rich = lambda self, ctx: (
            None if self.metavar else original(self, ctx)
        )


def _usage_error_lines(error) -> None:
    """A usage error as `error: <message>` and `hint: <usage>` on stderr, without a box.

    Bare `qwen35-lite` never gets here (the app shows its help itself), so every error is a real one.
    """
    console = Console(stderr=True, highlight=False)
    console.print(Text.assemble(("error:", "bold red"), " ", error.format_message()), soft_wrap=True)
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        usage = " ".join(ctx.get_usage().removeprefix("Usage: ").split())  # one line, however long
        hint = f"usage: {usage}; see {ctx.command_path} --help"
    else:
        hint = "see qwen35-lite --help"
    console.print(Text.assemble(("hint:", "yellow"), " ", hint), soft_wrap=True)
