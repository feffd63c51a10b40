"""Ollama API request schemas and the small value formats the API shares (durations, timestamps, options).

Requests are decoded leniently like Ollama's Go server (unknown fields ignored) but every known
field is type checked, and a wrong type is reported the way Go's json decoder words it, since
that is the text Ollama clients already show their users.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class ApiError(Exception):
    """An error with the HTTP status and message Ollama would answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---- JSON decoding with Go-style messages ------------------------------------------------------

_GO_TYPES = {str: "string", bool: "bool", int: "int", float: "float64"}


def _json_kind(v: object) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def _no_surrogates(v: Any) -> Any:
    """Lone UTF-16 surrogates (`"\\ud800"`) become U+FFFD, as Go's decoder does: they cannot be encoded as
    UTF-8, so they would fail wherever the text goes next (the runner pipe, the store, the response)."""
    if isinstance(v, str):
        return _SURROGATE.sub("\ufffd", v)
    if isinstance(v, list):
        return [_no_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {_no_surrogates(k): _no_surrogates(x) for k, x in v.items()}
    return v


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def load_json(body: bytes) -> Any:
    if not body or not body.strip():
        raise ApiError(400, "missing request body")
    try:
        # strictly UTF-8 (json.loads of bytes would also take UTF-16/32, and with them raw lone surrogates);
        # then a surrogate can only arrive as a \u escape, and paired ones are decoded already
        text = body.decode()
        data = json.loads(text)
        return _no_surrogates(data) if _SURROGATE_ESCAPE.search(text) else data
    except UnicodeDecodeError:
        raise ApiError(400, "invalid character in request body: not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"invalid JSON: {e.msg} at offset {e.pos}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except ValueError:  # an integer literal longer than Python converts (4300 digits)
        raise ApiError(400, "invalid JSON: a number has too many digits") from None


class Req(BaseModel):
    """Base for request bodies: unknown keys ignored, known keys strictly typed (ints accepted as floats)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    go_name: ClassVar[str] = "Request"

    @classmethod
    def parse(cls, body: bytes) -> Any:
        return cls.from_data(load_json(body))

    @classmethod
    def from_data(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ApiError(400, f"json: cannot unmarshal {_json_kind(data)} into Go value of type api.{cls.go_name}")
        try:
            return cls.model_validate(_drop_nulls(data))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
            field = cls.model_fields.get(str(err["loc"][0])) if err["loc"] else None
            gotype = _go_type(field.annotation) if field else "value"
            got = _json_kind(err.get("input"))
            raise ApiError(
                400, f"json: cannot unmarshal {got} into Go struct field {cls.go_name}.{loc} of type {gotype}"
            ) from None


def _drop_nulls(data: dict[str, Any]) -> dict[str, Any]:
    """Go's decoder leaves a field at its zero value when the JSON says null, so clients send `"content": null`
    (assistant messages with tool calls) or `"prompt": null` and expect it to work; absent means the same here."""
    out = {k: v for k, v in data.items() if v is not None}
    msgs = out.get("messages")
    if isinstance(msgs, list):
        out["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else
                           {} if m is None else m for m in msgs]
    return out


def _go_type(ann: object) -> str:
    text = str(ann)
    for py, go in _GO_TYPES.items():
        if ann == py or text in (f"{py.__name__} | None", f"typing.Optional[{py.__name__}]"):
            return go
    if "list[str]" in text:
        return "[]string"
    if "list[int]" in text:
        return "[]int"
    if "list" in text:
        return "[]interface {}"
    if "dict" in text:
        return "map[string]interface {}"
    return "interface {}"


class GenerateRequest(Req):
    go_name: ClassVar[str] = "GenerateRequest"
    model: str | None = None
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool | None = None
    raw: bool = False
    format: Any = None
    images: list[str] | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    think: Any = None
    logprobs: bool = False
    top_logprobs: int = 0


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str = ""
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ChatRequest(Req):
    go_name: ClassVar[str] = "ChatRequest"
    model: str | None = None
    messages: list[Message] | None = None
    stream: bool | None = None
    format: Any = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None
    tools: list[dict[str, Any]] | None = None
    think: Any = None
    logprobs: bool = False
    top_logprobs: int = 0


class EmbedRequest(Req):
    go_name: ClassVar[str] = "EmbedRequest"
    model: str | None = None
    input: Any = None
    truncate: bool | None = None
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class EmbeddingsRequest(Req):
    go_name: ClassVar[str] = "EmbeddingRequest"
    model: str | None = None
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class ModelRef(Req):
    """Bodies that name one model (`model`, or the deprecated `name`)."""

    go_name: ClassVar[str] = "ShowRequest"
    model: str | None = None
    name: str | None = None
    verbose: bool = False
    insecure: bool = False
    stream: bool | None = None

    @property
    def ref(self) -> str:
        return self.model or self.name or ""


class CopyRequest(Req):
    go_name: ClassVar[str] = "CopyRequest"
    source: str = ""
    destination: str = ""


class CreateRequest(Req):
    go_name: ClassVar[str] = "CreateRequest"
    model: str | None = None
    name: str | None = None
    from_: str | None = None
    files: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: Any = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None
    quantize: str | None = None
    stream: bool | None = None

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    @classmethod
    def parse(cls, body: bytes) -> CreateRequest:
        data = load_json(body)
        if isinstance(data, dict) and "from" in data:
            data["from_"] = data.pop("from")
        return cls.from_data(data)

    @property
    def ref(self) -> str:
        return self.model or self.name or ""


# ---- options -------------------------------------------------------------------------------------

INT_OPTIONS = {
    "num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
    "main_gpu", "num_thread", "draft_num_predict",
}
FLOAT_OPTIONS = {
    "top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty",
}
BOOL_OPTIONS = {"use_mmap", "numa", "low_vram", "f16_kv", "vocab_only", "use_mlock", "penalize_newline"}
_I64 = 1 << 63


def normalize_options(opts: dict[str, Any] | None) -> dict[str, Any]:
    """Type check known options (Ollama rejects a wrong type for a known key) and drop unknown ones."""
    out: dict[str, Any] = {}
    for key, val in (opts or {}).items():
        if val is None:
            continue
        got = "a non-finite number" if isinstance(val, float) and not math.isfinite(val) else _json_kind(val)
        if key in INT_OPTIONS:
            if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
                raise ApiError(400, f"option {key!r} must be an integer, got {got}")
            if val != int(val):
                raise ApiError(400, f"option {key!r} must be an integer, got {val}")
            if not -_I64 <= int(val) < _I64:  # Go's int
                raise ApiError(400, f"option {key!r} is out of range: {int(val)}")
            out[key] = int(val)
        elif key in FLOAT_OPTIONS:
            if isinstance(val, bool) or not isinstance(val, int | float) or not math.isfinite(val):
                raise ApiError(400, f"option {key!r} must be a finite number, got {got}")
            out[key] = float(val)
        elif key in BOOL_OPTIONS:
            if not isinstance(val, bool):
                raise ApiError(400, f"option {key!r} must be a boolean, got {_json_kind(val)}")
            out[key] = val
        elif key == "stop":
            if isinstance(val, str):
                val = [val]
            if not isinstance(val, list) or not all(isinstance(s, str) for s in val):
                raise ApiError(400, "option 'stop' must be a list of strings")
            out[key] = val
        # unknown keys are ignored, as Ollama does (clients still send removed options)
    if out.get("num_ctx", 1) < 1:
        raise ApiError(400, "option 'num_ctx' must be positive")
    return out


# ---- durations and timestamps --------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DUR_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds, with Go's error texts."""
    orig = text
    if text in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if text and text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if not text:
        raise ValueError(f'time: invalid duration "{orig}"')
    total, pos = 0.0, 0
    while pos < len(text):
        m = _DUR_PART.match(text, pos)
        if not m:
            if re.match(r"(\d+\.?\d*|\.\d+)$", text[pos:]):
                raise ValueError(f'time: missing unit in duration "{orig}"')
            if re.match(r"(\d+\.?\d*|\.\d+)[^\d.]", text[pos:]):
                unit = re.sub(r"^[\d.]+", "", text[pos:])
                unit = re.match(r"[^\d.]+", unit)
                raise ValueError(f'time: unknown unit "{unit.group(0) if unit else ""}" in duration "{orig}"')
            raise ValueError(f'time: invalid duration "{orig}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def keep_alive_seconds(value: object) -> float | None:
    """None → server default; a number is seconds; a string is a Go duration; negative means forever."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiError(400, "json: cannot unmarshal bool into Go struct field .keep_alive of type api.Duration")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ApiError(400, "invalid keep_alive value")
        secs = float(value)
    elif isinstance(value, str):
        try:
            secs = parse_go_duration(value)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
    else:
        raise ApiError(400, f"json: cannot unmarshal {_json_kind(value)} into Go struct field .keep_alive "
                            "of type api.Duration")
    # negative means forever; so does anything past ten years (timers cannot hold 1e308 seconds)
    return math.inf if secs < 0 or secs > 315_360_000 else secs


def rfc3339(ts: float | datetime | None = None, local: bool = False) -> str:
    """Go's RFC3339Nano: fraction with trailing zeros trimmed; UTC with Z, or local time with an offset."""
    if isinstance(ts, datetime):
        dt = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    else:
        dt = datetime.fromtimestamp(ts, UTC) if ts is not None else datetime.now(UTC)
    if local:
        dt = dt.astimezone()
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{dt.microsecond:06d}".rstrip("0")
    if frac:
        base += "." + frac
    if local:
        off = dt.strftime("%z")
        return base + (off[:3] + ":" + off[3:] if off not in ("+0000", "") else "Z")
    return base + "Z"
