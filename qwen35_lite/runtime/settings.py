"""The reply settings that /set, the sampling flags and /load share: their names, types and ranges.

The ranges keep the sampler finite: a temperature of 1e-45 or a penalty of 1e30 turns fp32 logits into
inf and the distribution into NaN, and torch seeds hold 64 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

THINK_MODES = ("on", "off", "hide")  # /think and a save's "think": thinking on, off, or on but not shown
MIN_TEMPERATURE = 1e-3  # below it (but above 0, which is greedy) logits / T overflow towards inf


@dataclass(frozen=True)
class Setting:
    kind: type
    low: float | None = None  # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    nullable: bool = False  # "none" is accepted (seed: fresh randomness each reply)
    zero_or_above: float | None = None  # 0, or at least this (temperature: 0 is greedy)
    high_text: str = ""  # how to write `high` when %g would round it


SETTINGS: dict[str, Setting] = {
    "temperature": Setting(float, low=0.0, high=100.0, zero_or_above=MIN_TEMPERATURE),
    "top_p": Setting(float, low=0.0, high=1.0),
    "top_k": Setting(int, low=0),
    "min_p": Setting(float, low=0.0, high=1.0),
    "presence_penalty": Setting(float, low=-100.0, high=100.0),
    "frequency_penalty": Setting(float, low=-100.0, high=100.0),
    "repetition_penalty": Setting(float, low=0.01, high=100.0),
    "seed": Setting(int, low=0, high=2**64 - 1, nullable=True, high_text="2^64 - 1"),
    "max_new_tokens": Setting(int, low=1),
}


def check_setting(key: str, value: object) -> None:
    """Raise InputError when `value` has the wrong type or is out of range for `key`."""
    s = SETTINGS[key]
    if value is None:
        if s.nullable:
            return
        raise InputError(f"{key} needs a value", f"e.g. /set {key} 1")
    if not _has_kind(value, s.kind):
        raise InputError(f"{key} takes a number, not {value!r}", f"pick {_range_text(s)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{key} must be a finite number, not {value}", f"pick {_range_text(s)}")
    bad = (
        (s.low is not None and value < s.low)
        or (s.high is not None and value > s.high)
        or (s.zero_or_above is not None and 0 < value < s.zero_or_above)
    )
    if bad:
        raise InputError(f"{key} must be {_range_text(s)}, not {value}", f"pick {_range_text(s)}")


def _has_kind(value: object, kind: type) -> bool:
    if isinstance(value, bool):  # True is an int to Python, not a number to a user
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _range_text(s: Setting) -> str:
    kind = "an int" if s.kind is int else "a float"
    if s.zero_or_above is not None:
        return f"0 (greedy) or {kind} between {s.zero_or_above:g} and {s.high:g}"
    if s.high is not None:
        return f"{kind} between {s.low:g} and {s.high_text or format(s.high, 'g')}"
    return f"{kind} of at least {s.low:g}"


def parse_setting(key: str, raw: str) -> object:
    """The value /set KEY RAW means, checked; InputError with a hint otherwise."""
    if key not in SETTINGS:
        raise InputError(f"unknown setting {key!r}", "one of: " + ", ".join(SETTINGS))
    s = SETTINGS[key]
    if s.nullable and raw.lower() in ("none", "off", "random"):
        return None
    try:
        value = s.kind(raw)
    except ValueError as e:
        raise InputError(f"{key} takes a {s.kind.__name__}, not {raw!r}", f"e.g. /set {key} 1") from e
    check_setting(key, value)
    return value
