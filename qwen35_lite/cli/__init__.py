"""The command line: the Typer app and its commands, the chat REPL and every piece of rich rendering.
Nothing below this package prints.

Importing it takes about a second (typer, rich, torch): a Ctrl+C in that second exits 130 quietly, as it
does later, instead of a KeyboardInterrupt traceback from inside an import.
"""

import signal
import sys
import threading

EXIT_INTERRUPTED = 130


def _exit_interrupted(signum, frame):
    raise SystemExit(EXIT_INTERRUPTED)


# Only where Ctrl+C still has Python's default meaning (not in a host that set its own handler).
_guard = threading.current_thread() is threading.main_thread() and (
    signal.getsignal(signal.SIGINT) is signal.default_int_handler
)
if _guard:
    signal.signal(signal.SIGINT, _exit_interrupted)
try:
    from .app import app
    from .app import main as _run_app
finally:
    if _guard:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    """The `qwen35-lite` entry point; a Ctrl+C before a command's own handling is in place exits 130."""
    try:
        _run_app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


__all__ = ["app", "main"]
