"""cli/signals.py: SIGTERM ends a main thread blocked in a read even when another thread took the signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from test_hardening_chat import ROOT

# The main thread waits in a read that only a signal can end; another thread takes SIGTERM (raise_signal
# sends it to the calling thread), as torch's OpenMP workers or the MCP event loop may in `chat --mcp`.
BLOCKED = textwrap.dedent(
    """
    import os, signal, sys, threading
    from qwen35_lite.cli.signals import stopped_by_sigterm

    read_end, _ = os.pipe()
    try:
        with stopped_by_sigterm():
            threading.Timer(0.2, signal.raise_signal, (signal.SIGTERM,)).start()
            os.read(read_end, 1)
    finally:
        print("cleaned up", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.set_wakeup_fd(-1))
    """
)


def test_sigterm_taken_by_another_thread_still_ends_the_blocked_main_thread():
    r = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stdout.split() == ["cleaned", "up", "True", "-1"]  # the handler and the wakeup fd restored
    assert "Traceback" not in r.stderr
