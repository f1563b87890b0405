"""Chat, saves and images against what a tester threw at them: EPS files named .png, huge image headers,
broken saves, unexpandable or NUL-holding paths, NaN settings, a full disk under /save, a closed stdout,
Ctrl+C and hidden thinking on a terminal. Each bad input ends as one error line and a hint, never a
traceback, and the conversation (and the next turn) goes on.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pty
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import EpsImagePlugin, Image, UnidentifiedImageError
from typer.testing import CliRunner

from qwen35_lite.cli import app
from qwen35_lite.cli.chat_repl import COMMANDS, Repl
from qwen35_lite.cli.ui import UI
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.errors import InputError
from qwen35_lite.model.vision.preprocess import MAX_IMAGE_PIXELS, load_image
from qwen35_lite.runtime import chat_file
from qwen35_lite.runtime.engine import Engine, EngineOptions
from qwen35_lite.runtime.sampling import SamplingParams
from qwen35_lite.runtime.session import ChatSession, ChatSettings
from qwen35_lite.runtime.settings import check_setting, parse_setting

ROOT = Path(__file__).resolve().parents[2]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    out = module_tmp("hardening") / "tiny"
    write_checkpoint(out, SyntheticSpec(), dtype=torch.float32)
    return out


@pytest.fixture(scope="module")
def engine(ckpt) -> Engine:
    return Engine.load(str(ckpt), EngineOptions(device="cpu", offline=True, ctx=512))


@pytest.fixture
def repl(engine) -> Repl:
    settings = ChatSettings(params=SamplingParams(temperature=0.0), max_new_tokens=3, think="off")
    return Repl(UI(), ChatSession(engine, settings))


def one_error(err: str, *words: str) -> None:
    """Exactly one `error:` line naming `words`, then its `hint:` line, and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), err
    for w in words:
        assert w in lines[0], err
    assert "Traceback" not in err


# ---- images --------------------------------------------------------------------------------------------


def test_an_eps_file_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    fake = tmp_path / "x.png"
    fake.write_bytes(EPS)
    calls = []

    def eps_open(self):
        calls.append("EpsImageFile._open")
        raise SyntaxError("recorded")

    def popen(*args, **kwargs):
        calls.append(f"Popen {args}")
        raise OSError("no external program may run")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", eps_open)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(InputError, match="not an image we read") as info:
        load_image(fake)
    assert "PNG, JPEG, WebP, GIF or BMP" in info.value.message and info.value.hint
    assert calls == []
    with pytest.raises(UnidentifiedImageError):  # the check can fail: a plain open tries the EPS plugin
        Image.open(fake)
    assert calls == ["EpsImageFile._open"]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (1-bit) and whose pixel data is a stub: never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    stub = zlib.compress(b"\0" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stub) + chunk(b"IEND", b""))


def test_a_huge_image_is_refused_from_its_header_without_pillow_warning(tmp_path):
    big = tmp_path / "big.png"
    _png_header_only(big, 12000, 12000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError) as info:
            load_image(big)
    assert caught == []
    assert (
        "12000x12000" in info.value.message
        and f"{MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel" in info.value.message
    )
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # Pillow's own check is back on afterwards


# ---- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, raw, words",
    [
        ("temperature", "nan", "finite"),
        ("temperature", "inf", "finite"),
        ("temperature", "1e-45", "0 (greedy) or a float between 0.001 and 100"),
        ("temperature", "101", "between 0.001 and 100"),
        ("top_p", "nan", "finite"),
        ("min_p", "-inf", "finite"),
        ("presence_penalty", "1e30", "between -100 and 100"),
        ("presence_penalty", "-nan", "finite"),
        ("repetition_penalty", "1e-45", "between 0.01 and 100"),
        ("repetition_penalty", "inf", "finite"),
        ("seed", str(2**64), "between 0 and 2^64 - 1"),
        ("seed", "-1", "between 0 and"),
        ("top_k", "-1", "at least 0"),
        ("max_new_tokens", "0", "at least 1"),
    ],
)
def test_set_refuses_values_that_break_sampling(key, raw, words):
    with pytest.raises(InputError) as info:
        parse_setting(key, raw)
    assert words in info.value.message + info.value.hint and info.value.hint


