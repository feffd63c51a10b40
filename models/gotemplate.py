"""A parser and evaluator for the Go text/template subset that Ollama Modelfile TEMPLATEs use.

Ollama renders prompts with Go's text/template (option ``missingkey=zero``, plus the Ollama
functions ``json``, ``currentDate`` and ``toTypeScriptType``). Models published for Ollama depend on
its exact byte output, so this module follows Go's lexer, parser and evaluator rules closely: trim
markers, comments, variable scoping, pipelines, ``if``/``with``/``range`` with ``else`` chains,
``break``/``continue``, the builtin functions, Go's truthiness and fmt/JSON formatting.

Values are plain Python data (``str``, ``int``, ``float``, ``bool``, ``None``, lists, dicts) plus a
few wrappers that stand in for Go types whose behaviour templates can observe: :class:`GoStruct`
(fields in declaration order, JSON tags, optional ``String()`` method), :class:`OrderedMap`
(insertion-ordered map), :class:`JSONOrderedMap` / :class:`JSONList` (values whose ``String()`` is
their JSON) and :class:`PropertyType`.

Deliberate difference from Go: a missing map key or unknown struct field evaluates to
:data:`MISSING`, which is falsy and prints as the empty string (Go prints ``<no value>`` for a
missing map key; templates only ever test such values).

Every failure (syntax, evaluation, limits) raises :class:`TemplateError` carrying the position, so
callers can turn it into an HTTP 400. Work is bounded by ``max_steps`` and ``max_output``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json as _json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, NamedTuple
from urllib.parse import quote_plus

__all__ = [
    "BUILTIN_FUNCS",
    "MAX_DEPTH",
    "MAX_OUTPUT_CHARS",
    "MAX_STEPS",
    "MISSING",
    "GoStruct",
    "JSONList",
    "JSONOrderedMap",
    "OrderedMap",
    "PropertyType",
    "Template",
    "TemplateError",
    "go_json",
    "go_sprint",
    "go_sprintf",
    "parse",
]

MAX_OUTPUT_CHARS: Final = 16 * 1024 * 1024
"""Default cap on rendered characters (and, times four, on characters built by functions)."""
MAX_STEPS: Final = 2_000_000
"""Default cap on evaluation steps (nodes walked, range iterations, function calls)."""
MAX_DEPTH: Final = 100
"""Cap on nesting of control structures and parenthesised pipelines (keeps recursion bounded)."""


class TemplateError(ValueError):
    """A template that does not parse or cannot be executed; ``pos`` is a 0-based offset or None."""

    def __init__(self, message: str, pos: int | None = None, source: str | None = None) -> None:
        self.message = message
        self.pos = pos
        self.line: int | None = None
        self.col: int | None = None
        if pos is not None and source is not None:
            pos = max(0, min(pos, len(source)))
            self.line = source.count("\n", 0, pos) + 1
            self.col = pos - (source.rfind("\n", 0, pos) + 1) + 1
        where = f"{self.line}:{self.col}: " if self.line is not None else ""
        super().__init__(f"template: {where}{message}")


class _Missing:
    """Result of a missing key/field: falsy, prints as empty text, compares like Go nil."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


# --------------------------------------------------------------------------------------------------
# Value wrappers for Go types


class GoStruct:
    """A Go struct value: fields in declaration order, JSON tags, and an optional JSON ``String()``.

    ``fields`` holds ``(go_name, value, json_name, omitempty)``; an empty ``json_name`` keeps the
    field out of JSON. Structs are always truthy, like in Go.
    """

    __slots__ = ("_json", "stringer", "type_name", "values")

    def __init__(self, type_name: str, fields: Iterable[tuple[str, Any, str, bool]], *,
                 stringer: bool = False) -> None:
        self.type_name = type_name
        self.stringer = stringer
        self.values: dict[str, Any] = {}
        self._json: list[tuple[str, str, bool]] = []
        for name, value, json_name, omitempty in fields:
            self.values[name] = value
            if json_name:
                self._json.append((name, json_name, omitempty))

    def get(self, name: str) -> Any:
        return self.values.get(name, MISSING)

    def json_fields(self) -> Iterator[tuple[str, Any, bool]]:
        for name, json_name, omitempty in self._json:
            yield json_name, self.values[name], omitempty

    def __repr__(self) -> str:
        return f"GoStruct({self.type_name}, {self.values!r})"


class OrderedMap(dict[Any, Any]):
    """A map that ranges, prints and encodes in insertion order (Ollama's ordered maps)."""


class JSONOrderedMap(OrderedMap):
    """An ordered map whose Go ``String()`` is its JSON (api.ToolCallFunctionArguments)."""


class JSONList(list[Any]):
    """A slice whose Go ``String()`` is its JSON (api.Tools); ``nil`` marks a Go nil slice."""

    def __init__(self, items: Iterable[Any] = (), *, nil: bool = False) -> None:
        super().__init__(items)
        self.nil = nil


class PropertyType(tuple[str, ...]):
    """api.PropertyType: JSON Schema type names; a single name prints and encodes as a bare string."""

    __slots__ = ()

    def go_string(self) -> str:
        if not self:
            return ""
        if len(self) == 1:
            return str(self[0])
        return "[" + " ".join(str(x) for x in self) + "]"


# --------------------------------------------------------------------------------------------------
# Go formatting helpers (fmt %v, strconv, encoding/json)


def _shortest(a: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of a positive finite float and its decimal-point position."""
    _sign, digits, exp = Decimal(repr(a)).as_tuple()
    s = "".join(map(str, digits))
    dp = len(s) + int(exp)
    s = s.rstrip("0") or "0"
    return s, dp


def _fmt_e(digits: str, dp: int) -> str:
    exp = dp - 1
    mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{mant}e{'-' if exp < 0 else '+'}{abs(exp):02d}"


def _fmt_f(digits: str, dp: int) -> str:
    if dp <= 0:
        return "0." + "0" * (-dp) + digits
    if dp >= len(digits):
        return digits + "0" * (dp - len(digits))
    return digits[:dp] + "." + digits[dp:]


def _go_float(f: float) -> str:
    """fmt's %v for float64 (strconv 'g', shortest): exponent form below 1e-4 or from 1e+06."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, f) < 0 else ""
    if f == 0:
        return sign + "0"
    digits, dp = _shortest(abs(f))
    exp = dp - 1
    body = _fmt_e(digits, dp) if exp < -4 or exp >= 6 else _fmt_f(digits, dp)
    return sign + body


class _JSONError(Exception):
    pass


_SURROGATES = re.compile("[\ud800-\udfff]")


def _json_str(s: str) -> str:
    s = _SURROGATES.sub("\ufffd", s)
    enc = _json.dumps(s, ensure_ascii=False)
    if any(c in enc for c in "<>&\u2028\u2029"):
        enc = (enc.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
               .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    return enc


def _json_float(f: float) -> str:
    if math.isnan(f) or math.isinf(f):
        raise _JSONError(f"unsupported value: {_go_float(f)}")
    sign = "-" if math.copysign(1.0, f) < 0 else ""
    if f == 0:
        return sign + "0"
    a = abs(f)
    digits, dp = _shortest(a)
    if a < 1e-6 or a >= 1e21:
        body = _fmt_e(digits, dp)
        if body[-4:-1] == "e-0":  # Go cleans e-07 up to e-7
            body = body[:-2] + body[-1]
    else:
        body = _fmt_f(digits, dp)
    return sign + body


def _map_items(m: dict[Any, Any]) -> list[tuple[Any, Any]]:
    """Go visits maps in sorted key order; Ollama's ordered maps keep insertion order."""
    if isinstance(m, OrderedMap):
        return list(m.items())
    return sorted(m.items(), key=lambda kv: str(kv[0]))


def _json_empty(v: Any) -> bool:
    """Go's omitempty test; OrderedMap and GoStruct stand for pointers/structs, never empty."""
    if v is None or v is MISSING:
        return True
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v == 0
    if isinstance(v, (OrderedMap, GoStruct)):
        return False
    if isinstance(v, JSONList):
        return v.nil or not v
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) == 0
    return False


def _json_enc(v: Any, out: list[str]) -> None:
    if v is None or v is MISSING:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, int):
        # JSON numbers Ollama decoded into `any` are float64: huge integers lose precision there too
        if -(2**53) <= v <= 2**53:
            out.append(str(v))
        else:
            try:
                out.append(_json_float(float(v)))
            except OverflowError as e:
                raise _JSONError("number out of range") from e
    elif isinstance(v, float):
        out.append(_json_float(v))
    elif isinstance(v, str):
        out.append(_json_str(v))
    elif isinstance(v, PropertyType):
        if len(v) == 1:
            out.append(_json_str(str(v[0])))
        elif not v:
            out.append("null")
        else:
            _json_enc(list(v), out)
    elif isinstance(v, GoStruct):
        out.append("{")
        first = True
        for name, val, omitempty in v.json_fields():
            if omitempty and _json_empty(val):
                continue
            if not first:
                out.append(",")
            first = False
            out.append(_json_str(name))
            out.append(":")
            _json_enc(val, out)
        out.append("}")
    elif isinstance(v, JSONList) and v.nil:
        out.append("null")
    elif isinstance(v, dict):
        out.append("{")
        for i, (k, val) in enumerate(_map_items(v)):
            if i:
                out.append(",")
            out.append(_json_str(str(k)))
            out.append(":")
            _json_enc(val, out)
        out.append("}")
    elif isinstance(v, (list, tuple)):
        out.append("[")
        for i, val in enumerate(v):
            if i:
                out.append(",")
            _json_enc(val, out)
        out.append("]")
    else:
        raise _JSONError(f"unsupported type: {type(v).__name__}")


