"""Modelfiles: parsing (Ollama's parser/parser.go), typed PARAMETER values (api.FormatParams), and the text
/api/show renders back.

Values follow Ollama's rule: a value runs to the end of its line, unless it opens a `"` or `\"\"\"` quote,
in which case it runs to the first line end where the (trimmed) text so far closes that quote; the quotes are
then removed and the inside kept verbatim. Comments are whole lines starting with `#`; commands ignore case.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

INT_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed", "num_predict", "top_k",
    "repeat_last_n", "draft_num_predict",
})
FLOAT_OPTIONS = frozenset({
    "top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty",
})
BOOL_OPTIONS = frozenset({"use_mmap"})
LIST_OPTIONS = frozenset({"stop"})
KNOWN_OPTIONS = INT_OPTIONS | FLOAT_OPTIONS | BOOL_OPTIONS | LIST_OPTIONS
# Ollama warns about and drops these instead of failing, so old Modelfiles keep building.
DEPRECATED_PARAMETERS = frozenset({
    "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "mirostat",
    "mirostat_tau", "mirostat_eta", "tfs_z", "numa",
})

COMMANDS = ("from", "license", "template", "system", "adapter", "renderer", "parser", "requires", "parameter",
            "message")
MESSAGE_ROLES = ("system", "user", "assistant")

ERR_INVALID_COMMAND = ('command must be one of "from", "license", "template", "system", "adapter", '
                       '"renderer", "parser", "requires", "parameter", or "message"')
ERR_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'
ERR_NO_FROM = "no FROM line"

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.I)
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
          "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
_F32_MAX = 3.4028234663852886e38
_I64 = 1 << 63


class ModelfileError(ValueError):
    """A Modelfile problem; `msg` is Ollama's text, `line` the 1-based line it was found on (if known)."""

    def __init__(self, msg: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {msg}" if line is not None else msg)
        self.msg = msg
        self.line = line


def parse_parameter(name: str, value: str) -> Any:
    """One PARAMETER value typed like Go's FormatParams; `stop` gives a one-element list."""
    if name in LIST_OPTIONS:
        return [value]
    if name in INT_OPTIONS:
        if not _INT_RE.fullmatch(value) or not -_I64 <= int(value) < _I64:
            raise ModelfileError(f"invalid int value [{value}]")
        return int(value)
    if name in FLOAT_OPTIONS:
        if not _FLOAT_RE.fullmatch(value):
            raise ModelfileError(f"invalid float value [{value}]")
        f = float(value)
        if math.isfinite(f) and abs(f) > _F32_MAX:  # ParseFloat(s, 32) reports a range error
            raise ModelfileError(f"invalid float value [{value}]")
        return f
    if name in BOOL_OPTIONS:
        if value not in _BOOLS:
            raise ModelfileError(f"invalid bool value [{value}]")
        return _BOOLS[value]
    raise ModelfileError(f"unknown parameter '{name}'")


@dataclass
class Modelfile:
    from_: str = ""
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    adapters: list[str] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    renderer: str | None = None
    parser: str | None = None
    requires: str | None = None
    warnings: list[str] = field(default_factory=list)

    def create_request(self) -> dict[str, Any]:
        """The /api/create body (before a client swaps a local FROM path for uploaded `files`)."""
        req: dict[str, Any] = {"from": self.from_}
        for key in ("template", "system", "renderer", "parser", "requires"):
            if getattr(self, key) is not None:
                req[key] = getattr(self, key)
        if self.parameters:
            req["parameters"] = dict(self.parameters)
        if self.license:
            req["license"] = list(self.license)
        if self.messages:
            req["messages"] = [dict(m) for m in self.messages]
        return req


def _unquote(s: str) -> str | None:
    """Go's unquote: strip a closed `\"\"\"`/`"` pair; None while the quote is still open."""
    if s.startswith('"""'):
        return s[3:-3] if len(s) >= 6 and s.endswith('"""') else None
    if s.startswith('"'):
        return s[1:-1] if len(s) >= 2 and s.endswith('"') else None
    return s


def _word(text: str, pos: int, ok: str) -> tuple[str, int]:
    end = pos
    while end < len(text) and (text[end].isascii() and (text[end].isalpha() if ok == "alpha"
                                                        else text[end].isalnum() or text[end] == "_")):
        end += 1
    return text[pos:end], end


def parse_modelfile(text: str, *, require_from: bool = True) -> Modelfile:
    """Parse Modelfile text; raises ModelfileError with the line number of the offending command."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    mf = Modelfile()
    seen_from = False
    i = 0
    while i < len(lines):
        lineno = i + 1
        line = lines[i].lstrip(" \t")
        i += 1
        if not line or line.startswith("#"):
            continue
        word, pos = _word(line, 0, "alpha")
        cmd = word.lower()
        if not word or cmd not in COMMANDS or (pos < len(line) and line[pos] not in " \t"):
            raise ModelfileError(ERR_INVALID_COMMAND, lineno)
        if pos >= len(line):
            raise ModelfileError(f"missing value for {word.upper()}", lineno)
        pos += 1
        sub = ""
        if cmd in ("parameter", "message"):
            pos = len(line) - len(line[pos:].lstrip(" \t"))
            sub, end = _word(line, pos, "alpha" if cmd == "message" else "word")
            if not sub:
                raise ModelfileError(f"missing {'role' if cmd == 'message' else 'name'} for {cmd.upper()}",
                                     lineno)
            if end < len(line) and line[end] not in " \t":
                if cmd == "message":
                    raise ModelfileError(ERR_INVALID_ROLE, lineno)
                raise ModelfileError(f"invalid parameter name {line[pos:].split()[0]!r}", lineno)
            if end >= len(line):
                raise ModelfileError(f"missing value for {cmd.upper()} {sub}", lineno)
            pos = end + 1
        # Extend the value line by line until its quotes (if any) are closed, exactly as Ollama does.
        value = line[pos:]
        inner = _unquote(value.strip())
        while inner is None:
            if i >= len(lines):
                raise ModelfileError("unterminated quoted string", lineno)
            value += "\n" + lines[i]
            i += 1
            inner = _unquote(value.strip())
        _apply(mf, cmd, sub, inner, lineno)
        seen_from = seen_from or cmd == "from"
    if require_from and not seen_from:
        raise ModelfileError(ERR_NO_FROM)
    return mf


def _apply(mf: Modelfile, cmd: str, sub: str, value: str, lineno: int) -> None:
    if cmd == "from":
        if not value:
            raise ModelfileError("missing value for FROM", lineno)
        mf.from_ = value
    elif cmd == "template":
        mf.template = value
    elif cmd == "system":
        mf.system = value
    elif cmd == "license":
        mf.license.append(value)
    elif cmd == "adapter":
        mf.adapters.append(value)
    elif cmd in ("renderer", "parser", "requires"):
        setattr(mf, cmd, value)
    elif cmd == "message":
        role = sub.lower()
        if role not in MESSAGE_ROLES:
            raise ModelfileError(ERR_INVALID_ROLE, lineno)
        mf.messages.append({"role": role, "content": value})
    else:  # parameter
        if sub in DEPRECATED_PARAMETERS:
            mf.warnings.append(f"parameter {sub} is deprecated")
            return
        try:
            typed = parse_parameter(sub, value)
        except ModelfileError as e:
            raise ModelfileError(e.msg, lineno) from None
        if isinstance(typed, list):
            mf.parameters.setdefault(sub, []).extend(typed)
        else:
            mf.parameters[sub] = typed


# ---- rendering (for /api/show) ----------------------------------------------------------------------------


def go_float(v: float) -> str:
    """Go's %v / %g with shortest precision: 4096 → "4096", 1e6 → "1e+06", 0.7 → "0.7"."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1, v) < 0 else "0"
    sign, digits, exp = Decimal(repr(float(v))).as_tuple()
    ds = "".join(map(str, digits)).rstrip("0")
    assert isinstance(exp, int)
    exp += len(digits) - len(ds)
    x = exp + len(ds) - 1  # decimal exponent of the leading digit
    neg = "-" if sign else ""
    if x < -4 or x >= 6:  # Go uses eprec 6 for shortest %g
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if exp >= 0:
        return neg + ds + "0" * exp
    point = len(ds) + exp
    if point > 0:
        return f"{neg}{ds[:point]}.{ds[point:]}"
    return f"{neg}0.{'0' * -point}{ds}"


def _go_value(v: Any, sharp: bool) -> str:
    """Go's %v (sharp=False) or %#v (sharp=True) for a JSON-decoded value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return go_float(float(v))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False) if sharp else v
    return json.dumps(v, ensure_ascii=False)


def _param_items(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k in sorted(params):
        v = params[k]
        out += [(k, x) for x in v] if isinstance(v, list) else [(k, v)]
    return out


def format_parameters(params: Mapping[str, Any]) -> str:
    """/api/show's `parameters`: `%-30s %#v` lines, one per list item (sorted; Go's map order is random)."""
    return "\n".join(f"{k:<30} {_go_value(v, True)}" for k, v in _param_items(params))


def _quote(s: str) -> str:
    if "\n" in s or s.startswith(" ") or s.endswith(" "):
        return f'"""{s}"""' if '"' in s else f'"{s}"'
    return s


def format_modelfile(
    *, from_: str, short_name: str, template: str | None = None, system: str = "",
    parameters: Mapping[str, Any] | None = None, license: Sequence[str] = (),
    messages: Sequence[Mapping[str, Any]] = (), adapters: Sequence[str] = (), projectors: Sequence[str] = (),
    renderer: str = "", parser: str = "",
) -> str:
    """/api/show's `modelfile`, laid out as Ollama's Model.String() under its "generated by" header."""
    out = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {short_name}",
        "",
        f"FROM {from_}",
    ]
    out += [f"ADAPTER {_quote(a)}" for a in adapters]
    out += [f"FROM {p}" for p in projectors]
    if template is not None:
        out.append(f"TEMPLATE {_quote(template)}")
    if system:
        out.append(f"SYSTEM {_quote(system)}")
    if renderer:
        out.append(f"RENDERER {_quote(renderer)}")
    if parser:
        out.append(f"PARSER {_quote(parser)}")
    out += [f"PARAMETER {k} {_quote(_go_value(v, False))}" for k, v in _param_items(parameters or {})]
    out += [f"LICENSE {_quote(x)}" for x in license]
    out += [f"MESSAGE {m.get('role', '')} {_quote(str(m.get('content', '')))}" for m in messages]
    return "\n".join(out) + "\n"
