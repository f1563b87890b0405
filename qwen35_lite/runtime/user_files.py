"""Files a user names (--tools, /load, /save, and every file a later flag names): regular files only, read
under a size cap that holds while reading, and written only over a regular file.

A FIFO would block the open forever, /dev/zero never ends, a directory or a device is no document: each is
refused with one line naming what the path is. A save never renames over a device, FIFO, socket or directory
(as root, `/save /dev/null` would otherwise replace the system's /dev/null).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError

KiB, MiB = 1 << 10, 1 << 20
READ_CHUNK = 1 << 20
KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def size_text(n: int) -> str:
    """Binary units, as everywhere in the command line: `8 MiB`, `1.5 KiB`, `12 B`."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, in words ("a FIFO")."""
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def read_user_file(path: Path, what: str, max_bytes: int, hint: str) -> bytes:
    """The bytes of the regular file `path` names (`what`: "the tools file"), at most `max_bytes`.

    InputError (with `hint`) for a missing file, one that is not a regular file (checked on the open file,
    opened without blocking so a FIFO cannot hang), one over the cap (counted while reading: a file that
    grows, or claims a size it does not have, is never read past the cap) or one that cannot be read.
    """
    try:
        kind = _not_regular(os.stat(path).st_mode)  # a socket cannot even be opened: name it first
        if kind:
            raise InputError(f"{what} {path} is {kind}, not a regular file", hint)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if kind := _not_regular(os.fstat(fd).st_mode):  # swapped since the stat
                raise InputError(f"{what} {path} is {kind}, not a regular file", hint)
            data = _read_capped(f, max_bytes)
    except FileNotFoundError:
        raise InputError(f"no such file: {path}", hint) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        reason = getattr(e, "strerror", None) or str(e)
        raise InputError(f"cannot read {path}: {reason}", "check the path and its permissions") from None
    if data is None:
        raise InputError(f"{what} {path} is over the {size_text(max_bytes)} limit", hint)
    return data


def _not_regular(mode: int) -> str | None:
    return None if stat.S_ISREG(mode) else kind_of(mode)


def _read_capped(f, max_bytes: int) -> bytes | None:
    """At most max_bytes, in chunks; None once the file holds more."""
    parts, total = [], 0
    while chunk := f.read(min(READ_CHUNK, max_bytes + 1 - total)):
        parts.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            return None
    return b"".join(parts)


def check_write_target(target: Path) -> None:
    """Refuse to replace anything but a regular file (a symlink is judged by what it points to): InputError
    naming what is there. Nothing is written, so the device, FIFO or directory is left as it was."""
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there: the write creates it (or fails in its own words)
    if not stat.S_ISREG(mode):
        raise InputError(
            f"cannot write {target}: it is {kind_of(mode)}, not a regular file",
            "save to a regular file path (nothing was written)",
        )


def default_file_mode() -> int:
    """What a plain open() creates: 0666 less the umask (mkstemp and safetensors make 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