def test_set_accepts_the_edges_and_load_checks_types():
    assert parse_setting("temperature", "0") == 0.0
    assert parse_setting("temperature", "0.001") == 0.001
    assert parse_setting("seed", str(2**64 - 1)) == 2**64 - 1
    assert parse_setting("seed", "none") is None
    assert parse_setting("presence_penalty", "-1.5") == -1.5
    check_setting("temperature", 1)  # an int where a float goes: fine
    for key, value in (("temperature", "0.7"), ("top_k", 2.0), ("seed", True)):
        with pytest.raises(InputError, match="takes a number"):
            check_setting(key, value)


def test_run_flags_get_the_same_checks():
    for args in (("--temperature", "nan"), ("--seed", str(2**64)), ("--repetition-penalty", "1e-45")):
        r = CliRunner().invoke(app, ["run", "-m", "/nonexistent", *args, "hi"])
        assert r.exit_code == 2, (args, r.stderr)  # a usage error, before the model is even looked for
        assert "Traceback" not in r.stderr


# ---- chat commands: a table of bad input --------------------------------------------------------------


def _saves(d: Path) -> dict[str, Path]:
    """Broken save files, by name."""
    pic = d / "pic.png"
    Image.new("RGB", (8, 8)).save(pic)
    bodies = {
        "not_json": "{not json",
        "settings_5": {"messages": [], "settings": 5},
        "message_int": {"messages": [1]},
        "unknown_role": {"messages": [{"role": "bot", "content": "hi"}]},
        "system_number": {"messages": [], "settings": {"system": 5}},
        "content_number": {"messages": [{"role": "user", "content": 5}]},
        "gone_image": {"messages": [_image_turn(d / "gone.png")]},
        "dev_zero_image": {"messages": [_image_turn(Path("/dev/zero"))]},
        "nan_temperature": '{"messages": [], "settings": {"params": {"temperature": NaN}}}',
        "huge_seed": {"messages": [], "settings": {"params": {"seed": 2**70}}},
        "bad_think": {"messages": [], "settings": {"think": "maybe"}},
        "extra_key": {"messages": [], "colour": "blue"},
        "no_messages": {"settings": {}},
        "too_deep": "[" * 100_000 + "]" * 100_000,
        "valid_image": {"messages": [_image_turn(pic)]},  # fine, but this model cannot see
    }
    out = {}
    for name, body in bodies.items():
        out[name] = d / f"{name}.json"
        out[name].write_text(body if isinstance(body, str) else json.dumps(body))
    out["huge"] = d / "huge.json"
    out["huge"].write_text(json.dumps({"messages": [{"role": "user", "content": "x" * (9 << 20)}]}))
    out["fifo"] = d / "pipe.json"
    os.mkfifo(out["fifo"])
    out["device"] = d / "full.json"  # a character device of our own (/dev/full's numbers), in tmp
    try:
        os.mknod(out["device"], stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:  # no CAP_MKNOD: a second FIFO stands in
        os.mkfifo(out["device"])
    return out


def _image_turn(path: Path) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "?"}]}


BAD_COMMANDS = [
    ("/save ~nosuchuser/x.json", ["no such user"]),
    ("/load ~nosuchuser/x.json", ["no such user"]),
    ("/image ~nosuchuser/x.png", ["no such user"]),
    ("/save a\0b.json", ["NUL"]),
    ("/load a\0b.json", ["NUL"]),
    ("/image a\0b.png", ["NUL"]),
    ("/save {d}", ["cannot write", "a directory"]),
    ("/save {fifo}", ["cannot write", "not a regular file"]),
    ("/save {device}", ["cannot write", "not a regular file"]),
    ("/load {fifo}", ["a FIFO", "not a regular file"]),
    ("/load {d}/missing.json", ["no such file"]),
    ("/load {d}", ["not a regular file"]),
    ("/load /dev/zero", ["not a regular file"]),
    ("/load {not_json}", ["not a chat save", "not JSON"]),
    ("/load {settings_5}", ["not a chat save", '"settings" is a number']),
    ("/load {message_int}", ["not a chat save", "message 1 is a number"]),
    ("/load {unknown_role}", ["not a chat save", "role 'bot'"]),
    ("/load {system_number}", ["not a chat save", '"system" is a number']),
    ("/load {content_number}", ["not a chat save", "content is a number"]),
    ("/load {gone_image}", ["not a chat save", "no longer exists"]),
    ("/load {dev_zero_image}", ["not a chat save", "not a regular file"]),
    ("/load {nan_temperature}", ["not a chat save", "temperature must be a finite number"]),
    ("/load {huge_seed}", ["not a chat save", "seed must be"]),
    ("/load {bad_think}", ["not a chat save", "'maybe'"]),
    ("/load {extra_key}", ["not a chat save", "'colour'"]),
    ("/load {no_messages}", ["not a chat save", '"messages"']),
    ("/load {huge}", ["not a chat save", "over the 8 MiB limit"]),
    ("/load {too_deep}", ["not a chat save", "not JSON"]),
    ("/load {valid_image}", ["no vision tower"]),
    ("/set temperature nan", ["finite"]),
    ("/set seed 18446744073709551616", ["seed must be"]),
]