def go_json(value: Any) -> str:
    """Encode like Go's json.Marshal: compact, HTML-escaped, map keys sorted, structs by JSON tag.

    Raises ValueError for values Go cannot encode (NaN, infinities).
    """
    out: list[str] = []
    try:
        _json_enc(value, out)
    except _JSONError as e:
        raise ValueError(f"json: {e}") from None
    return "".join(out)


def _fmt_v(v: Any) -> str:
    """fmt's %v for a value (also what text/template prints, apart from nil)."""
    if isinstance(v, str):
        return v
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _go_float(v)
    if v is None or v is MISSING:
        return "<nil>"
    if isinstance(v, PropertyType):
        return v.go_string()
    if isinstance(v, (JSONList, JSONOrderedMap)) or (isinstance(v, GoStruct) and v.stringer):
        try:
            return go_json(v)
        except ValueError:
            return ""
    if isinstance(v, GoStruct):
        return "{" + " ".join(_fmt_v(x) for x in v.values.values()) + "}"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{_fmt_v(k)}:{_fmt_v(x)}" for k, x in _map_items(v)) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_fmt_v(x) for x in v) + "]"
    return str(v)


def _print_value(v: Any) -> str:
    """What an action ``{{ x }}`` writes."""
    if v is MISSING:
        return ""
    if v is None:
        return "<no value>"
    return _fmt_v(v)


def _type_name(v: Any) -> str:
    if v is None or v is MISSING:
        return "<nil>"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, GoStruct):
        return v.type_name
    if isinstance(v, PropertyType):
        return "PropertyType"
    if isinstance(v, dict):
        return "map[string]interface {}"
    if isinstance(v, (list, tuple)):
        return "[]interface {}"
    return type(v).__name__


_QUOTE_ESC: Final = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                     "\v": "\\v", "\\": "\\\\"}


def _quote_rune(ch: str, quote: str) -> str:
    if ch == quote:
        return "\\" + ch
    if ch in _QUOTE_ESC:
        return _QUOTE_ESC[ch]
    c = ord(ch)
    if 0xD800 <= c < 0xE000:
        return "\ufffd"
    if ch.isprintable():
        return ch
    if c < 0x80:
        return f"\\x{c:02x}"
    if c < 0x10000:
        return f"\\u{c:04x}"
    return f"\\U{c:08x}"


def _go_quote(s: str) -> str:
    """strconv.Quote."""
    return '"' + "".join(_quote_rune(ch, '"') for ch in s) + '"'


def _pad(s: str, flags: str, width: int | None, numeric: bool = False) -> str:
    if width is None or len(s) >= width:
        return s
    fill = width - len(s)
    if "-" in flags:
        return s + " " * fill
    if "0" in flags:
        if numeric and s[:1] in ("+", "-", " "):
            return s[0] + "0" * fill + s[1:]
        return "0" * fill + s
    return " " * fill + s


def _bad_verb(verb: str, arg: Any) -> str:
    if arg is None or arg is MISSING:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({_type_name(arg)}={_fmt_v(arg)})"


def _fmt_int(verb: str, n: int, flags: str, width: int | None, prec: int | None) -> str:
    if verb == "c":
        return _pad(chr(n) if 0 <= n <= 0x10FFFF and not 0xD800 <= n < 0xE000 else "\ufffd", flags, width)
    if verb == "q":
        ch = chr(n) if 0 <= n <= 0x10FFFF and not 0xD800 <= n < 0xE000 else "\ufffd"
        return _pad("'" + _quote_rune(ch, "'") + "'", flags, width)
    if verb == "U":
        return _pad(f"U+{n:04X}", flags, width)
    base = {"d": "d", "v": "d", "b": "b", "o": "o", "O": "o", "x": "x", "X": "X"}[verb]
    digits = format(abs(n), base)
    if prec is not None:
        digits = "" if prec == 0 and n == 0 else digits.zfill(prec)
    if verb == "O" or ("#" in flags and verb == "o" and not digits.startswith("0")):
        digits = ("0o" if verb == "O" else "0") + digits
    elif "#" in flags and verb in "xX":
        digits = ("0x" if verb == "x" else "0X") + digits
    elif "#" in flags and verb == "b":
        digits = "0b" + digits
    sign = "-" if n < 0 else ("+" if "+" in flags else (" " if " " in flags else ""))
    s = sign + digits
    if prec is not None:
        flags = flags.replace("0", "")
    return _pad(s, flags, width, numeric=True)


def _fmt_float(verb: str, f: float, flags: str, width: int | None, prec: int | None) -> str:
    if math.isnan(f) or math.isinf(f):
        s = "NaN" if math.isnan(f) else ("+Inf" if f > 0 else "-Inf")
        if s == "NaN" and "+" in flags:
            s = "+NaN"
        return _pad(s, flags.replace("0", ""), width)
    if verb in "vgG" and prec is None:
        s = _go_float(f)
        if verb == "G":
            s = s.upper()
    else:
        p = 6 if prec is None else prec
        spec = {"v": "g", "g": "g", "G": "G", "e": "e", "E": "E", "f": "f", "F": "f"}[verb]
        s = format(f, f".{p}{spec}")
    if "+" in flags and not s.startswith("-"):
        s = "+" + s
    elif " " in flags and not s.startswith("-"):
        s = " " + s
    return _pad(s, flags, width, numeric=True)


