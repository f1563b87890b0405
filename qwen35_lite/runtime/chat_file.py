"""The file /save writes and /load reads: written atomically, read back only after checking all of it.

A save is `{"messages": [...], "settings": {...}}`: user and assistant turns as the chat template takes them
(user content may be text and image parts), an agent's tool calls (`tool_calls` of an assistant turn, each
`{"id", "type": "function", "function": {"name", "arguments": {...}}}`) and their results (`tool` turns,
text or image and text parts), and the ChatSettings fields. A file that passes `read_save`
renders and runs: wrong types, unknown roles or keys, out-of-range settings and images that are not
regular files are refused here with the reason, not at every later turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import InputError
from .sampling import SamplingParams
from .settings import THINK_MODES, check_setting
from .user_files import MiB, check_write_target, default_file_mode, read_user_file

MAX_SAVE_BYTES = 8 * MiB  # the text of a full 262k-token context is ~1 MB: this leaves room for thinking
ROLES = ("user", "assistant", "tool")
MESSAGE_KEYS = {
    "user": ("role", "content"),
    "assistant": ("role", "content", "reasoning_content", "tool_calls"),
    "tool": ("role", "content", "tool_call_id", "name"),
}
SETTING_KEYS = ("params", "max_new_tokens", "think", "system", "raw")  # ChatSettings' fields


# ---- writing ---------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`: a reader (or a
    crash, or a full disk) sees the old file or the new one, never a truncated mix."""
    target = path.resolve()  # through a symlink: replace the file it names, not the link
    check_write_target(target)  # never a device, FIFO, socket or directory (nor a link to one)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(target))
        check_write_target(target)  # again: it may have appeared while the text was written
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _mode_for(target: Path) -> int:
    """The old file's permissions, or what a plain open() would give (mkstemp makes 0600)."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return default_file_mode()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: some file systems refuse to open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- reading ---------------------------------------------------------------------------------------


@dataclass
class SavedChat:
    messages: list[dict]
    settings: dict  # the keys present in the file, each checked


class NotASave(ValueError):
    """The reason a file is not a chat save."""


def read_save(path: Path) -> SavedChat:
    """Read and check a file written by /save; InputError telling a missing file from a bad one."""
    data = _read_json(path)
    try:
        return parse_save(data)
    except NotASave as e:
        raise InputError(
            f"not a chat save: {path}: {e}", "pass a file written by /save (the current conversation is kept)"
        ) from None


def _read_json(path: Path) -> object:
    raw = read_user_file(path, "not a chat save:", MAX_SAVE_BYTES, "pass a file written by /save")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, a 5000-digit number, nesting too deep
        raise InputError(
            f"not a chat save: {path} is not JSON ({e})", "pass a file written by /save"
        ) from None


def parse_save(data: object) -> SavedChat:
    """The checked content of a save; NotASave(reason) at the first problem."""
    if not isinstance(data, dict):
        raise NotASave(f"the file holds {_kind(data)}, not an object")
    _no_unknown_keys(data, ("messages", "settings"), "the file")
    if "messages" not in data:
        raise NotASave('it has no "messages" list')
    messages = data["messages"]
    if not isinstance(messages, list):
        raise NotASave(f'"messages" is {_kind(messages)}, not a list')
    for i, message in enumerate(messages):
        _check_message(message, f"message {i + 1}")
    settings = data.get("settings", {})
    _check_settings(settings)
    return SavedChat(messages, settings)


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _no_unknown_keys(d: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise NotASave(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")


def _check_message(message: object, where: str) -> None:
    if not isinstance(message, dict):
        raise NotASave(f"{where} is {_kind(message)}, not an object")
    role = message.get("role")
    if role not in ROLES:
        raise NotASave(f"{where} has role {role!r}; a save holds user, assistant and tool turns")
    _no_unknown_keys(message, MESSAGE_KEYS[role], where)
    content = message.get("content")
    if role != "assistant" and isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(part, f"{where}, part {j + 1}")
    elif not isinstance(content, str):
        raise NotASave(f"{where}'s content is {_kind(content)}, not text")
    if not isinstance(message.get("reasoning_content", ""), str):
        raise NotASave(f"{where} has reasoning_content that is not text")
    for key in ("tool_call_id", "name"):
        if not isinstance(message.get(key, ""), str):
            raise NotASave(f"{where} has a {key} that is not text")
    calls = message.get("tool_calls", [])
    if not isinstance(calls, list):
        raise NotASave(f"{where}'s tool_calls is {_kind(calls)}, not a list")
    for j, call in enumerate(calls):
        _check_call(call, f"{where}, tool call {j + 1}")


def _check_call(call: object, where: str) -> None:
    """{"id", "type": "function", "function": {"name", "arguments": {...}}}, as the template renders it."""
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise NotASave(f'{where} is not a {{"type": "function"}} object')
    _no_unknown_keys(call, ("id", "type", "function"), where)
    function = call.get("function")
    if not isinstance(function, dict):
        raise NotASave(f'{where} has no "function" object')
    _no_unknown_keys(function, ("name", "arguments"), where)
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise NotASave(f"{where} has no name")
    if not isinstance(function.get("arguments", {}), dict):
        raise NotASave(f"{where}'s arguments are {_kind(function['arguments'])}, not an object")
    if not isinstance(call.get("id", ""), str):
        raise NotASave(f"{where} has an id that is not text")


def _check_part(part: object, where: str) -> None:
    if not isinstance(part, dict) or part.get("type") not in ("text", "image", "video"):
        raise NotASave(
            f'{where} is not a {{"type": "text"}}, {{"type": "image"}} or {{"type": "video"}} part'
        )
    kind = part["type"]
    # a video part may carry its sampling (session.user_message writes them; session._video_part checks them)
    _no_unknown_keys(part, ("type", kind, "fps", "max_frames") if kind == "video" else ("type", kind), where)
    value = part.get(kind)
    if not isinstance(value, str) or (kind != "text" and not value):
        raise NotASave(f"{where} has no {'text' if kind == 'text' else 'file path'}")
    if kind != "text":
        _check_image_file(value, where, kind)


def _check_image_file(name: str, where: str, kind: str = "image") -> None:
    """The image (or video) must still be a regular file (not gone, not /dev/zero); ChatSession.load then
    decodes it (a video: reads its metadata)."""
    if "\0" in name:
        raise NotASave(f"{where}: an {kind} path holds a NUL byte".replace("an video", "a video"))
    try:
        path = Path(name).expanduser()
        exists, regular = path.exists(), path.is_file()
    except (OSError, RuntimeError):  # an unknown ~user, a name too long
        exists = regular = False
    if not regular:
        raise NotASave(f"{where}: {kind} {name} {'is not a regular file' if exists else 'no longer exists'}")


def _check_settings(settings: object) -> None:
    if not isinstance(settings, dict):
        raise NotASave(f'"settings" is {_kind(settings)}, not an object')
    _no_unknown_keys(settings, SETTING_KEYS, '"settings"')
    params = settings.get("params", {})
    if not isinstance(params, dict):
        raise NotASave(f'"settings.params" is {_kind(params)}, not an object')
    _no_unknown_keys(params, tuple(f.name for f in fields(SamplingParams)), '"settings.params"')
    values = {**params, **{k: settings[k] for k in ("max_new_tokens",) if k in settings}}
    for key, value in values.items():
        try:
            check_setting(key, value)
        except InputError as e:
            raise NotASave(f"settings: {e.message}") from None
    if settings.get("think", "on") not in THINK_MODES:
        raise NotASave(f'"think" is {settings["think"]!r}, not one of {", ".join(THINK_MODES)}')
    if not isinstance(settings.get("system", ""), (str, type(None))):
        raise NotASave(f'"system" is {_kind(settings["system"])}, not text')
    if not isinstance(settings.get("raw", False), bool):
        raise NotASave(f'"raw" is {_kind(settings["raw"])}, not true or false')
