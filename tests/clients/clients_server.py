"""One `qwen35-lite serve` process for the client tests: loopback, a tiny random checkpoint, --no-think,
and the scripted model (scripted_model.py) in place of the random weights' tokens. `server` also checks
that no request of the test got a 4xx or 5xx (the server logs one line per request, with its status).

Test modules import the fixtures from here (a conftest.py here would shadow tests/conftest.py, which other
tests import by name); the process is started once and shared by every module, and stopped at exit."""

from __future__ import annotations

import atexit
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
KEY = "sk-clients"


@dataclass
class Served:
    url: str  # ends in /v1
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVED: list[Served] = []


@pytest.fixture(scope="session", name="served")
def served_fixture(tmp_path_factory) -> Served:
    if not _SERVED:
        _SERVED.append(_start(tmp_path_factory.mktemp("clients")))
    return _SERVED[0]


def _start(root: Path) -> Served:
    import torch

    from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint

    ckpt = root / MODEL
    write_checkpoint(ckpt, SyntheticSpec(), dtype=torch.float32)
    port, log = _free_port(), root / "serve.log"
    paths = [str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "QWEN35_LITE_TEST_SCRIPT": "scripted_model:reply",
        "PYTHONPATH": os.pathsep.join(paths),
    }
    command = [sys.executable, "-m", "qwen35_lite.cli", "serve", "--model", str(ckpt), "--port", str(port)]
    command += ["--device", "cpu", "--ctx", "8192", "--no-think", "--api-key", KEY]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    atexit.register(_stop, proc)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None or time.time() > deadline:
            _stop(proc)
            raise AssertionError("serve did not start: " + log.read_text())
        try:
            request = urllib.request.Request(url + "/models", headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(request, timeout=2).close()
            return Served(url, log)
        except OSError:
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


ERROR_LINE = re.compile(r" · [45]\d\d(?: |$)")  # a status, not a speed like "453.1 tok/s"


@pytest.fixture(name="server")
def server_fixture(served):
    """The served server; after the test, no request it made may have been answered 4xx/5xx, and each
    generation must have ended normally."""
    before = len(served.lines())
    yield served
    new = served.lines()[before:]
    bad = [line for line in new if ERROR_LINE.search(line) or "internal error" in line or "Traceback" in line]
    assert not bad, "\n".join(new)
    assert any("/v1/" in line for line in new), "the test sent no request"