def _fmt_arg(verb: str, arg: Any, flags: str, width: int | None, prec: int | None) -> str:
    if verb == "T":
        return _pad(_type_name(arg), flags, width)
    if arg is None or arg is MISSING:
        return _pad("<nil>", flags, width) if verb == "v" else _bad_verb(verb, arg)
    if isinstance(arg, bool):
        if verb in "vt":
            return _pad("true" if arg else "false", flags, width)
        return _bad_verb(verb, arg)
    if isinstance(arg, int):
        if verb in "vdboOxXcqU":
            return _fmt_int(verb, arg, flags, width, prec)
        return _bad_verb(verb, arg)
    if isinstance(arg, float):
        if verb in "vgGeEfF":
            return _fmt_float(verb, arg, flags, width, prec)
        return _bad_verb(verb, arg)
    stringer = isinstance(arg, (JSONList, JSONOrderedMap, PropertyType)) or (
        isinstance(arg, GoStruct) and arg.stringer)
    if isinstance(arg, str) or stringer:
        s = arg if isinstance(arg, str) else _fmt_v(arg)
        if verb in "vs":
            return _pad(s if prec is None else s[:prec], flags, width)
        if verb == "q":
            return _pad(_go_quote(s if prec is None else s[:prec]), flags, width)
        if verb in "xX":
            b = s.encode("utf-8", "surrogatepass")
            if prec is not None:
                b = b[:prec]
            return _pad(b.hex() if verb == "x" else b.hex().upper(), flags, width)
        return _bad_verb(verb, arg)
    if isinstance(arg, GoStruct):
        return "{" + " ".join(_fmt_arg(verb, x, flags, width, prec) for x in arg.values.values()) + "}"
    if isinstance(arg, dict):
        return "map[" + " ".join(
            f"{_fmt_arg(verb, k, flags, width, prec)}:{_fmt_arg(verb, x, flags, width, prec)}"
            for k, x in _map_items(arg)) + "]"
    if isinstance(arg, (list, tuple)):
        return "[" + " ".join(_fmt_arg(verb, x, flags, width, prec) for x in arg) + "]"
    return _pad(_fmt_v(arg), flags, width) if verb in "vs" else _bad_verb(verb, arg)


_TOO_LARGE: Final = 1_000_000


def go_sprintf(fmt: str, args: Sequence[Any]) -> str:
    """fmt.Sprintf for the common verbs (v s q d t f e g x X c b o U T, flags, width, precision)."""
    out: list[str] = []
    i, n, argi = 0, len(fmt), 0
    while i < n:
        j = fmt.find("%", i)
        if j < 0:
            out.append(fmt[i:])
            break
        out.append(fmt[i:j])
        i = j + 1
        flags = ""
        while i < n and fmt[i] in "+-# 0":
            flags += fmt[i]
            i += 1
        width: int | None = None
        prec: int | None = None
        if i < n and fmt[i] == "*":
            i += 1
            if argi < len(args) and isinstance(args[argi], int) and not isinstance(args[argi], bool) \
                    and abs(args[argi]) <= _TOO_LARGE:
                width = args[argi]
                if width < 0:
                    flags += "-"
                    width = -width
            else:
                out.append("%!(BADWIDTH)")
            argi += 1
        else:
            st = i
            while i < n and "0" <= fmt[i] <= "9":
                i += 1
            if i > st:
                width = int(fmt[st:i]) if i - st <= 7 else _TOO_LARGE + 1
                if width > _TOO_LARGE:
                    out.append("%!(BADWIDTH)")
                    width = None
        if i < n and fmt[i] == ".":
            i += 1
            if i < n and fmt[i] == "*":
                i += 1
                if argi < len(args) and isinstance(args[argi], int) and not isinstance(args[argi], bool) \
                        and abs(args[argi]) <= _TOO_LARGE:
                    prec = args[argi] if args[argi] >= 0 else None
                else:
                    out.append("%!(BADPREC)")
                argi += 1
            else:
                st = i
                while i < n and "0" <= fmt[i] <= "9":
                    i += 1
                prec = int(fmt[st:i]) if 0 < i - st <= 7 else (0 if i == st else _TOO_LARGE + 1)
                if prec > _TOO_LARGE:
                    out.append("%!(BADPREC)")
                    prec = None
        if i >= n:
            out.append("%!(NOVERB)")
            break
        verb = fmt[i]
        i += 1
        if verb == "%":
            out.append("%")
            continue
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        arg = args[argi]
        argi += 1
        out.append(_fmt_arg(verb, arg, flags, width, prec))
    if argi < len(args):
        extra = ", ".join("<nil>" if a is None or a is MISSING else f"{_type_name(a)}={_fmt_v(a)}"
                          for a in args[argi:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def go_sprint(args: Sequence[Any]) -> str:
    """fmt.Sprint: spaces between operands when neither side is a string."""
    out: list[str] = []
    prev_string = False
    for i, a in enumerate(args):
        is_string = isinstance(a, str)
        if i and not is_string and not prev_string:
            out.append(" ")
        out.append(_fmt_v(a))
        prev_string = is_string
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Builtin functions


class _FuncError(Exception):
    """A function failed; the evaluator wraps it as ``error calling NAME: ...``."""


def _truth(v: Any) -> bool:
    """Go template truthiness: zero values, nil and empty containers are false; structs are true."""
    if v is None or v is MISSING:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, GoStruct):
        return True
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


def _kind(v: Any) -> str:
    if v is None or v is MISSING:
        return "nil"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    return "other"


def _fn_eq(arg1: Any, *args: Any) -> bool:
    if not args:
        raise _FuncError("missing argument for comparison")
    k1 = _kind(arg1)
    for a in args:
        k2 = _kind(a)
        if k1 != k2:
            if k1 != "nil" and k2 != "nil":
                raise _FuncError("incompatible types for comparison")
            continue
        if k1 == "nil":
            return True
        if k1 == "other":
            raise _FuncError(f"non-comparable type {_type_name(a)}")
        if arg1 == a:
            return True
    return False


def _fn_ne(a: Any, b: Any) -> bool:
    return not _fn_eq(a, b)


def _ordered(a: Any, b: Any) -> None:
    ka, kb = _kind(a), _kind(b)
    if ka not in ("int", "float", "string") or kb not in ("int", "float", "string"):
        raise _FuncError("invalid type for comparison")
    if ka != kb:
        raise _FuncError("incompatible types for comparison")


def _fn_lt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a < b)


def _fn_le(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a <= b)


def _fn_gt(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a > b)


def _fn_ge(a: Any, b: Any) -> bool:
    _ordered(a, b)
    return bool(a >= b)


def _fn_not(a: Any) -> bool:
    return not _truth(a)


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def _fn_len(a: Any) -> int:
    if isinstance(a, str):
        return len(_utf8(a))
    if isinstance(a, (list, tuple, dict)):
        return len(a)
    if a is None or a is MISSING:
        raise _FuncError("len of nil pointer")
    raise _FuncError(f"len of type {_type_name(a)}")


def _int_arg(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise _FuncError(f"cannot {what} with type {_type_name(x)}")
    return x


def _fn_index(item: Any, *indexes: Any) -> Any:
    v = item
    if v is None or v is MISSING:
        raise _FuncError("index of untyped nil")
    for ix in indexes:
        if v is None or v is MISSING:
            raise _FuncError("index of nil pointer")
        if isinstance(v, (str, list, tuple)):
            seq: Any = _utf8(v) if isinstance(v, str) else v
            i = _int_arg(ix, "index slice")
            if not 0 <= i < len(seq):
                raise _FuncError(f"index out of range: {i}")
            v = seq[i]
        elif isinstance(v, dict):
            if not isinstance(ix, str):
                raise _FuncError(f"value has type {_type_name(ix)}; should be string")
            v = v.get(ix)
        else:
            raise _FuncError(f"can't index item of type {_type_name(v)}")
    return v


def _fn_slice(item: Any, *indexes: Any) -> Any:
    if item is None or item is MISSING:
        raise _FuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise _FuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise _FuncError("cannot 3-index slice a string")
        seq: Any = _utf8(item)
    elif isinstance(item, (list, tuple)):
        seq = item
    else:
        raise _FuncError(f"can't slice item of type {_type_name(item)}")
    idx = [0, len(seq), len(seq)]
    for k, x in enumerate(indexes):
        i = _int_arg(x, "slice")
        if not 0 <= i <= len(seq):
            raise _FuncError(f"index out of range: {i}")
        idx[k] = i
    if idx[0] > idx[1]:
        raise _FuncError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise _FuncError(f"invalid slice index: {idx[1]} > {idx[2]}")
    part = seq[idx[0]:idx[1]]
    if isinstance(item, str):
        return part.decode("utf-8", "replace")
    if isinstance(item, JSONList):
        return JSONList(part)
    return list(part)


def _fn_print(*args: Any) -> str:
    return go_sprint(args)


def _fn_println(*args: Any) -> str:
    return " ".join(_fmt_v(a) for a in args) + "\n"


def _fn_printf(fmt: Any, *args: Any) -> str:
    if not isinstance(fmt, str):
        raise _FuncError(f"wrong type for value; expected string; got {_type_name(fmt)}")
    return go_sprintf(fmt, args)


def _escaper_arg(args: tuple[Any, ...]) -> str:
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return go_sprint(args)


def _fn_html(*args: Any) -> str:
    s = _escaper_arg(args)
    return (s.replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&#34;").replace("\x00", "\ufffd"))


_JS_ESC: Final = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026",
                  "=": "\\u003D"}


def _fn_js(*args: Any) -> str:
    out = []
    for ch in _escaper_arg(args):
        if ch in _JS_ESC:
            out.append(_JS_ESC[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04X}")
        elif ord(ch) < 0x80 or ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04X}")
    return "".join(out)


def _fn_urlquery(*args: Any) -> str:
    return quote_plus(_escaper_arg(args), safe="", errors="surrogatepass")


def _fn_json(v: Any) -> str:
    # Ollama ignores the Marshal error and returns string(nil), i.e. ""
    try:
        return go_json(v)
    except ValueError:
        return ""


def _fn_current_date(*_args: Any) -> str:
    # Ollama accepts (and ignores) a format argument and returns the local date as YYYY-MM-DD
    return _dt.datetime.now().strftime("%Y-%m-%d")


_TS_TYPES: Final = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
                    "array": "any[]", "object": "Record<string, any>", "null": "null"}


