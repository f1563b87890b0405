"""The command line, end to end on one tiny random checkpoint: run, chat (through a pipe), make-checkpoint,
Ctrl+C, and every bad input a user can give (one error line, a hint, no traceback).

Most cases run in-process through typer's CliRunner (no 3 s torch import each); the ones that need real
signals or a real interpreter exit run as subprocesses.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwen35_lite.cli import app
from qwen35_lite.cli.chat_repl import COMMANDS
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.text.chat_template import ChatTemplate
from qwen35_lite.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Name three colours."


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    """One tiny fp32 checkpoint in several shards (the bad-shard cases need more than one)."""
    out = module_tmp("cli") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32, shard_bytes=20 << 20)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


_ENGINES: dict = {}


@pytest.fixture(autouse=True)
def reuse_engines(monkeypatch):
    """In-process runs load each (checkpoint, options) once per session: parsing the 33 MB tokenizer for
    every invocation would double this file's runtime. Failed loads are never cached, and the subprocess
    tests (Ctrl+C, the real-process error) always load for real."""
    from qwen35_lite.runtime.engine import Engine, EngineOptions

    load = Engine.load.__func__

    def cached(cls, model, opts=None, provider_factory=None, on_progress=None):
        # The CLI always passes the plan's functools.partial(TieredExperts, cpu_slots=..., gpu_slots=...)
        key = (str(model), repr(opts or EngineOptions()), repr(getattr(provider_factory, "keywords", None)))
        if key not in _ENGINES:
            _ENGINES[key] = load(cls, model, opts, provider_factory, on_progress)
        return _ENGINES[key]

    monkeypatch.setattr(Engine, "load", classmethod(cached))


def cli(*args, input: str | None = None, env: dict | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception  # an unexpected error is a bug: show its traceback
    return result


def run_json(ckpt, *args, input: str | None = None) -> dict:
    r = cli("run", "--model", ckpt, "--json", *args, input=input)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # nothing streamed: exactly one JSON object
    return json.loads(lines[-1])


def assert_user_error(r, *words: str, code: int = 1) -> None:
    """One `error:` line naming `words`, a `hint:` line, the exit code, no traceback, no escape codes."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: "), r.stderr
    assert lines[1].startswith("hint: "), r.stderr
    assert len(lines) == 2, r.stderr
    for w in words:
        assert w in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "\x1b[" not in r.stderr


# ---- run ---------------------------------------------------------------------------------------------


def test_run_json_fields_prompt_ids_and_greedy_determinism(ckpt, tok):
    args = ("--temperature", "0", "--max-new-tokens", "6", "--system", "Be brief.", PROMPT)
    a = run_json(ckpt, *args)
    for key in ("text", "thinking", "tokens", "prompt_ids", "finish_reason", "stats"):
        assert key in a
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    rendered = ChatTemplate.from_dir(ckpt).render(messages, add_generation_prompt=True, enable_thinking=True)
    assert a["prompt_ids"] == tok.encode(rendered)
    assert len(a["tokens"]) == 6 and a["finish_reason"] == "length"
    assert a["thinking"]  # random weights never close <think>: everything is thinking
    stats = a["stats"]
    for key in ("prompt_tokens", "generated_tokens", "prefill_s", "decode_s", "decode_tok_s", "ttft_s"):
        assert key in stats
    assert stats["prompt_tokens"] == len(a["prompt_ids"]) and stats["generated_tokens"] == 6
    assert stats["peak_rss_bytes"] > 0 and stats["experts"]["bytes_read"] > 0
    # the checkpoint fits the (free-memory) budget: every expert was read at load, none during the reply
    assert stats["ram_misses"] == 0 and stats["ram_hits"] > 0 and stats["disk_bytes"] == 0
    b = run_json(ckpt, *args)
    assert b["tokens"] == a["tokens"] and b["thinking"] == a["thinking"]


