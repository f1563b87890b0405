"""The sandbox chat templates render in: jinja2's immutable sandbox with bounds on work and size, so a broken
or hostile template (nested `range(100000)` loops, `'a' * 10**11`, a string doubled 40 times, `10**10**10`)
fails in one line instead of hanging the process or exhausting its memory.

Bounds: every string, list or integer an operator (`*`, `**`, `+`, `%`, `~`), a call or a filter builds; the
rendered text; and the wall clock of one render, checked at every loop iteration and every call.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 16 << 20  # longest string or list a template may build, and longest prompt it may render
# (4M tokens or more: past any context; a list that long is 128 MiB of pointers)
MAX_INT_BITS = 1 << 16  # largest integer it may build (about 20,000 digits)
RENDER_SECONDS = 10.0  # the real Qwen3.5 template renders a 2,000-message chat in well under a second
# A %-format spec: flags, then width and precision, each digits or `*` (taken from the arguments).
PERCENT_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
FORMAT_FIELD = re.compile(r"\{[^{}]*\}")


class TemplateLimitError(Exception):
    """A template went past one of the bounds above; the message says which."""


def check_size(value: Any) -> Any:
    """Return `value`, or raise when it is a string, list or integer past the bounds."""
    if isinstance(value, str | list | tuple | dict | bytes) and len(value) > MAX_CHARS:
        unit = "characters" if isinstance(value, str) else "items"
        raise TemplateLimitError(f"builds a value of {len(value)} {unit} (limit {MAX_CHARS})")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"builds an integer of {value.bit_length()} bits (limit {MAX_INT_BITS})")
    return value


def _check_operands(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be past the bounds, before computing it."""
    ints = type(left) in (int, bool) and type(right) in (int, bool)
    if operator == "**" and ints and right > 0 and abs(left) > 1:
        if right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
            raise TemplateLimitError(f"computes a power with {right} as exponent (too large)")
    elif operator == "*" and ints:
        if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise TemplateLimitError("multiplies integers past the size limit")
    elif operator == "*":
        sized, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(count, int) and hasattr(sized, "__len__") and len(sized) * count > MAX_CHARS:
            raise TemplateLimitError(f"repeats a value {count} times (limit {MAX_CHARS} items)")
    elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
        check_size(left), check_size(right)
        if len(left) + len(right) > MAX_CHARS:
            raise TemplateLimitError(f"joins values past {MAX_CHARS} items")
    elif operator == "%" and isinstance(left, str):
        _check_percent_specs(left)


def _check_percent_specs(text: str) -> None:
    """%-format specs (`%999999999d`, `%*d`) asking for more than MAX_CHARS characters."""
    for width in (n for spec in PERCENT_SPEC.finditer(text) for n in spec.groups() if n):
        if width == "*" or _too_wide(width):
            raise TemplateLimitError(f"formats with a field width of {width[:20]} (limit {MAX_CHARS})")


def _check_format_fields(text: str) -> None:
    """str.format fields (`{:999999999}`) asking for more than MAX_CHARS characters."""
    for field in FORMAT_FIELD.finditer(text):
        if any(_too_wide(n) for n in re.findall(r"\d+", field.group())):
            raise TemplateLimitError(f"formats with a field {field.group()[:30]} wider than {MAX_CHARS}")


def _too_wide(digits: str) -> bool:
    return len(digits) > len(str(MAX_CHARS)) or int(digits) > MAX_CHARS  # no int() of 5,000 digits


def _check_arguments(args: tuple, kwargs: dict) -> None:
    """A call or filter argument past MAX_CHARS asks for that much output (center, indent, ljust, ...)."""
    for value in (*args, *kwargs.values()):
        if type(value) is int and abs(value) > MAX_CHARS:
            raise TemplateLimitError(f"passes {value} to a function (limit {MAX_CHARS})")


def limited_filter(fn: Callable) -> Callable:
    """`fn` as a filter whose size arguments and result are bounded."""
    # Filters taking a context or environment get it first, then the value: only later arguments are sizes.
    skip = 2 if getattr(fn, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(fn)  # keeps jinja_pass_arg, so Jinja still passes the context
    def limited(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args[skip:], kwargs)
        return check_size(fn(*args, **kwargs))

    return limited


def _checked_format(fn: Callable) -> Callable:
    """The `format` filter (`'%5d'|format(x)`, a %-format) with its widths checked first."""

    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            _check_percent_specs(value)
        return fn(value, *args, **kwargs)

    return checked


class _CheckedConcat(CodeGenerator):
    """Compiles `a ~ b` to environment.checked(...): `~` is not an operator the sandbox can intercept."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Ticking:
    """A for loop's iterable that checks the render deadline at every item (its length is the original's,
    so `loop.length` and `loop.last` behave as before)."""

    def __init__(self, env: LimitedSandbox, iterable: Any) -> None:
        self.env, self.iterable = env, iterable

    def __len__(self) -> int:
        return len(self.iterable)  # TypeError when it has none: LoopContext then counts the items

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            self.env.tick()
            yield item


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with size bounds on operators, `~`, calls and filters, and a deadline
    checked at every loop iteration and every call (the only ways a template spends unbounded time)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})  # also stops compile-time folding of `10**10**10`
    code_generator_class = _CheckedConcat

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: limited_filter(fn) for name, fn in self.filters.items()}
        self.filters["format"] = limited_filter(_checked_format(self.filters["format"]))
        self.deadline, self.seconds = math.inf, RENDER_SECONDS

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # `for x in xs` runs as `for x in environment.ticking(xs)`
            loop.iter = nodes.Call(
                nodes.EnvironmentAttribute("ticking"), [loop.iter], [], None, None, lineno=loop.lineno
            )
        return tree

    def ticking(self, iterable: Any) -> _Ticking:
        return _Ticking(self, iterable)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"ran for more than {self.seconds:g} s")

    def render_bounded(self, template: Template, **variables: Any) -> str:
        """`template.render(**variables)`, under the deadline and the size bound on the text."""
        self.seconds = RENDER_SECONDS  # read at each render, so a test can shorten it
        self.deadline = time.monotonic() + self.seconds
        try:
            parts, total = [], 0
            for chunk in template.generate(**variables):
                total += len(chunk)
                if total > MAX_CHARS:
                    raise TemplateLimitError(f"renders more than {MAX_CHARS} characters")
                parts.append(chunk)
            return "".join(parts)
        finally:
            self.deadline = math.inf

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_operands(operator, left, right)
        return check_size(super().call_binop(context, operator, left, right))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        self.tick()
        _check_arguments(args, kwargs)
        return check_size(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_fields(value.__self__)
        return wrapped

    @staticmethod
    def checked(value: Any) -> Any:
        return check_size(value)
