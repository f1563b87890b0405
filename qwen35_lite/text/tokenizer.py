"""The Qwen3.5 byte-level BPE tokenizer (via the `tokenizers` library) and streaming detokenisation.

Every Qwen3.5 model shares one vocabulary, so a checkpoint without `tokenizer.json` falls back to the copy
packaged in `assets/tokenizer.json.gz`.
"""

from __future__ import annotations

import functools
import gzip
import re
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import CheckpointError

PACKAGED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer.json.gz"


class Tokenizer:
    """Text <-> ids. No BOS is added; special tokens written in the text (<|im_start|>) encode as one id."""

    def __init__(self, backend: _HFTokenizer, source: str = "checkpoint") -> None:
        self._tok = backend
        self.source = source  # "checkpoint" or "built-in"
        self._bytes: tuple[list[bytes], list[int]] | None = None  # token_bytes' table, built on first use

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """The checkpoint's tokenizer.json, else the packaged Qwen3.5 tokenizer."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            return cls(_packaged_backend(), source="built-in")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or a bad model section
            raise CheckpointError(
                f"cannot read {path}: {exc}",
                "the file is corrupt or incomplete (a git-lfs pointer?); download it again, "
                "or delete it to use the built-in Qwen3.5 tokenizer",
            ) from exc
        return cls(backend, source="checkpoint")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(as_valid_text(text), add_special_tokens=False).ids

    def tokens_over(self, text: str, limit: int) -> int | None:
        """How many tokens `text` takes, counted only as far as `limit` (None when it takes fewer).

        A huge text is never tokenised whole (10 MB of prompt took 1.7 GiB that way): it is counted in
        pieces of about COUNT_PIECE characters, cut where a whitespace run starts (where the pre-tokenizer
        splits anyway, so a piece is tokenised as in the whole text). A piece cut inside a word instead may
        count more than its share: CUT_SLACK tokens are taken off for each, so a text refused here is over
        the limit when tokenised whole too.
        """
        if len(text.encode("utf-8", "surrogatepass")) < limit:  # a token is at least one byte
            return None
        count = slack = start = 0
        while start < len(text) and count - slack < limit:
            end, clean = _cut(text, start + COUNT_PIECE)
            count += len(self.encode(text[start:end]))
            slack += 0 if clean else CUT_SLACK
            start = end
        return count - slack if count - slack >= limit else None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """Id of a token string (special tokens included), or None when the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    def token_bytes(self, n_vocab: int) -> tuple[list[bytes], list[int]]:
        """(the bytes of every id below n_vocab, the ids of special tokens): what a constrained decoder
        matches tokens against and what log probabilities report. Ids the vocabulary lacks (the padded end
        of an embedding table) are b"". Built once per tokenizer (a second or two), then cut to n_vocab."""
        table, special = self._table()
        out = table[:n_vocab] + [b""] * (n_vocab - len(table))
        return out, [i for i in special if i < n_vocab]

    def bytes_of(self, token: int) -> bytes:
        """One id's bytes, from token_bytes' table (b"" for an id outside the vocabulary)."""
        table = self._table()[0]
        return table[token] if 0 <= token < len(table) else b""

    def _table(self) -> tuple[list[bytes], list[int]]:
        if self._bytes is None:
            self._bytes = self._all_token_bytes()
        return self._bytes

    def _all_token_bytes(self) -> tuple[list[bytes], list[int]]:
        """Every id's bytes and the special ids. Byte-level BPE writes each byte as one printable character
        (GPT-2's table); added tokens are their text."""
        table = str.maketrans(_BYTE_CHARS)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        out = [b""] * (max(vocab.values(), default=-1) + 1)
        added = self._tok.get_added_tokens_decoder()
        for text, i in vocab.items():
            out[i] = text.encode() if i in added else text.translate(table).encode("latin-1")
        return out, [i for i, t in added.items() if t.special]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included (the embedding table may be padded beyond it)."""
        return self._tok.get_vocab_size(with_added_tokens=True)


def _byte_chars() -> dict[str, str]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte -> the byte
    (as a latin-1 character, so a whole token translates in one str.translate)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    chars = {chr(b): chr(b) for b in kept}
    chars.update({chr(256 + n): chr(b) for n, b in enumerate(shifted)})
    return chars


_BYTE_CHARS = _byte_chars()

COUNT_PIECE = 1 << 16  # characters tokenised at once when a long text is counted (tokens_over)


CUT_SLACK = 16  # tokens a cut inside a word may add (both halves re-merged from their bytes)


def _cut(text: str, end: int) -> tuple[int, bool]:
    """(where the piece ending near `end` stops, whether that is at the start of a whitespace run)."""
    if end >= len(text):
        return len(text), True
    space = max(text.rfind(c, end - COUNT_PIECE // 2, end) for c in " \n\t")
    while space > 0 and text[space - 1].isspace():
        space -= 1
    return (space, True) if space > end - COUNT_PIECE // 2 else (end, False)


def as_valid_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD: tokenizers accepts only valid Unicode.

    Python turns bytes that are not UTF-8 in argv (and in streams opened with surrogateescape) into
    lone surrogates; those bytes become U+FFFD, as a UTF-8 decoder with errors="replace" would give.
    """
    if not _SURROGATE.search(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes (e.g. from JSON "\\ud800")
        return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


@functools.cache
def _packaged_backend() -> _HFTokenizer:
    # Parsing the 33 MB JSON takes a second or two; the backend is never mutated, so one copy is shared.
    # From the bytes, not a str: decoding to a str left ~100 MiB more held (RssAnon 384 vs 280 MiB).
    with gzip.open(PACKAGED_TOKENIZER, "rb") as f:
        return _HFTokenizer.from_buffer(f.read())


class StreamDecoder:
    """Incremental detokenisation: push(id) returns only completed text, never half a UTF-8 character.

    Byte-level BPE can split one character over several tokens, and decoding those alone yields U+FFFD.
    As in text-generation-inference / mlx-lm, we decode a short window: ids[prefix:read] (already emitted,
    kept as context) and ids[prefix:] (with the new ids); the difference is the new text, held back while it
    ends in U+FFFD. Ids before the window are dropped, so each push costs O(window), not O(reply).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read :]  # the newly emitted ids become the next window's context
        self._prefix, self._read = 0, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD, as decode() would give)."""
        emitted = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(emitted) :]