def _ts_type(p: GoStruct) -> str:
    any_of = p.get("AnyOf")
    if isinstance(any_of, (list, tuple)) and any_of:
        return " | ".join(_ts_type(x) if isinstance(x, GoStruct) else "any" for x in any_of)
    types = p.get("Type")
    if isinstance(types, str):
        types = (types,)
    if not isinstance(types, (list, tuple)) or not types:
        return "any"
    return " | ".join(_TS_TYPES.get(str(t), "any") for t in types)


def _fn_to_typescript_type(v: Any) -> str:
    if isinstance(v, GoStruct) and v.type_name == "ToolProperty":
        return _ts_type(v)
    return "any"


BUILTIN_FUNCS: Final[Mapping[str, Callable[..., Any]]] = {
    "and": _truth,  # placeholder: and/or short-circuit inside the evaluator
    "or": _truth,
    "not": _fn_not,
    "len": _fn_len,
    "index": _fn_index,
    "slice": _fn_slice,
    "eq": _fn_eq,
    "ne": _fn_ne,
    "lt": _fn_lt,
    "le": _fn_le,
    "gt": _fn_gt,
    "ge": _fn_ge,
    "print": _fn_print,
    "printf": _fn_printf,
    "println": _fn_println,
    "html": _fn_html,
    "js": _fn_js,
    "urlquery": _fn_urlquery,
    # Ollama's additions (template/template.go)
    "json": _fn_json,
    "currentDate": _fn_current_date,
    "toTypeScriptType": _fn_to_typescript_type,
}
"""Functions every template can call: Go's builtins (except ``call``) plus Ollama's."""

_ARITY: Final[Mapping[str, tuple[int, int | None]]] = {
    "and": (1, None), "or": (1, None), "not": (1, 1), "len": (1, 1), "index": (1, None),
    "slice": (1, None), "eq": (1, None), "ne": (2, 2), "lt": (2, 2), "le": (2, 2), "gt": (2, 2),
    "ge": (2, 2), "print": (0, None), "printf": (1, None), "println": (0, None), "html": (0, None),
    "js": (0, None), "urlquery": (0, None), "json": (1, 1), "currentDate": (0, None),
    "toTypeScriptType": (1, 1),
}


# --------------------------------------------------------------------------------------------------
# Lexer


class _Tok(NamedTuple):
    kind: str
    val: str
    pos: int


# token kinds
_TEXT, _LDELIM, _RDELIM, _SPACE, _EOF = "text", "{{", "}}", "space", "EOF"
_ASSIGN, _DECLARE, _PIPE, _LPAREN, _RPAREN = "=", ":=", "|", "(", ")"
_STRING, _RAWSTRING, _CHARCONST, _NUMBER = "string", "raw string", "character constant", "number"
_BOOL, _NIL, _DOT, _FIELD, _VARIABLE = "bool", "nil", ".", "field", "variable"
_IDENT, _KEYWORD, _CHAR = "identifier", "keyword", "char"

_WS: Final = " \t\r\n"
_KEYWORDS: Final = frozenset({"block", "break", "continue", "define", "else", "end", "if", "range",
                              "template", "with"})


def _is_alnum(c: str) -> bool:
    return c == "_" or c.isalpha() or c.isdecimal()