def test_bad_commands_are_one_line_and_keep_the_chat(repl, tmp_path, capsys):
    files = {k: str(v) for k, v in _saves(tmp_path).items()}
    repl.handle("first message")
    history = json.dumps(repl.session.messages)
    settings = repr(repl.session.settings)
    assert len(repl.session.messages) == 2
    capsys.readouterr()
    for line, words in BAD_COMMANDS:
        repl.handle(line.format(d=tmp_path, **files))
        one_error(capsys.readouterr().err, *words)
        assert json.dumps(repl.session.messages) == history, line
        assert repr(repl.session.settings) == settings, line
        assert not repl.done
    repl.handle("next message")  # the next turn answers, on top of the kept history
    assert [m["content"] for m in repl.session.messages[::2]] == ["first message", "next message"]


def test_save_never_replaces_what_is_not_a_regular_file(repl, tmp_path, monkeypatch, capsys):
    """A FIFO, a device and a link to /dev/null stay what they were (as root, a rename over /dev/null
    would replace the system's): the temporary file is never renamed over them, nor left behind."""
    files = _saves(tmp_path)
    link = tmp_path / "null.json"
    link.symlink_to("/dev/null")
    real_replace = os.replace

    def only_in_tmp(src, dst, *a, **k):  # a safety net should the check ever regress
        assert Path(dst).resolve().is_relative_to(tmp_path.resolve()), dst
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(chat_file.os, "replace", only_in_tmp)
    before = sorted(p.name for p in tmp_path.iterdir())
    repl.handle("hello")
    capsys.readouterr()
    for target, kind in ((files["fifo"], "a FIFO"), (link, "a character device"), (tmp_path, "a directory")):
        repl.handle(f"/save {target}")
        one_error(capsys.readouterr().err, "cannot write", kind)
    assert stat.S_ISFIFO(files["fifo"].stat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left
    repl.handle(f"/save {tmp_path / 'fine.json'}")  # a regular path still saves
    assert json.loads((tmp_path / "fine.json").read_text())["messages"][0]["content"] == "hello"


def test_a_space_after_the_slash_is_no_command(repl, tmp_path, monkeypatch, capsys):
    """As in ollama, "/ save x" is an unknown command "/": never /save x, and not sent to the model."""
    monkeypatch.chdir(tmp_path)
    repl.handle("/ save x.json")
    repl.handle("/\tsave x.json")
    err = capsys.readouterr().err
    assert err.count("Unknown command '/'.") == 2 and "error" not in err
    assert not (tmp_path / "x.json").exists() and repl.session.messages == []
    repl.handle("/save  x.json")  # extra spaces after the name are fine
    assert (tmp_path / "x.json").is_file()


def test_load_decodes_the_images_of_a_save_before_taking_it(repl, tmp_path, monkeypatch, capsys):
    fake = tmp_path / "x.png"
    fake.write_bytes(EPS)
    saved = tmp_path / "c.json"
    saved.write_text(json.dumps({"messages": [_image_turn(fake), {"role": "assistant", "content": "ok"}]}))
    monkeypatch.setattr(repl.session.engine, "check_vision", lambda: None)  # as if the model could see
    repl.handle(f"/load {saved}")
    one_error(capsys.readouterr().err, "x.png", "not an image we read")
    assert repl.session.messages == []


def test_an_unexpected_error_in_a_command_is_one_line(repl, monkeypatch, capsys):
    def broken(r, arg):
        raise RuntimeError("boom")

    monkeypatch.setitem(COMMANDS, "stats", dataclasses.replace(COMMANDS["stats"], handler=broken))
    repl.handle("/stats")
    one_error(capsys.readouterr().err, "/stats failed", "boom")
    assert not repl.done


def test_a_good_save_loads_back(repl, tmp_path, capsys):
    saved = tmp_path / "c.json"
    repl.handle("hello")
    repl.handle(f"/save '{saved}'")  # quotes are removed, as for /image
    repl.handle("/clear")
    repl.handle(f"/load {saved}")
    assert "loaded 2 messages" in capsys.readouterr().err
    assert repl.session.messages[0]["content"] == "hello"


def test_a_failed_save_leaves_the_old_file_whole(repl, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "c.json"
    repl.handle("hello")
    repl.handle(f"/save {saved}")
    saved.chmod(0o640)
    before = saved.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chat_file.os, "fsync", full_disk)
    repl.handle("more")
    capsys.readouterr()
    repl.handle(f"/save {saved}")
    one_error(capsys.readouterr().err, "cannot write", "No space left on device")
    assert saved.read_bytes() == before  # the old save, whole
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind
    monkeypatch.undo()
    repl.handle("again")  # the chat goes on, and the next save holds everything
    repl.handle(f"/save {saved}")
    assert len(json.loads(saved.read_text())["messages"]) == 6
    assert saved.stat().st_mode & 0o777 == 0o640  # the file keeps its permissions


def test_a_save_over_the_context_is_refused(engine, tmp_path, capsys):
    saved = tmp_path / "long.json"
    words = " ".join(["word"] * (engine.max_context + 10))
    saved.write_text(json.dumps({"messages": [{"role": "user", "content": words}]}))
    repl = Repl(UI(), ChatSession(engine, ChatSettings(params=SamplingParams(), max_new_tokens=2)))
    repl.handle(f"/load {saved}")
    one_error(capsys.readouterr().err, "tokens, over the context")
    assert repl.session.messages == []


# ---- through a pipe, in a real process -----------------------------------------------------------------


@pytest.mark.slow
def test_chat_through_a_pipe_with_broken_input_and_stdout_closed(ckpt, tmp_path):
    """Every turn completes though nobody reads stdout (`| head -c 0`), errors are one line each, and the
    final /save holds every turn."""
    files = {k: str(v) for k, v in _saves(tmp_path).items()}
    saved = tmp_path / "final.json"
    lines = ["first message", *(line.format(d=tmp_path, **files) for line, _ in BAD_COMMANDS)]
    lines += ["second message", f"/save {saved}"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    p = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "chat", "-m", ckpt, "-n", "6", "--no-think", "-t", "0"],
        input="\n".join(lines) + "\n",
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    os.close(write_end)
    err = p.stderr
    assert p.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.count("error: ") == len(BAD_COMMANDS) and err.count("hint: ") == len(BAD_COMMANDS)
    assert err.count("stdout was closed") == 1
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages[::2]] == ["first message", "second message"]
    assert all(m["role"] == "assistant" for m in messages[1::2])


