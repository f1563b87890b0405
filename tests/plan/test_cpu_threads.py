"""--cpu-threads (issue 11): torch's CPU compute threads, set once at Engine.load, shown by info and bench."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qwen35_lite.cli import app
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.runtime.engine import Engine, EngineOptions

SMALL = SyntheticSpec(hidden_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def ckpt(module_tmp):
    return write_checkpoint(module_tmp("threads") / "tiny", SMALL, dtype=torch.float32)


@pytest.fixture(autouse=True)
def keep_threads():
    """set_num_threads is process-wide: give the other tests back the count they started with."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.stderr
    return r


@pytest.mark.slow
def test_engine_load_sets_the_threads_and_leaves_the_default_alone(ckpt):
    torch.set_num_threads(2)
    Engine.load(str(ckpt), EngineOptions(device="cpu"))
    assert torch.get_num_threads() == 2
    Engine.load(str(ckpt), EngineOptions(device="cpu", cpu_threads=1))
    assert torch.get_num_threads() == 1


def test_info_shows_the_threads_a_run_would_use(ckpt):
    torch.set_num_threads(2)
    table = cli("info", "-m", ckpt, "--device", "cpu", "--cpu-threads", "1").stdout
    assert "CPU threads" in table and "1 (--cpu-threads)" in table
    assert (
        "2 (torch's default; decode steps measure 1 to it)"
        in cli("info", "-m", ckpt, "--device", "cpu").stdout
    )
    plan = json.loads(cli("info", "-m", ckpt, "--device", "cpu", "--cpu-threads", "1", "--json").stdout)
    assert plan["cpu_threads"] == 1


def test_the_decode_threads_are_measured_unless_cpu_threads_fixes_them(ckpt):
    """By default a CPU engine's decode steps go through a ThreadTuner (1 to torch's count, chosen by
    the step times); --cpu-threads N keeps N for every step, as asked."""
    torch.set_num_threads(2)
    eng = Engine.load(str(ckpt), EngineOptions(device="cpu"))
    assert eng.threads is not None and eng.threads.counts == [2, 1]
    r = cli("bench", "-m", ckpt, "--device", "cpu", "--prompt-tokens", "4", "--new-tokens", "3", "--json")
    got = json.loads(r.stdout)
    assert got["cpu_threads"] == 2 and got["decode_threads"] in (1, 2)
    assert Engine.load(str(ckpt), EngineOptions(device="cpu", cpu_threads=2)).threads is None


@pytest.mark.slow
def test_bench_names_the_chosen_thread_count(ckpt):
    torch.set_num_threads(2)
    args = ("bench", "-m", ckpt, "--device", "cpu", "--prompt-tokens", "4", "--new-tokens", "2")
    assert json.loads(cli(*args, "--cpu-threads", "1", "--json").stdout)["cpu_threads"] == 1
    cpu_row = next(line for line in cli(*args, "--cpu-threads", "1").stdout.splitlines() if "CPU" in line)
    assert "1 thread)" in cpu_row


def test_openmp_threads_poll_briefly_unless_the_environment_chose():
    """torch's spinning OpenMP threads made 2 threads decode ~30x slower beside one busy process, and
    sleeping at once cost a third of a quiet machine's decode (docs/benchmarks.md, "Busy machine"): the
    package asks for a short poll before torch loads, and leaves a user's own choice alone."""
    import os
    import subprocess
    import sys

    from qwen35_lite.openmp import SPIN, set_openmp_wait

    env: dict[str, str] = {}
    assert set_openmp_wait(env) and env == {"GOMP_SPINCOUNT": SPIN}
    assert int(SPIN) < 300_000  # below libgomp's default
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}, {"KMP_BLOCKTIME": "0"}):
        env = dict(chosen)
        assert not set_openmp_wait(env) and env == chosen
    clean = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    code = "import qwen35_lite, os, sys; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [SPIN, "False"]  # set, and torch not loaded yet