def test_run_streams_answer_to_stdout_and_the_rest_to_stderr(ckpt):
    r = cli("run", "-m", ckpt, "-t", "0", "-n", "5", "--no-think", PROMPT)
    assert r.exit_code == 0, r.stderr
    answer = run_json(ckpt, "-t", "0", "-n", "5", "--no-think", PROMPT)["text"]
    assert r.stdout == answer + "\n"  # the answer alone
    assert "prompt " in r.stderr and "tok/s" in r.stderr and "peak RSS" in r.stderr
    assert "Thinking" not in r.stderr and "\x1b[" not in r.stdout + r.stderr
    quiet = cli("run", "-m", ckpt, "-t", "0", "-n", "5", "--no-think", "--quiet", PROMPT)
    assert quiet.stdout == r.stdout and quiet.stderr == ""


@pytest.mark.slow
def test_run_thinking_goes_to_stderr_and_hide_thinking_prints_none_of_it(ckpt):
    thinking = run_json(ckpt, "-t", "0", "-n", "6", PROMPT)["thinking"]
    shown = cli("run", "-m", ckpt, "-t", "0", "-n", "6", PROMPT)
    assert shown.stdout == "" and "Thinking..." in shown.stderr and thinking in shown.stderr
    hidden = cli("run", "-m", ckpt, "-t", "0", "-n", "6", "--hide-thinking", PROMPT)
    assert hidden.exit_code == 0
    assert hidden.stdout == "" and "Thinking" not in hidden.stderr
    assert thinking[:8] not in hidden.stderr


def test_run_stdin_prompt_and_raw(ckpt, tok):
    text = "The quick brown fox"
    env = {"QWEN35_LITE_MODEL": str(ckpt)}  # the model may come from the environment
    r = cli("run", "--json", "--raw", "-t", "0", "-n", "3", "-", input=text, env=env)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == tok.encode(text)  # no template around it
    assert len(out["tokens"]) == 3


def test_run_bad_flags_are_usage_errors(ckpt):
    for args in (("--top-p", "2"), ("--temperature", "-1"), ("--raw", "--system", "x"), ("--dtype", "int4")):
        r = cli("run", "-m", ckpt, *args, "hi")
        assert r.exit_code == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr


# ---- bad inputs: one line, a hint, exit 1, no traceback ------------------------------------------------


def _copy(ckpt: Path, dst: Path) -> Path:
    """A copy made of symlinks (cheap); files about to be damaged are replaced by real copies."""
    dst.mkdir()
    for f in ckpt.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


def test_missing_directory(tmp_path):
    assert_user_error(cli("run", "-m", tmp_path / "nope", "hi"), "no such directory")


