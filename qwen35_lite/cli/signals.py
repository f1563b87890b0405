"""Process signals for the interactive commands: SIGTERM as an exit that stops what the chat started, and
Ctrl+C as KeyboardInterrupt for the time of a block.

Python runs a handler in the main thread only, when that thread next runs Python code; the kernel may hand
a process's signal to any of its threads (torch's OpenMP workers, the MCP event loop). Taken by another
thread while the main thread waits in readline for a line, the signal leaves it waiting: the handler runs
at the next key press. `stopped_by_sigterm` sends it on to the main thread, whose wait it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

FORWARD_AFTER_S = 0.05  # the main thread took the signal itself if its handler ran by then


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM ends the process as an exit would (exit code 143), so the servers are stopped on the way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    exiting = threading.Event()

    def handler(signum, frame):
        if not exiting.is_set():  # once: a forwarded copy must not break into the way out
            exiting.set()
            raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    waker = MainThreadWaker(signal.SIGTERM, exiting)
    try:
        yield
    finally:
        waker.close()
        signal.signal(signal.SIGTERM, previous)


class MainThreadWaker:
    """Sends `signum` on to the main thread until `handled` is set, whichever thread took it.

    Python's C-level handler writes each signal's number to the wakeup fd, in whatever thread it runs;
    a daemon thread reads them. Must be made in the main thread (signal.set_wakeup_fd)."""

    def __init__(self, signum: int, handled: threading.Event) -> None:
        self.signum, self.handled, self.closed = signum, handled, False
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # the C handler must never block on a full pipe
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        main = threading.main_thread().ident
        self.thread = threading.Thread(target=self._run, args=(main,), name="signal-waker", daemon=True)
        self.thread.start()

    def _run(self, main: int) -> None:
        while data := os.read(self.read_fd, 64):  # b"" once close() closes the write end
            if self.signum not in data:
                continue
            while not self.handled.wait(FORWARD_AFTER_S) and not self.closed:
                with contextlib.suppress(OSError):  # the main thread already gone
                    signal.pthread_kill(main, self.signum)

    def close(self) -> None:
        self.closed = True
        signal.set_wakeup_fd(self.previous_fd)
        os.close(self.write_fd)
        self.thread.join(timeout=1)
        os.close(self.read_fd)


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    """Ctrl+C raises KeyboardInterrupt for the time of the block (a prompt inside a streaming turn)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
