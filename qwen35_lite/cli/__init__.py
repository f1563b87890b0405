"""The command line: the Typer app and its commands, the chat REPL and every piece of rich rendering.
Nothing below this package prints."""

from .app import app, main

__all__ = ["app", "main"]