def test_missing_shard(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    (bad / "model-00002-of-00003.safetensors").unlink()
    assert_user_error(cli("run", "-m", bad, "hi"), "missing", "model-00002-of-00003.safetensors")


def test_truncated_shard(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    shard = bad / "model-00003-of-00003.safetensors"
    shard.unlink()
    data = (ckpt / shard.name).read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_user_error(cli("run", "-m", bad, "hi"), "truncated", shard.name)


def test_not_a_qwen35_config(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "bad")
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert_user_error(cli("run", "-m", bad, "hi"), "llama")


def test_unknown_hub_id_offline(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf")}
    assert_user_error(cli("run", "-m", "nobody/nothing", "--offline", "hi", env=env), "nobody/nothing")
    env["HF_HUB_OFFLINE"] = "1"
    assert_user_error(cli("run", "-m", "nobody/nothing", "hi", env=env), "offline")


def test_prompt_over_the_context(ckpt):
    r = cli("run", "-m", ckpt, "--ctx", "16", "word " * 40)
    assert_user_error(r, "context", "16")


def test_error_from_a_real_process_has_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "qwen35_lite.cli", "run", "-m", tmp_path / "nope", "hi"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("error: no such directory") and "hint: " in p.stderr
    assert "Traceback" not in p.stderr


# ---- chat through a pipe --------------------------------------------------------------------------------


def chat(ckpt, lines: list[str], *args):
    r = cli("chat", "-m", ckpt, "-n", "4", *args, input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.stderr
    assert "\x1b[" not in r.stdout + r.stderr and ">>>" not in r.stdout  # no decorations in a pipe
    return r


@pytest.mark.slow
def test_chat_every_command(ckpt, tmp_path):
    saved = tmp_path / "chat.json"
    r = chat(
        ckpt,
        [
            "/help",
            "/set temperature 0",
            "/set top_k 5",
            "/set",
            "/think off",
            "first message",
            "/stats",
            f"/save {saved}",
            "/clear",
            "/stats",
            "/system You are terse.",
            "/system",
            "/think hide",
            f"/load {saved}",
            "second message",
            f"/save {saved}",
            "/exit",
            "never sent",
        ],
    )
    err = r.stderr
    for name, cmd in COMMANDS.items():
        assert f"/{name}" in err and cmd.help in err  # /help lists the whole table
    assert "temperature = 0.0" in err and "top_k = 5" in err
    assert "thinking off" in err and "thinking hide" in err
    assert "conversation cleared" in err and "system prompt set" in err and "system prompt removed" in err
    assert "saved 2 messages" in err and "loaded 2 messages" in err and "saved 4 messages" in err
    assert err.count("reply 4 tok") == 2 + 2  # a stats line after each reply, and from each /stats
    data = json.loads(saved.read_text())
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert data["messages"][0]["content"] == "first message"
    assert data["messages"][2]["content"] == "second message"
    assert data["settings"]["params"]["temperature"] == 0.0
    assert data["settings"]["think"] == "off"  # /load brought back the saved "off" over "hide"
    assert "never sent" not in json.dumps(data)
    assert "Thinking" not in err  # off, then hidden


def test_chat_set_temperature_zero_is_greedy(ckpt):
    lines = ["/set temperature 0", "/think off", "same question"]
    a, b = chat(ckpt, lines), chat(ckpt, lines)
    assert a.stdout and a.stdout == b.stdout


def test_chat_on_a_text_only_model_refuses_image_at_once_and_keeps_typed_paths_as_text(ckpt, tmp_path):
    from PIL import Image

    pic, saved = tmp_path / "red.png", tmp_path / "c.json"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(pic)
    r = chat(ckpt, [f"/image {pic}", f"{pic} is a file name", "/image", f"/save {saved}"])
    assert r.stderr.count("error: ") == 1 and "has no vision tower" in r.stderr
    assert "attached red.png" not in r.stderr and "no image attached" in r.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [f"{pic} is a file name"]


@pytest.mark.slow
def test_chat_multiline_unknown_command_and_errors_keep_the_chat(ckpt, tmp_path):
    saved = tmp_path / "c.json"
    r = chat(
        ckpt,
        [
            "/x",
            "/think maybe",
            "/set top_p 7",
            "/set colour blue",
            "/load " + str(tmp_path / "missing.json"),
            "word " * 80,  # over --ctx 64: an error, and the chat goes on
            '"""first line',
            "second line",
            'third line"""',
            '"""one line"""',
            f"/save {saved}",
        ],
        "--ctx",
        "64",
    )
    assert "Unknown command '/x'. Type /help for help" in r.stderr
    assert r.stderr.count("error: ") == 5 and r.stderr.count("hint: ") == 5
    assert "but the limit is 64" in r.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "first line\nsecond line\nthird line",
        "one line",
    ]


def test_chat_eof_exits_cleanly(ckpt):
    r = chat(ckpt, [])
    assert r.stdout == ""


# ---- Ctrl+C ---------------------------------------------------------------------------------------------


class Proc:
    """A chat subprocess whose stderr is read line by line, so the test can wait for what it prints."""

    def __init__(self, args: list) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stderr:
            self.lines.put(line)

    def send(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.err.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} never appeared; stderr so far: {''.join(self.err)}")


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_and_keeps_the_chat(ckpt, tmp_path):
    saved = tmp_path / "c.json"
    proc = Proc(["chat", "-m", ckpt, "-n", "100000"])
    try:
        proc.send("tell me a long story")
        proc.wait_for("Thinking...")
        time.sleep(0.5)
        proc.p.send_signal(signal.SIGINT)  # during the reply: stops it
        proc.wait_for("[stopped]")
        proc.send(f"/save {saved}")
        proc.wait_for("saved 2 messages")
        time.sleep(0.3)
        proc.p.send_signal(signal.SIGINT)  # at the prompt, once: a hint, the chat goes on
        proc.wait_for("Ctrl+C again")
        proc.p.stdin.close()  # end of input: a clean exit
        assert proc.p.wait(timeout=60) == 0
    finally:
        proc.p.kill()
    assert "Traceback" not in "".join(proc.err)
    reply = json.loads(saved.read_text())["messages"][1]
    assert reply["role"] == "assistant" and reply["reasoning_content"]  # the partial reply stayed


# ---- make-checkpoint --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_make_checkpoint_then_run_it(tmp_path):
    out = tmp_path / "made"
    args = ["--layers", "2", "--experts", "4", "--top-k", "2", "--hidden", "32", "--layout", "per-expert"]
    r = cli("make-checkpoint", out, *args, "--dtype", "float32", "--shard-size-mb", "30", "--seed", "3")
    assert r.exit_code == 0, r.stderr
    assert str(out) in r.stdout and f"qwen35-lite chat --model {out}" in r.stdout
    config = json.loads((out / "config.json").read_text())["text_config"]
    assert (config["num_hidden_layers"], config["num_experts"], config["hidden_size"]) == (2, 4, 32)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.language_model.layers.1.mlp.experts.3.down_proj.weight" in index
    assert len(set(index.values())) > 1
    assert run_json(out, "-n", "2", "hi")["finish_reason"] == "length"

    again = cli("make-checkpoint", out)
    assert_user_error(again, "not empty")
    bad = cli("make-checkpoint", tmp_path / "x", "--experts", "2", "--top-k", "3")
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("size", ["small", "medium"])
def test_size_presets_are_valid_specs(size):
    from qwen35_lite.cli.app import SIZES
    from qwen35_lite.weights.config import parse_config

    spec = SyntheticSpec(**SIZES[size])
    cfg = parse_config({"model_type": "qwen3_5_moe", "text_config": spec.text_config()})
    assert cfg.text.num_experts == spec.num_experts


def test_launcher_script_exists():
    assert "from qwen35_lite.cli import main" in (ROOT / "cli.py").read_text()
    assert shutil.which(sys.executable)


def test_sampling_names_are_declared_once():
    """Every SamplingParams field has exactly one flag, a /set range and a request field of the server."""
    from qwen35_lite.cli.options import SAMPLING_OPTIONS
    from qwen35_lite.runtime.sampling import SAMPLING_KEYS
    from qwen35_lite.runtime.settings import SETTINGS
    from qwen35_lite.server.protocol import SamplingFields

    assert tuple(SAMPLING_OPTIONS) == SAMPLING_KEYS
    assert set(SAMPLING_KEYS) <= set(SETTINGS)
    assert set(SAMPLING_KEYS) <= set(SamplingFields.model_fields)


def test_flag_groups_build_the_options_from_the_flags():
    """A command's `load` and `reply` parameters become their flags and come back as the dataclasses."""
    import typer
    from typer.testing import CliRunner

    from qwen35_lite.cli.options import ReplyFlags, flag_groups
    from qwen35_lite.plan.options import EngineOptions

    seen = {}

    @flag_groups
    def cmd(model: str, load: EngineOptions, reply: ReplyFlags, extra: int = 3) -> None:
        seen.update(model=model, load=load, reply=reply, extra=extra)

    app = typer.Typer()
    app.command()(cmd)
    app.command("other")(lambda: None)  # two commands: typer keeps the command name
    args = [
        "cmd",
        "m",
        "--cpu-mem",
        "1.5",
        "--ctx",
        "64",
        "--temperature",
        "0.5",
        "--no-think",
        "--extra",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["load"] == EngineOptions(cpu_mem=1.5, ctx=64)
    assert seen["reply"] == ReplyFlags(think=False, sampling={"temperature": 0.5})
    assert (seen["model"], seen["extra"]) == ("m", 4)
