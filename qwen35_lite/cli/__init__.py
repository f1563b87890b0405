"""The command line: the Typer app and its commands, the chat REPL and every piece of rich rendering.
Nothing below this package prints.

Importing this package is light: `main` imports the app (typer, rich, torch: about a second) inside its
own Ctrl+C guard, so an interrupt during those imports is a quiet exit 130, as it is later.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def main() -> None:
    """The `qwen35-lite` entry point."""
    try:
        from .app import main as run_app

        run_app()
    except KeyboardInterrupt:  # before a command's own handling is in place (imports, option parsing)
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # past the ^C the terminal echoed
        sys.exit(EXIT_INTERRUPTED)


def __getattr__(name: str):
    if name == "app":  # `from qwen35_lite.cli import app` (tests, embedding) loads it on first use
        from .app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main"]