class _Lexer:
    """Go's text/template lexer, run to completion into a token list."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.toks: list[_Tok] = []

    def err(self, msg: str, pos: int) -> TemplateError:
        return TemplateError(msg, pos, self.src)

    def run(self) -> list[_Tok]:
        src, n = self.src, len(self.src)
        pos, trim = 0, False
        while True:
            i = src.find("{{", pos)
            end = n if i < 0 else i
            text = src[pos:end]
            if trim:
                text = text.lstrip(_WS)
            left_trim = i >= 0 and src.startswith("-", i + 2) and i + 3 < n and src[i + 3] in _WS
            if left_trim:
                text = text.rstrip(_WS)
            if text:
                self.toks.append(_Tok(_TEXT, text, pos))
            if i < 0:
                self.toks.append(_Tok(_EOF, "", n))
                return self.toks
            j = i + 2 + (2 if left_trim else 0)
            if src.startswith("/*", j):
                k = src.find("*/", j + 2)
                if k < 0:
                    raise self.err("unclosed comment", i)
                rd = self._right_delim(k + 2)
                if not rd:
                    raise self.err("comment ends before closing delimiter", k + 2)
                pos, trim = k + 2 + (4 if rd == 2 else 2), rd == 2
                continue
            self.toks.append(_Tok(_LDELIM, "{{", i))
            pos, trim = self._action(j, i)

    def _right_delim(self, p: int) -> int:
        """2 for ' -}}', 1 for '}}', else 0."""
        src = self.src
        if p + 1 < len(src) and src[p] in _WS and src[p + 1] == "-" and src.startswith("}}", p + 2):
            return 2
        return 1 if src.startswith("}}", p) else 0

    def _at_terminator(self, p: int) -> bool:
        src = self.src
        if p >= len(src):
            return True
        c = src[p]
        return c in _WS or c in ".,|:)(" or src.startswith("}}", p)

    def _bad_char(self, p: int) -> TemplateError:
        c = self.src[p] if p < len(self.src) else ""
        return self.err(f"bad character U+{ord(c):04X} {c!r}" if c else "unexpected EOF", p)

    def _action(self, p: int, start: int) -> tuple[int, bool]:
        src, n, emit = self.src, len(self.src), self.toks.append
        depth = 0
        while True:
            rd = self._right_delim(p)
            if rd:
                if depth:
                    raise self.err("unclosed left paren", p)
                emit(_Tok(_RDELIM, "}}", p))
                return p + (4 if rd == 2 else 2), rd == 2
            if p >= n:
                raise self.err("unclosed action", start)
            c = src[p]
            if c in _WS:
                q = p
                while q < n and src[q] in _WS:
                    q += 1
                if src.startswith("-}}", q):
                    q -= 1  # the last space belongs to the trim marker
                if q > p:
                    emit(_Tok(_SPACE, src[p:q], p))
                p = q
            elif c == "=":
                emit(_Tok(_ASSIGN, c, p))
                p += 1
            elif c == ":":
                if not src.startswith(":=", p):
                    raise self.err("expected :=", p)
                emit(_Tok(_DECLARE, ":=", p))
                p += 2
            elif c == "|":
                emit(_Tok(_PIPE, c, p))
                p += 1
            elif c in "\"'":
                q = p + 1
                what = "quoted string" if c == '"' else "character constant"
                while True:
                    if q >= n or src[q] == "\n":
                        raise self.err(f"unterminated {what}", p)
                    if src[q] == "\\":
                        if q + 1 >= n or src[q + 1] == "\n":
                            raise self.err(f"unterminated {what}", p)
                        q += 2
                        continue
                    q += 1
                    if src[q - 1] == c:
                        break
                emit(_Tok(_STRING if c == '"' else _CHARCONST, src[p:q], p))
                p = q
            elif c == "`":
                q = src.find("`", p + 1)
                if q < 0:
                    raise self.err("unterminated raw quoted string", p)
                emit(_Tok(_RAWSTRING, src[p:q + 1], p))
                p = q + 1
            elif c in "$." and not (c == "." and p + 1 < n and "0" <= src[p + 1] <= "9"):
                q = p + 1
                if self._at_terminator(q):
                    emit(_Tok(_VARIABLE if c == "$" else _DOT, c, p))
                else:
                    while q < n and _is_alnum(src[q]):
                        q += 1
                    if not self._at_terminator(q):
                        raise self._bad_char(q)
                    emit(_Tok(_VARIABLE if c == "$" else _FIELD, src[p:q], p))
                p = q
            elif c in "+-." or "0" <= c <= "9":
                p = self._number(p)
            elif _is_alnum(c):
                q = p
                while q < n and _is_alnum(src[q]):
                    q += 1
                if not self._at_terminator(q):
                    raise self._bad_char(q)
                word = src[p:q]
                if word in _KEYWORDS:
                    emit(_Tok(_KEYWORD, word, p))
                elif word in ("true", "false"):
                    emit(_Tok(_BOOL, word, p))
                elif word == "nil":
                    emit(_Tok(_NIL, word, p))
                else:
                    emit(_Tok(_IDENT, word, p))
                p = q
            elif c == "(":
                depth += 1
                emit(_Tok(_LPAREN, c, p))
                p += 1
            elif c == ")":
                depth -= 1
                if depth < 0:
                    raise self.err("unexpected right paren", p)
                emit(_Tok(_RPAREN, c, p))
                p += 1
            elif c < "\x80" and c.isprintable():
                emit(_Tok(_CHAR, c, p))
                p += 1
            else:
                raise self.err(f"unrecognized character in action: U+{ord(c):04X}", p)

    def _number(self, p: int) -> int:
        src, n = self.src, len(self.src)
        q = p

        def run(chars: str) -> None:
            nonlocal q
            while q < n and src[q] in chars:
                q += 1

        if q < n and src[q] in "+-":
            q += 1
        digits = "0123456789_"
        if q < n and src[q] == "0":
            q += 1
            if q < n and src[q] in "xX":
                q, digits = q + 1, "0123456789abcdefABCDEF_"
            elif q < n and src[q] in "oO":
                q, digits = q + 1, "01234567_"
            elif q < n and src[q] in "bB":
                q, digits = q + 1, "01_"
        run(digits)
        if q < n and src[q] == ".":
            q += 1
            run(digits)
        if (digits == "0123456789_" and q < n and src[q] in "eE") or (len(digits) == 23 and q < n
                                                                      and src[q] in "pP"):
            q += 1
            run("+-")
            run("0123456789_")
        if q < n and src[q] == "i":
            raise self.err("complex numbers are not supported", p)
        if q < n and _is_alnum(src[q]):
            raise self.err(f"bad number syntax: {src[p:q + 1]!r}", p)
        if q < n and src[q] in "+-":
            raise self.err(f"bad number syntax: {src[p:q + 1]!r}", p)
        self.toks.append(_Tok(_NUMBER, src[p:q], p))
        return q


# --------------------------------------------------------------------------------------------------
# AST


@dataclass(slots=True, eq=False)
class _Node:
    pos: int


@dataclass(slots=True, eq=False)
class _Text(_Node):
    text: str


@dataclass(slots=True, eq=False)
class _Field(_Node):
    idents: tuple[str, ...]

    def __str__(self) -> str:
        return "." + ".".join(self.idents)


@dataclass(slots=True, eq=False)
class _Variable(_Node):
    idents: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.idents)


@dataclass(slots=True, eq=False)
class _Ident(_Node):
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(slots=True, eq=False)
class _Dot(_Node):
    def __str__(self) -> str:
        return "."


@dataclass(slots=True, eq=False)
class _Nil(_Node):
    def __str__(self) -> str:
        return "nil"


@dataclass(slots=True, eq=False)
class _Literal(_Node):
    value: Any
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(slots=True, eq=False)
class _Chain(_Node):
    """``(pipeline).Field`` or ``func.Field``."""

    node: _Node
    fields: tuple[str, ...]

    def __str__(self) -> str:
        return f"({self.node})." + ".".join(self.fields)


@dataclass(slots=True, eq=False)
class _Command(_Node):
    args: list[_Node]


@dataclass(slots=True, eq=False)
class _Pipe(_Node):
    decl: tuple[str, ...]
    is_assign: bool
    cmds: list[_Command]

    def __str__(self) -> str:
        return "(pipeline)"


@dataclass(slots=True, eq=False)
class _Action(_Node):
    pipe: _Pipe


@dataclass(slots=True, eq=False)
class _Branch(_Node):
    """if / with / range."""

    kind: str
    pipe: _Pipe
    body: list[_Node]
    else_: list[_Node] | None


@dataclass(slots=True, eq=False)
class _Break(_Node):
    pass


@dataclass(slots=True, eq=False)
class _Continue(_Node):
    pass


@dataclass(slots=True, eq=False)
class _End(_Node):
    pass


@dataclass(slots=True, eq=False)
class _Else(_Node):
    pass


# --------------------------------------------------------------------------------------------------
# Parser


_SIMPLE_ESC: Final = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
_HEX: Final = frozenset("0123456789abcdefABCDEF")


def _unquote_one(body: str, i: int, quote: str) -> tuple[bytes | str, int]:
    """Decode one (possibly escaped) character of a Go literal starting at body[i]."""
    c = body[i]
    if c != "\\":
        return c, i + 1
    e = body[i + 1] if i + 1 < len(body) else ""
    if e in _SIMPLE_ESC:
        return bytes([_SIMPLE_ESC[e]]), i + 2
    if e == quote:
        return e, i + 2
    if e == "x":
        h = body[i + 2:i + 4]
        if len(h) != 2 or not set(h) <= _HEX:
            raise ValueError("invalid syntax")
        return bytes([int(h, 16)]), i + 4
    if e and e in "01234567":
        o = body[i + 1:i + 4]
        if len(o) != 3 or not all(ch in "01234567" for ch in o) or int(o, 8) > 255:
            raise ValueError("invalid syntax")
        return bytes([int(o, 8)]), i + 4
    if e in ("u", "U"):
        k = 4 if e == "u" else 8
        h = body[i + 2:i + 2 + k]
        if len(h) != k or not set(h) <= _HEX:
            raise ValueError("invalid syntax")
        v = int(h, 16)
        if v > 0x10FFFF or 0xD800 <= v < 0xE000:
            raise ValueError("invalid syntax")
        return chr(v), i + 2 + k
    raise ValueError("invalid syntax")


def _unquote(tok: str) -> str:
    """strconv.Unquote for "..." and `...` literals."""
    if tok[0] == "`":
        return tok[1:-1].replace("\r", "")
    body, out, i = tok[1:-1], bytearray(), 0
    while i < len(body):
        part, i = _unquote_one(body, i, '"')
        out += part if isinstance(part, bytes) else part.encode("utf-8", "surrogatepass")
    return out.decode("utf-8", "replace")


def _char_value(tok: str) -> int:
    body = tok[1:-1]
    if not body:
        raise ValueError("malformed character constant")
    part, i = _unquote_one(body, 0, "'")
    if i != len(body):
        raise ValueError("malformed character constant")
    return part[0] if isinstance(part, bytes) else ord(part)


def _number_value(text: str) -> int | float:
    """Go's rules for a numeric literal: float if it has . e E p P (and is not a hex int), else int64."""
    try:
        return _number_value_or_raise(text)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(("integer overflow", "illegal number"))
                         else f"illegal number syntax: {text!r}") from None


