"""Errors a user can cause, as the command line shows them: one line and a hint, an exit code."""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable

import typer

from ..errors import Qwen35Error
from .ui import UI

EXIT_INTERRUPTED = 130
FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # a write the user's disk refused


def friendly_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause into one line and an exit code; let everything else through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ui = UI()
        try:
            return fn(*args, **kwargs)
        except Qwen35Error as e:
            ui.error(e.message, e.hint)
            raise typer.Exit(e.exit_code) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            ui.error(f"{e.filename or 'a file'}: {e.strerror}", "check the path and its permissions")
            raise typer.Exit(1) from None
        except OSError as e:
            if e.errno not in FULL_OR_READ_ONLY:
                raise
            where = f"cannot write {e.filename}" if e.filename else "cannot write"
            ui.error(f"{where}: {e.strerror}", "free some space, or write somewhere else")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if ui.err.is_terminal:
                ui.err.print()  # past the ^C the terminal echoed
            ui.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
            silence_stdout()
            raise typer.Exit(1) from None

    return wrapper


def silence_stdout() -> None:
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