# ---- on a terminal ---------------------------------------------------------------------------------------


class Terminal:
    """The chat in a pseudo-terminal: stdin, stdout and stderr are all a TTY, as for a person."""

    def __init__(self, args: list) -> None:
        master, slave = pty.openpty()
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40")
        self.p = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master, self.seen = master, ""

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if m := re.search(pattern, self.seen):
                return m
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    break
        raise AssertionError(f"{pattern!r} never appeared; the terminal showed: {self.seen[-3000:]!r}")

    def close(self) -> None:
        self.p.kill()
        self.p.wait(timeout=30)
        os.close(self.master)


@pytest.mark.slow
def test_hidden_thinking_shows_a_transient_progress_line_on_a_terminal(ckpt):
    term = Terminal(["chat", "-m", ckpt, "-n", "30", "--hide-thinking", "-t", "0"])
    try:
        term.wait_for(">>> ")
        term.send("think about it\n")
        term.wait_for(r"thinking… \d+ tokens, \d+ s")
        term.wait_for("reply 30 tok")  # random weights think all along: the reply ends at the cap
        after = term.seen[term.seen.rindex("thinking…") :].split("reply 30 tok")[0]
        assert "\x1b[1A\x1b[2K" in after  # the line is erased (cursor up, clear line) before the stats
        assert "Thinking..." not in term.seen  # none of the thinking text itself
    finally:
        term.close()


@pytest.mark.slow
def test_first_ctrl_c_says_stopping_at_once_on_a_terminal(ckpt):
    term = Terminal(["chat", "-m", ckpt, "-n", "100000"])
    try:
        term.wait_for(">>> ")
        term.send("tell me a long story\n")
        term.wait_for("Thinking...")
        term.p.send_signal(signal.SIGINT)
        term.wait_for("stopping…")
        term.wait_for(r"\[stopped\]")
        assert term.seen.index("stopping…") < term.seen.index("[stopped]")
        assert "Traceback" not in term.seen
    finally:
        term.close()