def _number_value_or_raise(text: str) -> int | float:
    clean = text.replace("_", "")
    body = clean.lstrip("+-")
    neg = clean.startswith("-")
    if len(body) > 400:
        raise ValueError(f"illegal number syntax: {text!r}")
    is_hex_int = len(text) > 2 and text[0] == "0" and text[1] in "xX" and not any(c in text for c in "pP")
    if any(c in text for c in ".eEpP") and not is_hex_int:
        v = float.fromhex(("-" if neg else "") + body) if body[:2].lower() == "0x" else float(clean)
        if math.isinf(v) or math.isnan(v):
            raise ValueError(f"illegal number syntax: {text!r}")
        return v
    low = body.lower()
    if low.startswith(("0x", "0o", "0b")):
        v_int = int(body, 0)
    elif len(body) > 1 and body[0] == "0":
        v_int = int(body, 8)
    else:
        v_int = int(body, 10)
    v_int = -v_int if neg else v_int
    if not -(2**63) <= v_int < 2**63:
        raise ValueError(f"integer overflow: {text!r}")
    return v_int


_OPERAND_START: Final = frozenset({_BOOL, _CHARCONST, _DOT, _FIELD, _IDENT, _NUMBER, _NIL, _RAWSTRING,
                                   _STRING, _VARIABLE, _LPAREN})


class _Parser:
    def __init__(self, src: str, toks: list[_Tok], funcs: Mapping[str, Any]) -> None:
        self.src = src
        self.toks = toks
        self.i = 0
        self.funcs = funcs
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.depth = 0

    # token helpers (spaces skipped by *_non_space are consumed, as in Go)
    def err(self, msg: str, pos: int) -> TemplateError:
        return TemplateError(msg, pos, self.src)

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next_non_space(self) -> _Tok:
        t = self.next()
        while t.kind == _SPACE:
            t = self.next()
        return t

    def peek_non_space(self) -> _Tok:
        while self.toks[self.i].kind == _SPACE:
            self.i += 1
        return self.toks[self.i]

    def unexpected(self, t: _Tok, context: str) -> TemplateError:
        what = "EOF" if t.kind == _EOF else (t.val or t.kind)
        return self.err(f"unexpected {what!r} in {context}", t.pos)

    def expect(self, kind: str, context: str) -> _Tok:
        t = self.next_non_space()
        if t.kind != kind:
            raise self.unexpected(t, context)
        return t

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.err(f"template nesting exceeds {MAX_DEPTH} levels", pos)

    # grammar
    def parse(self) -> list[_Node]:
        nodes: list[_Node] = []
        while True:
            t = self.next()
            if t.kind == _EOF:
                return nodes
            if t.kind == _TEXT:
                nodes.append(_Text(t.pos, t.val))
                continue
            n = self.action()
            if isinstance(n, _End):
                raise self.err("unexpected {{end}}", n.pos)
            if isinstance(n, _Else):
                raise self.err("unexpected {{else}}", n.pos)
            nodes.append(n)

    def item_list(self) -> tuple[list[_Node], _Node]:
        nodes: list[_Node] = []
        while True:
            t = self.next_non_space()
            if t.kind == _EOF:
                raise self.err("unexpected EOF", t.pos)
            if t.kind == _TEXT:
                nodes.append(_Text(t.pos, t.val))
            elif t.kind == _LDELIM:
                n = self.action()
                if isinstance(n, (_End, _Else)):
                    return nodes, n
                nodes.append(n)
            else:
                raise self.unexpected(t, "input")

    def action(self) -> _Node:
        t = self.next_non_space()
        if t.kind == _KEYWORD:
            kw = t.val
            if kw in ("block", "define", "template"):
                raise self.err(f"{{{{{kw}}}}} is not supported", t.pos)
            if kw in ("break", "continue"):
                if not self.range_depth:
                    raise self.err(f"{{{{{kw}}}}} outside {{{{range}}}}", t.pos)
                self.expect(_RDELIM, kw)
                return _Break(t.pos) if kw == "break" else _Continue(t.pos)
            if kw == "else":
                p = self.peek_non_space()
                if not (p.kind == _KEYWORD and p.val in ("if", "with")):
                    self.expect(_RDELIM, "else")
                return _Else(t.pos)
            if kw == "end":
                self.expect(_RDELIM, "end")
                return _End(t.pos)
            return self.control(kw, t.pos)
        self.i -= 1
        return _Action(t.pos, self.pipeline("command", _RDELIM))

    def control(self, kind: str, pos: int) -> _Branch:
        self.enter(pos)
        saved = len(self.vars)
        pipe = self.pipeline(kind, _RDELIM)
        if kind == "range":
            self.range_depth += 1
        body, nxt = self.item_list()
        if kind == "range":
            self.range_depth -= 1
        else_: list[_Node] | None = None
        if isinstance(nxt, _Else):
            p = self.peek()
            if kind in ("if", "with") and p.kind == _KEYWORD and p.val == kind:
                self.next()
                else_ = [self.control(kind, p.pos)]
            else:
                else_, end = self.item_list()
                if not isinstance(end, _End):
                    raise self.err("expected end; found {{else}}", end.pos)
        del self.vars[saved:]
        self.depth -= 1
        return _Branch(pos, kind, pipe, body, else_)

    def pipeline(self, context: str, end: str) -> _Pipe:
        start = self.peek_non_space()
        self.enter(start.pos)
        decl: list[str] = []
        is_assign = False
        while True:  # declarations: $x :=, $x =, $i, $v := (range only)
            v = self.peek_non_space()
            if v.kind != _VARIABLE:
                break
            saved = self.i
            self.next()
            nxt = self.peek_non_space()
            if nxt.kind in (_ASSIGN, _DECLARE):
                is_assign = nxt.kind == _ASSIGN
                self.next_non_space()
                if is_assign and v.val not in self.vars:
                    raise self.err(f"undefined variable {v.val!r}", v.pos)
                decl.append(v.val)
                self.vars.append(v.val)
                break
            if nxt.kind == _CHAR and nxt.val == ",":
                self.next_non_space()
                decl.append(v.val)
                self.vars.append(v.val)
                if context == "range" and len(decl) < 2:
                    if self.peek_non_space().kind in (_VARIABLE, _RDELIM, _RPAREN):
                        continue
                    raise self.err("range can only initialize variables", nxt.pos)
                raise self.err(f"too many declarations in {context}", nxt.pos)
            self.i = saved
            break
        cmds: list[_Command] = []
        while True:
            t = self.next_non_space()
            if t.kind == end:
                if not cmds:
                    raise self.err(f"missing value for {context}", t.pos)
                for k, c in enumerate(cmds[1:]):
                    if isinstance(c.args[0], (_Literal, _Dot, _Nil)):
                        raise self.err(f"non executable command in pipeline stage {k + 2}", c.pos)
                self.depth -= 1
                return _Pipe(start.pos, tuple(decl), is_assign, cmds)
            if t.kind not in _OPERAND_START:
                raise self.unexpected(t, context)
            self.i -= 1
            cmds.append(self.command())

    def command(self) -> _Command:
        pos = self.peek_non_space().pos
        args: list[_Node] = []
        while True:
            self.peek_non_space()
            op = self.operand()
            if op is not None:
                args.append(op)
            t = self.next()
            if t.kind == _SPACE:
                continue
            if t.kind in (_RDELIM, _RPAREN):
                self.i -= 1
            elif t.kind != _PIPE:
                raise self.unexpected(t, "operand")
            break
        if not args:
            raise self.err("empty command", pos)
        return _Command(pos, args)

    def operand(self) -> _Node | None:
        node = self.term()
        if node is None or self.peek().kind != _FIELD:
            return node
        fields: list[str] = []
        while self.peek().kind == _FIELD:
            fields.append(self.next().val[1:])
        if isinstance(node, _Field):
            return _Field(node.pos, node.idents + tuple(fields))
        if isinstance(node, _Variable):
            return _Variable(node.pos, node.idents + tuple(fields))
        if isinstance(node, (_Literal, _Nil, _Dot)):
            raise self.err(f"unexpected . after term {str(node)!r}", node.pos)
        return _Chain(node.pos, node, tuple(fields))

    def term(self) -> _Node | None:
        t = self.next_non_space()
        k = t.kind
        if k == _IDENT:
            if t.val not in self.funcs:
                raise self.err(f'function "{t.val}" not defined', t.pos)
            return _Ident(t.pos, t.val)
        if k == _DOT:
            return _Dot(t.pos)
        if k == _NIL:
            return _Nil(t.pos)
        if k == _VARIABLE:
            if t.val not in self.vars:
                raise self.err(f"undefined variable {t.val!r}", t.pos)
            return _Variable(t.pos, (t.val,))
        if k == _FIELD:
            return _Field(t.pos, (t.val[1:],))
        if k == _BOOL:
            return _Literal(t.pos, t.val == "true", t.val)
        try:
            if k == _NUMBER:
                return _Literal(t.pos, _number_value(t.val), t.val)
            if k == _CHARCONST:
                return _Literal(t.pos, _char_value(t.val), t.val)
            if k in (_STRING, _RAWSTRING):
                return _Literal(t.pos, _unquote(t.val), t.val)
        except ValueError as e:
            msg = str(e)
            if msg == "invalid syntax" or not msg:
                msg = f"invalid syntax in {k} {t.val!r}"
            raise self.err(msg, t.pos) from None
        if k == _LPAREN:
            return self.pipeline("parenthesized pipeline", _RPAREN)
        self.i -= 1
        return None


