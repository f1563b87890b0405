"""A prefix cache of model states, so a resent conversation feeds only its new tokens.

Agents resend the whole conversation with every request. The model state after a token sequence is the
KV cache of the attention layers plus the fixed-size DeltaNet state of the others (`ModelCache`). DeltaNet
state cannot be rewound to an earlier position, so states are kept as snapshots at the points where
requests branch, and a request whose ids begin with a kept sequence resumes from a copy of its snapshot.

Where to save (the server's protocol):
- after each reply: the state once the reply is fed (`cache.token_ids`, the last sampled token is unfed);
  the next request, `prompt + reply + tool result`, begins with it;
- after each prompt *but its last token*, `prompt[:-1]`: `match` only returns a sequence shorter than the
  request (one token at least must be fed to get logits), so the state after the whole prompt would never
  serve an identical resend (a retry, a regenerate). The state after `prompt[:-1]` serves it by feeding one
  token, and serves any request that extends the prompt too. So the server prefills `prompt[:-1]`, saves,
  then feeds the last token as a one-token prompt (a text token: the template ends the prompt with the
  assistant header, so image embeddings, positions and rope_delta all belong to the first part).

Images: their placeholder ids are the same whatever the picture, so equal ids do not mean equal states.
`key` must be equal for a hit: the server passes a hash of the bytes of every image in the request (in
order), and "" for text-only requests; states of text and image requests never mix.

Snapshots live on the model's device; `max_bytes` is what the memory plan leaves free (the server sizes it).
Bytes are the only bound: a small model's states are small, so many are kept; there is no count limit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from qwen35_lite.model.cache import ModelCache


@dataclass
class _Snapshot:
    ids: tuple[int, ...]
    key: str
    state: ModelCache
    nbytes: int


class PrefixCache:
    """Snapshots of model states keyed by (key, token ids), least recently used evicted first.

    Thread-safe: one lock around every operation (a server may answer from several threads)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], _Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def match(self, ids: list[int], key: str = "") -> tuple[ModelCache | None, int]:
        """The longest kept sequence that is a prefix of `ids` (and shorter than `ids`: at least one token
        must remain to be fed, to get logits): (a fresh copy of its state, its length), or (None, 0).
        Only snapshots saved with the same `key` (hash of the request's images, "" without) can match."""
        wanted = tuple(ids)
        with self._lock:
            best = max(
                (s for s in self._entries.values() if s.key == key and _proper_prefix(s.ids, wanted)),
                key=lambda s: len(s.ids),
                default=None,
            )
            if best is None:
                return None, 0
            self._entries.move_to_end((best.key, best.ids))
            return best.state.clone(), len(best.ids)

    def save(self, ids: list[int], cache: ModelCache, key: str = "") -> None:
        """Keep a copy of `cache`, the state after exactly `ids` (cache.offset == len(ids)); evict least
        recently used entries to stay within max_bytes; a state larger than max_bytes alone is
        not kept. `key`: as in `match`."""
        if cache.offset != len(ids):
            raise ValueError(
                f"the state has fed {cache.offset} tokens, not the {len(ids)} ids it is saved under"
            )
        size = cache.used_nbytes
        if size > self.max_bytes:
            return
        name = (key, tuple(ids))
        with self._lock:
            self._entries.pop(name, None)
            # Evict before copying: the snapshots may use all the device memory the plan left free.
            while self._entries and self._total() + size > self.max_bytes:
                self._entries.popitem(last=False)
            state = cache.clone()
            state.token_ids = list(ids)  # the ids are the truth: a raw forward does not record them
            self._entries[name] = _Snapshot(name[1], key, state, size)

    def holds(self, ids: list[int] | tuple[int, ...], key: str = "") -> bool:
        """Whether the state after exactly `ids` (saved under `key`) is still kept; touches nothing."""
        with self._lock:
            return (key, tuple(ids)) in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept snapshots (KV up to each one's length, DeltaNet state whole)."""
        with self._lock:
            return self._total()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _total(self) -> int:
        return sum(s.nbytes for s in self._entries.values())


def _proper_prefix(prefix: tuple[int, ...], ids: tuple[int, ...]) -> bool:
    return len(prefix) < len(ids) and ids[: len(prefix)] == prefix
