"""A test seam, off unless QWEN35_LITE_SCRIPTED_REPLIES is set: replies given as text instead of sampled.

Random test weights never write a tool call, so the agent loop could not be driven end to end. With
`QWEN35_LITE_SCRIPTED_REPLIES=FILE` (a JSON list of strings), each reply generated in this process takes
the next string: its tokens are emitted as if sampled (through the real prefill, decode, detokeniser and
tool-call parser), then the first stop id; once the list is spent, replies are sampled again.
"""

from __future__ import annotations

import json
import os
import threading

ENV = "QWEN35_LITE_SCRIPTED_REPLIES"
_lock = threading.Lock()
_state: dict[str, object] = {"file": None, "replies": [], "next": 0}


def next_reply(tokenizer) -> list[int] | None:
    """The ids of the next scripted reply, or None (the seam is off, or its list is spent)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    with _lock:
        if _state["file"] != path:
            with open(path, encoding="utf-8") as f:
                _state.update(file=path, replies=json.load(f), next=0)
        replies, i = _state["replies"], _state["next"]
        if i >= len(replies):
            return None
        _state["next"] = i + 1
    return tokenizer.encode(replies[i])