# --------------------------------------------------------------------------------------------------
# Evaluator


class _NoArg:
    __slots__ = ()


_NOARG: Final = _NoArg()


class _BreakSignal(Exception):
    pass


class _ContinueSignal(Exception):
    pass


class _Exec:
    def __init__(self, tmpl: Template, data: Any, max_output: int, max_steps: int) -> None:
        self.tmpl = tmpl
        self.funcs = tmpl.funcs
        self.vars: list[tuple[str, Any]] = [("$", data)]
        self.out: list[str] = []
        self.size = 0
        self.work = 0
        self.steps = 0
        self.max_output = max_output
        self.max_steps = max_steps
        self.pos = 0

    def err(self, msg: str, pos: int | None = None) -> TemplateError:
        return TemplateError(f"executing: {msg}", self.pos if pos is None else pos, self.tmpl.source)

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise self.err(f"template execution exceeded {self.max_steps} steps")

    def write(self, s: str) -> None:
        self.size += len(s)
        if self.size > self.max_output:
            raise self.err(f"rendered template exceeds {self.max_output} characters")
        self.out.append(s)

    # variables
    def var(self, name: str) -> Any:
        for n, v in reversed(self.vars):
            if n == name:
                return v
        raise self.err(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for k in range(len(self.vars) - 1, -1, -1):
            if self.vars[k][0] == name:
                self.vars[k] = (name, value)
                return
        raise self.err(f"undefined variable: {name}")

    # statements
    def walk(self, nodes: list[_Node], dot: Any) -> None:
        for node in nodes:
            self.tick()
            self.pos = node.pos
            if isinstance(node, _Text):
                self.write(node.text)
            elif isinstance(node, _Action):
                v = self.pipeline(dot, node.pipe)
                if not node.pipe.decl:
                    self.write(_print_value(v))
            elif isinstance(node, _Branch):
                self.branch(node, dot)
            elif isinstance(node, _Break):
                raise _BreakSignal
            elif isinstance(node, _Continue):
                raise _ContinueSignal

    def branch(self, node: _Branch, dot: Any) -> None:
        mark = len(self.vars)
        try:
            if node.kind == "range":
                self.range(node, dot)
                return
            v = self.pipeline(dot, node.pipe)
            if _truth(v):
                self.walk(node.body, v if node.kind == "with" else dot)
            elif node.else_ is not None:
                self.walk(node.else_, dot)
        finally:
            del self.vars[mark:]

    def range(self, node: _Branch, dot: Any) -> None:
        pipe = node.pipe
        v = self.pipeline(dot, pipe)
        decl = pipe.decl
        if v is None or v is MISSING:
            items: Iterable[tuple[Any, Any]] = ()
        elif isinstance(v, bool) or not isinstance(v, (int, dict, list, tuple)):
            raise self.err(f"range can't iterate over {_fmt_v(v)[:80]}", node.pos)
        elif isinstance(v, int):
            if len(decl) > 1:
                raise self.err(f"can't use {v} to iterate over more than one variable", node.pos)
            items = ((i, i) for i in range(v))
        elif isinstance(v, dict):
            items = _map_items(v)
        else:
            items = list(enumerate(v))
        base = len(self.vars) - (0 if pipe.is_assign else len(decl))
        inner = len(self.vars)
        ran = False
        for key, elem in items:
            ran = True
            self.tick()
            if decl:
                if pipe.is_assign:
                    if len(decl) > 1:
                        self.set_var(decl[0], key)
                        self.set_var(decl[1], elem)
                    else:
                        self.set_var(decl[0], elem)
                elif len(decl) > 1:
                    self.vars[base] = (decl[0], key)
                    self.vars[base + 1] = (decl[1], elem)
                else:
                    self.vars[base] = (decl[0], elem)
            try:
                self.walk(node.body, elem)
            except _BreakSignal:
                del self.vars[inner:]
                break
            except _ContinueSignal:
                pass
            del self.vars[inner:]
        if not ran and node.else_ is not None:
            self.walk(node.else_, dot)

    # expressions
    def pipeline(self, dot: Any, pipe: _Pipe) -> Any:
        v: Any = _NOARG
        for cmd in pipe.cmds:
            v = self.command(dot, cmd, v)
        for name in pipe.decl:
            if pipe.is_assign:
                self.set_var(name, v)
            else:
                self.vars.append((name, v))
        return v

    def not_a_function(self, args: Sequence[_Node], final: Any) -> None:
        if len(args) > 1 or final is not _NOARG:
            raise self.err(f"can't give argument to non-function {args[0]}", args[0].pos)

    def command(self, dot: Any, cmd: _Command, final: Any) -> Any:
        first = cmd.args[0]
        self.pos = first.pos
        if isinstance(first, _Field):
            return self.field_chain(dot, first.idents, cmd.args, final)
        if isinstance(first, _Chain):
            return self.chain(dot, first, cmd.args, final)
        if isinstance(first, _Ident):
            return self.call(dot, first, cmd.args[1:], final)
        if isinstance(first, _Variable):
            return self.variable(dot, first, cmd.args, final)
        self.not_a_function(cmd.args, final)
        if isinstance(first, _Pipe):
            return self.pipeline(dot, first)
        if isinstance(first, _Nil):
            raise self.err("nil is not a command")
        return self.arg(dot, first)

    def field(self, recv: Any, name: str, has_args: bool) -> Any:
        if recv is None or recv is MISSING:
            return MISSING
        if isinstance(recv, GoStruct):
            if has_args:
                raise self.err(f"{name} has arguments but cannot be invoked as function")
            return recv.get(name)
        if isinstance(recv, dict):
            if has_args:
                raise self.err(f"{name} is not a method but has arguments")
            return recv.get(name, MISSING)
        raise self.err(f"can't evaluate field {name} in type {_type_name(recv)}")

    def field_chain(self, recv: Any, idents: tuple[str, ...], args: Sequence[_Node], final: Any) -> Any:
        for name in idents[:-1]:
            recv = self.field(recv, name, False)
        return self.field(recv, idents[-1], len(args) > 1 or final is not _NOARG)

    def variable(self, dot: Any, node: _Variable, args: Sequence[_Node], final: Any) -> Any:
        v = self.var(node.idents[0])
        if len(node.idents) == 1:
            self.not_a_function(args, final)
            return v
        return self.field_chain(v, node.idents[1:], args, final)

    def chain(self, dot: Any, node: _Chain, args: Sequence[_Node], final: Any) -> Any:
        if isinstance(node.node, _Nil):
            raise self.err(f"indirection through explicit nil in {node}")
        return self.field_chain(self.arg(dot, node.node), node.fields, args, final)

    def arg(self, dot: Any, n: _Node) -> Any:
        self.pos = n.pos
        if isinstance(n, _Literal):
            return n.value
        if isinstance(n, _Dot):
            return dot
        if isinstance(n, _Nil):
            return None
        if isinstance(n, _Field):
            return self.field_chain(dot, n.idents, (n,), _NOARG)
        if isinstance(n, _Variable):
            return self.variable(dot, n, (n,), _NOARG)
        if isinstance(n, _Pipe):
            return self.pipeline(dot, n)
        if isinstance(n, _Ident):
            return self.call(dot, n, (), _NOARG)
        if isinstance(n, _Chain):
            return self.chain(dot, n, (n,), _NOARG)
        raise self.err(f"unexpected node {n}")  # pragma: no cover

    def call(self, dot: Any, ident: _Ident, arg_nodes: Sequence[_Node], final: Any) -> Any:
        self.tick()
        name = ident.name
        nargs = len(arg_nodes) + (final is not _NOARG)
        builtin = self.funcs[name] is BUILTIN_FUNCS.get(name)
        lo, hi = _ARITY[name] if builtin else (0, None)
        if nargs < lo or (hi is not None and nargs > hi):
            want = f"at least {lo}" if hi is None else str(lo)
            raise self.err(f"wrong number of args for {name}: want {want} got {nargs}", ident.pos)
        if builtin and name in ("and", "or"):
            v: Any = None
            for a in arg_nodes:
                v = self.arg(dot, a)
                if _truth(v) == (name == "or"):
                    return v
            return final if final is not _NOARG else v
        args = [self.arg(dot, a) for a in arg_nodes]
        if final is not _NOARG:
            args.append(final)
        self.pos = ident.pos
        try:
            result = self.funcs[name](*args)
        except TemplateError:
            raise
        except (_FuncError, ValueError, TypeError, LookupError, ArithmeticError) as e:
            raise self.err(f"error calling {name}: {e}", ident.pos) from None
        if isinstance(result, str):
            self.work += len(result)
            if len(result) > self.max_output or self.work > 4 * self.max_output:
                raise self.err(f"output of {name} exceeds limits", ident.pos)
        return result


# --------------------------------------------------------------------------------------------------
# Template


def _identifiers(nodes: Iterable[_Node]) -> Iterator[str]:
    """Ollama's template.Identifiers: field and variable names in actions and control pipes."""
    for n in nodes:
        if isinstance(n, _Action):
            yield from _pipe_identifiers(n.pipe)
        elif isinstance(n, _Branch):
            yield from _pipe_identifiers(n.pipe)
            yield from _identifiers(n.body)
            if n.else_ is not None:
                yield from _identifiers(n.else_)


def _pipe_identifiers(pipe: _Pipe) -> Iterator[str]:
    for cmd in pipe.cmds:
        for a in cmd.args:
            if isinstance(a, (_Field, _Variable)):
                yield from a.idents
            elif isinstance(a, _Pipe):
                yield from _pipe_identifiers(a)


class _Cutter:
    """Ollama's deleteNode: keep everything up to the first field naming ``name``; drop what follows."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cut = False

    def gone(self, n: _Node) -> bool:
        if isinstance(n, _Field) and self.name in n.idents:
            self.cut = True
            return False
        return self.cut

    def nodes(self, nodes: list[_Node]) -> list[_Node] | None:
        if self.cut:
            return None
        out = []
        for n in nodes:
            k = self.node(n)
            if k is not None:
                out.append(k)
        return out

    def node(self, n: _Node) -> _Node | None:
        if self.gone(n):
            return None
        if isinstance(n, _Branch):
            body = self.nodes(n.body)
            else_ = self.nodes(n.else_) if n.else_ is not None else None
            return _Branch(n.pos, n.kind, n.pipe, body or [], else_)
        if isinstance(n, _Action):
            pipe = self.pipe(n.pipe)
            return None if pipe is None else _Action(n.pos, pipe)
        if isinstance(n, _Pipe):
            return self.pipe(n)
        return n

    def pipe(self, p: _Pipe) -> _Pipe | None:
        if self.gone(p):
            return None
        cmds = []
        for c in p.cmds:
            args = [k for k in (self.node(a) for a in c.args) if k is not None]
            if not args:
                return None
            cmds.append(_Command(c.pos, args))
        return _Pipe(p.pos, p.decl, p.is_assign, cmds)


class Template:
    """A parsed template; immutable and safe to share between threads."""

    __slots__ = ("_cut_cache", "funcs", "identifiers", "nodes", "source")

    def __init__(self, source: str, nodes: list[_Node], funcs: Mapping[str, Callable[..., Any]]) -> None:
        self.source = source
        self.nodes = nodes
        self.funcs = funcs
        self.identifiers: frozenset[str] = frozenset(x.lower() for x in _identifiers(nodes))
        """Lower-cased field and variable names used in actions (Ollama's ``Template.Vars``)."""
        self._cut_cache: dict[str, Template] = {}

    def render(self, data: Any = None, *, max_output: int = MAX_OUTPUT_CHARS,
               max_steps: int = MAX_STEPS) -> str:
        """Execute with ``data`` as dot and ``$``; raises TemplateError on any failure or limit."""
        ex = _Exec(self, data, max_output, max_steps)
        try:
            ex.walk(self.nodes, data)
        except (_BreakSignal, _ContinueSignal):  # pragma: no cover - the parser rejects these
            raise ex.err("break/continue outside range") from None
        except RecursionError:
            raise ex.err("value nesting too deep") from None
        return "".join(ex.out)

    def with_trailing_field(self, name: str) -> Template:
        """A copy with ``{{ .name }}`` appended (Ollama appends ``{{ .Response }}``)."""
        pos = len(self.source)
        act = _Action(pos, _Pipe(pos, (), False, [_Command(pos, [_Field(pos, (name,))])]))
        return Template(self.source, [*self.nodes, act], self.funcs)

    def truncated_after_field(self, name: str) -> Template:
        """A copy that stops right after the first ``.name`` field (Ollama's legacy last turn)."""
        t = self._cut_cache.get(name)
        if t is None:
            c = _Cutter(name)
            t = Template(self.source, c.nodes(self.nodes) or [], self.funcs)
            self._cut_cache[name] = t
        return t

    def __repr__(self) -> str:
        return f"Template({self.source[:60]!r})"


def _parse(source: str, funcs: Mapping[str, Callable[..., Any]]) -> Template:
    try:
        toks = _Lexer(source).run()
        return Template(source, _Parser(source, toks, funcs).parse(), funcs)
    except RecursionError:
        raise TemplateError("template nesting too deep", None, source) from None


@functools.lru_cache(maxsize=256)
def _parse_cached(source: str) -> Template:
    return _parse(source, BUILTIN_FUNCS)


def parse(source: str, funcs: Mapping[str, Callable[..., Any]] | None = None) -> Template:
    """Parse Go template text; ``funcs`` adds or overrides functions. Raises TemplateError."""
    if not isinstance(source, str):
        raise TemplateError(f"template must be a string, not {type(source).__name__}")
    if funcs is None:
        return _parse_cached(source)
    return _parse(source, {**BUILTIN_FUNCS, **funcs})
