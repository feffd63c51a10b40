"""`omx`: the scriptable command line for an omx node.

A pure HTTP client of the node's Ollama-compatible API (it never imports the node or the model
code), so everything it does a user's own script could do too. Tables are for people; `--json`
prints the server's objects unchanged for scripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import httpx
import typer
from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table

from omx.console import cli_proxy as _cli_proxy
from omx.console import cli_transfer as _cli_transfer
from omx.protocols.hosts import HostError, parse_host
from omx.protocols.modelfile import Modelfile, ModelfileError, parse_modelfile

DEFAULT_HOST = "127.0.0.1:11434"
BLOB_CHUNK = 1 << 20
FOREVER_S = 5 * 365 * 86400  # an expiry further out than this is the node's "keep loaded forever"


def client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ollamamax")
    except PackageNotFoundError:
        return "0.0.0"


class CliError(Exception):
    """A failure shown as one `omx: ...` line on stderr, with exit code 1 (never a traceback)."""


class NodeUnreachable(CliError):
    """No connection at all: every further request to the same node would fail the same way."""


# ---- HTTP ----------------------------------------------------------------------------------------

def _os_reason(exc: BaseException) -> str:
    """The innermost OS-level cause ("connection refused"), which says more than httpx's wrapper."""
    seen: BaseException | None = exc
    reason = str(exc)
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            reason = seen.strerror
        elif str(seen):
            reason = str(seen)
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, httpx.TimeoutException) and not reason:
        reason = "timed out"
    reason = re.sub(r"^\[Errno -?\d+\]\s*", "", reason).strip()
    return (reason[:1].lower() + reason[1:]) if reason else type(exc).__name__


def _error_text(resp: httpx.Response) -> str:
    """Ollama's `{"error": "..."}` text (or the OpenAI-shaped one); otherwise the status line."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        err = body["error"]
        if isinstance(err, dict):
            err = err.get("message") or json.dumps(err)
        return str(err)
    text = resp.text.strip()
    if text and len(text) < 300:
        return text
    return f"HTTP {resp.status_code} {resp.reason_phrase}".strip()


def segment(value: str, what: str = "node id") -> str:
    """A user's value as one URL path segment: `../node/leave#` must never reach another route."""
    if not value:
        raise CliError(f"the {what} must not be empty")
    if value in (".", ".."):
        return value.replace(".", "%2E")  # quote() keeps dots, and httpx would resolve the segment away
    return quote(value, safe="")


class NodeClient:
    """Blocking client for one node; turns every transport and HTTP failure into a CliError."""

    def __init__(self, url: str) -> None:
        self.url = url
        # No read timeout: a first request may wait minutes while the node loads a model.
        self._http = httpx.Client(
            base_url=url,
            timeout=httpx.Timeout(None, connect=10.0),
            headers={"User-Agent": f"omx/{client_version()}"},
        )

    def _transport_error(self, exc: httpx.TransportError) -> CliError:
        reason = _os_reason(exc)
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return NodeUnreachable(
                f"cannot reach the omx node at {self.url} ({reason}) — is it running? "
                "start one with 'omx node start'"
            )
        return CliError(f"lost the connection to the omx node at {self.url} ({reason})")

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, json=body, **kw)
        except httpx.TransportError as e:
            raise self._transport_error(e) from None
        if resp.is_error:
            raise CliError(_error_text(resp))
        return resp

    def exists(self, path: str) -> bool:
        """HEAD: 200 means present; any other status means absent."""
        try:
            return self._http.head(path).status_code == 200
        except httpx.TransportError as e:
            raise self._transport_error(e) from None

    def json(self, method: str, path: str, body: Any = None, rows: dict[str, type] | None = None) -> dict[str, Any]:
        """The answer's JSON object; `rows` names fields that must hold a list (or object) of objects.

        Every omx route answers an object: anything else means --host points at some other server, which
        would otherwise surface as a traceback deep in a table renderer.
        """
        resp = self.request(method, path, body)
        try:
            data = resp.json()
        except ValueError:
            raise CliError(f"the node at {self.url} answered {path} with non-JSON") from None
        if not isinstance(data, dict):
            raise self.odd_answer(path, f"a JSON {_json_kind(data)}, not an object")
        for key, kind in (rows or {}).items():
            value = data.get(key)
            if value is None:
                continue
            items = value.values() if isinstance(value, dict) else value
            if not isinstance(value, kind) or not all(isinstance(x, dict) for x in items):
                raise self.odd_answer(path, f"{key!r} is not a {'list' if kind is list else 'map'} of objects")
        return data

    def odd_answer(self, path: str, what: str) -> CliError:
        return CliError(f"{self.url} did not answer like an omx node: {path}: {what}")

    def stream(self, method: str, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """NDJSON objects as they arrive; an `{"error": ...}` line (even mid-stream) raises."""
        try:
            with self._http.stream(method, path, json=body) as resp:
                if resp.is_error:
                    resp.read()
                    raise CliError(_error_text(resp))
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        raise CliError(f"unexpected line from the node: {line[:200]!r}") from None
                    if isinstance(obj, dict) and obj.get("error"):
                        raise CliError(str(obj["error"]))
                    if isinstance(obj, dict):
                        yield obj
        except httpx.TransportError as e:
            raise self._transport_error(e) from None

    def close(self) -> None:
        self._http.close()


# ---- formatting ----------------------------------------------------------------------------------

_JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}


def _json_kind(value: object) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def number(value: object) -> int | float | None:
    """A finite JSON number from an answer, else None: a server that is not an omx node may send "abc",
    or 1e400, which json reads as inf."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def obj(value: object) -> dict[str, Any]:
    """A nested object of an answer, or {} when it is something else (its fields then show as absent)."""
    return value if isinstance(value, dict) else {}


def names(value: object) -> str:
    """A list of names from an answer as "a, b"; anything else as its text."""
    if isinstance(value, list):
        return ", ".join(str(x) for x in value)
    return "" if value is None else str(value)


def human_bytes(n: object) -> str:
    """Ollama's format.HumanBytes: decimal units, whole numbers from 10 up ("1.2 GB", "15 MB"); "?" if no number."""
    value = number(n if n is not None else 0)
    if value is None or value < 0:
        return "?"
    n = int(value)
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if n >= scale:
            scaled = n / scale
            if scaled >= 10 or scaled == int(scaled):
                return f"{int(scaled)} {unit}"
            return f"{scaled:.1f} {unit}"
    return f"{n} B"


def human_duration(seconds: float) -> str:
    """Ollama's humanDuration: "Less than a second", "About a minute", "3 hours", "2 weeks"."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 86400 / 365)} years"


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp from the API (Go writes up to 9 fraction digits); None if absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip())
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def human_time(dt: datetime | None, zero: str = "Never", now: datetime | None = None) -> str:
    """Ollama's format.HumanTime: "2 minutes ago", "4 minutes from now", "Forever"."""
    if dt is None or dt.year <= 1:
        return zero
    delta = ((now or datetime.now(UTC)) - dt).total_seconds()
    if delta < -FOREVER_S:
        return "Forever"
    if delta < 0:
        return human_duration(-delta) + " from now"
    return human_duration(delta) + " ago"


def short_id(digest: object) -> str:
    return str(digest or "").removeprefix("sha256:")[:12]


def processor_text(size: int, size_vram: int) -> str:
    """Ollama's PROCESSOR column: where the loaded weights live."""
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size == 0:
        return "Unknown"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def _stdout() -> Console:
    # Off a terminal rich assumes 80 columns and would wrap table cells; scripts want whole lines.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 4000)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _table(*headers: str) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 3, 0, 0))
    for h in headers:
        table.add_column(h, no_wrap=True)
    return table


def _print_table(table: Table) -> None:
    """Print without the padding rich leaves at line ends (noise in diffs and `grep`-ed output)."""
    console = _stdout()
    with console.capture() as cap:
        console.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class TokenWriter:
    """Writes streamed text as it arrives; on a terminal, wraps at word boundaries like `ollama run`.

    Only the current word is held back (so a word is never split across lines); everything else
    is written and flushed at once.
    """

    def __init__(self, width: int | None, out: Any = None) -> None:
        self.width = width if width and width > 10 else None
        self.out = out or sys.stdout
        self.col = 0
        self.word = ""
        self.last = ""

    def _emit(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.last = text[-1]

    def _flush_word(self) -> None:
        if not self.word:
            return
        w = cell_len(self.word)
        if self.width and self.col > 0 and self.col + w > self.width:
            self._emit("\n")
            self.col = 0
        self._emit(self.word)
        self.col += w
        self.word = ""

    def write(self, text: str) -> None:
        if not text:
            return
        if self.width is None:
            self._emit(text)
        else:
            for ch in text:
                if ch == "\n":
                    self._flush_word()
                    self._emit("\n")
                    self.col = 0
                elif ch.isspace():
                    self._flush_word()
                    if self.col + 1 > self.width:
                        self._emit("\n")
                        self.col = 0
                    else:
                        self._emit(ch)
                        self.col += 1
                else:
                    self.word += ch
                    if cell_len(self.word) >= self.width:
                        self._flush_word()
        self.out.flush()

    def finish(self) -> None:
        """Flush the held word and end the line, so the shell prompt starts on its own line."""
        self._flush_word()
        if self.last and self.last != "\n":
            self._emit("\n")
        self.out.flush()


# ---- create: files and uploads -------------------------------------------------------------------

# What an HF directory contributes (Ollama's cmd/create file globs, plus slow-tokenizer files).
_HF_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "merges.txt", "vocab.txt", "*.tiktoken")


def model_files(path: Path) -> list[tuple[str, Path]]:
    """(name sent to /api/create, local path) for a GGUF file or a Hugging Face style directory."""
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise CliError(f"{path} is not a GGUF file")
        return [(path.name, path)]
    if not path.is_dir():
        raise CliError(f"{path}: not a file or directory")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        if len(ggufs) == 1:
            return model_files(ggufs[0])
        raise CliError(
            f"{path} is not a model directory: it needs config.json and *.safetensors files (or one .gguf)"
        )
    found: dict[str, Path] = {}
    for pattern in _HF_PATTERNS:
        for p in sorted(path.glob(pattern)):
            if p.is_file():
                found[p.name] = p
    # sentencepiece model only when there is no tokenizer.json, as Ollama does
    if "tokenizer.json" not in found and (path / "tokenizer.model").is_file():
        found["tokenizer.model"] = path / "tokenizer.model"
    return sorted(found.items())


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(BLOB_CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def upload_blob(
    client: NodeClient, path: Path, hexd: str, on_bytes: Callable[[int], None] | None = None
) -> bool:
    """Send one file to /api/blobs unless the node has it already; True when bytes were sent."""
    size = path.stat().st_size
    if client.exists(f"/api/blobs/sha256:{hexd}"):
        if on_bytes:
            on_bytes(size)
        return False

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(BLOB_CHUNK):
                if on_bytes:
                    on_bytes(len(chunk))
                yield chunk

    # Streamed with an explicit length: GB files never sit in memory and need no chunked encoding.
    client.request(
        "POST", f"/api/blobs/sha256:{hexd}", content=chunks(), headers={"Content-Length": str(size)}
    )
    return True


class ProgressView:
    """Progress statuses on stderr: live bars on a terminal, one line per new status otherwise."""

    def __init__(self) -> None:
        self.console = _stderr()
        self.live = self.console.is_terminal
        self.last: str | None = None
        self.tasks: dict[str, TaskID] = {}
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(), DownloadColumn(),
                console=self.console, transient=False,
            )
            self.progress.start()

    def update(self, status: str, total: int | None = None, completed: int | None = None) -> None:
        if self.progress is None or not total:
            # a step without a size ("writing manifest", "success") is just a line
            if status != self.last and status not in self.tasks:
                self._finish_bars()
                # names are data: "m:a" must not become an emoji, nor "[x]" markup
                self.console.print(status, markup=False, emoji=False, soft_wrap=True)
            self.last = status
            return
        if status not in self.tasks:
            self._finish_bars()
            self.tasks[status] = self.progress.add_task(status, total=total)
        tid = self.tasks[status]
        self.progress.update(tid, total=total, completed=completed or 0)
        self.last = status

    def advance(self, status: str, n: float) -> None:
        if self.progress is not None and status in self.tasks:
            self.progress.advance(self.tasks[status], n)

    def _finish_bars(self) -> None:
        """A new status means the earlier steps are done."""
        if self.progress is not None:
            for tid in self.tasks.values():
                t = self.progress.tasks[tid]
                self.progress.update(tid, total=t.total or 1, completed=t.total or 1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.lower().endswith((".gguf", ".safetensors"))


def expand_user(path: Path) -> Path:
    """Path.expanduser, with `~nosuchuser` as a CliError instead of a RuntimeError."""
    try:
        return path.expanduser()
    except RuntimeError:
        raise CliError(f"{path}: cannot expand {path.parts[0]!r}: no such user") from None


def _resolve_source(source: str, base: Path) -> Path | None:
    """A FROM/--from that exists on disk is a path (relative to the Modelfile's folder); else None."""
    p = expand_user(Path(source))
    if not p.is_absolute():
        p = base / p
    if p.exists():
        return p
    if _looks_like_path(source):
        raise CliError(f"{p}: no such file or directory")
    return None


# ---- the command line ----------------------------------------------------------------------------

app = typer.Typer(
    name="omx",
    help="Command line for OllamaMax (omx) nodes: list, run and manage models over the Ollama API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
node_app = typer.Typer(help="Run an omx node on this machine.", no_args_is_help=True)
app.add_typer(node_app, name="node")


@dataclass
class _Globals:
    host: str | None = None


_globals = _Globals()

HostOpt = Annotated[
    str | None,
    typer.Option("--host", help="Node address, OLLAMA_HOST forms (default: $OMX_HOST or 127.0.0.1:11434)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's JSON instead of a table.")]


@app.callback()
def _root(
    host: Annotated[
        str | None,
        typer.Option("--host", envvar="OMX_HOST", help="Node address, OLLAMA_HOST forms.", show_envvar=True),
    ] = None,
) -> None:
    _globals.host = host


def node_url(host: str | None = None) -> str:
    """The base URL from --host (command, then global), $OMX_HOST, or the default."""
    value = host or _globals.host or os.environ.get("OMX_HOST") or DEFAULT_HOST
    try:
        return parse_host(value).url
    except HostError as e:
        # the global --host and OMX_HOST arrive as one value (typer's envvar): name the likelier one
        origin = "OMX_HOST" if not host and value == os.environ.get("OMX_HOST") else "--host"
        raise CliError(f"{origin}: {e}") from None


def _client(host: str | None) -> NodeClient:
    return NodeClient(node_url(host))


@app.command("list")
def list_cmd(host: HostOpt = None, as_json: JsonOpt = False) -> None:
    """List the models on the node."""
    data = _client(host).json("GET", "/api/tags", rows={"models": list})
    if as_json:
        _print_json(data)
        return
    table = _table("NAME", "ID", "SIZE", "MODIFIED")
    for m in data.get("models") or []:
        table.add_row(
            str(m.get("name") or m.get("model") or ""),
            short_id(m.get("digest")),
            human_bytes(m.get("size")),
            human_time(parse_time(m.get("modified_at"))),
        )
    _print_table(table)


app.command("ls", hidden=True)(list_cmd)


def _head(text: str, n: int | None) -> list[str]:
    """Non-blank lines, cut to n with an ellipsis, as `ollama show` prints long texts."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if n is not None and len(lines) > n:
        return [*lines[:n], "..."]
    return lines


def _human_number(n: int) -> str:
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def render_show(info: dict[str, Any], verbose: bool = False) -> str:
    """The `ollama show` summary: model facts, capabilities, parameters, system, license."""
    details = obj(info.get("details"))
    mi = obj(info.get("model_info"))
    arch = mi.get("general.architecture") or details.get("family") or ""
    params = details.get("parameter_size")
    if not params and isinstance(mi.get("general.parameter_count"), int):
        params = _human_number(mi["general.parameter_count"])
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    rows = [
        ("architecture", arch),
        ("parameters", params),
        ("context length", mi.get(f"{arch}.context_length")),
        ("embedding length", mi.get(f"{arch}.embedding_length")),
        ("quantization", details.get("quantization_level")),
    ]
    sections.append(("Model", [(k, str(v)) for k, v in rows if v not in (None, "")]))
    if caps := info.get("capabilities"):
        sections.append(("Capabilities", [(str(c), "") for c in (caps if isinstance(caps, list) else [caps])]))
    if info.get("parameters"):
        prows = []
        for line in str(info["parameters"]).splitlines():
            key, _, val = line.strip().partition(" ")
            if key:
                prows.append((key, val.strip()))
        sections.append(("Parameters", prows))
    limit = None if verbose else 2
    if info.get("system"):
        sections.append(("System", [(ln, "") for ln in _head(str(info["system"]), limit)]))
    if info.get("license"):
        sections.append(("License", [(ln, "") for ln in _head(str(info["license"]), limit)]))
    if verbose and mi:
        meta = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in mi.items()]
        sections.append(("Metadata", meta))
    out: list[str] = []
    for title, srows in sections:
        if not srows:
            continue
        out.append(f"  {title}")
        width = max(cell_len(k) for k, _ in srows)
        for k, v in srows:
            out.append(f"    {k}{' ' * (width - cell_len(k) + 4)}{v}".rstrip() if v else f"    {k}")
        out.append("")
    return "\n".join(out) + "\n"


@app.command()
def show(
    model: str,
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Show the Modelfile.")] = False,
    parameters: Annotated[bool, typer.Option("--parameters", help="Show the parameters.")] = False,
    template: Annotated[bool, typer.Option("--template", help="Show the prompt template.")] = False,
    system: Annotated[bool, typer.Option("--system", help="Show the system message.")] = False,
    license_: Annotated[bool, typer.Option("--license", help="Show the license.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show all metadata.")] = False,
    host: HostOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show information about a model."""
    picked = [n for n, on in (("modelfile", modelfile), ("parameters", parameters), ("template", template),
                              ("system", system), ("license", license_)) if on]
    if len(picked) > 1:
        raise CliError("only one of " + ", ".join(f"'--{p}'" for p in picked) + " can be given")
    body: dict[str, Any] = {"model": model}
    if verbose:
        body["verbose"] = True
    info = _client(host).json("POST", "/api/show", body)
    if as_json:
        _print_json(info)
    elif picked:
        text = str(info.get(picked[0]) or "")
        sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
    else:
        sys.stdout.write(render_show(info, verbose))


@app.command()
def ps(host: HostOpt = None, as_json: JsonOpt = False) -> None:
    """List the models loaded in memory."""
    data = _client(host).json("GET", "/api/ps", rows={"models": list})
    if as_json:
        _print_json(data)
        return
    table = _table("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")
    now = datetime.now(UTC)
    for m in data.get("models") or []:
        size, vram = number(m.get("size") or 0), number(m.get("size_vram") or 0)
        expires = parse_time(m.get("expires_at"))
        until = "Stopping..." if expires is not None and expires < now else human_time(expires, now=now)
        table.add_row(
            str(m.get("name") or m.get("model") or ""),
            short_id(m.get("digest")),
            human_bytes(m.get("size")),
            "?" if size is None or vram is None else processor_text(int(size), int(vram)),
            str(m.get("context_length") or ""),
            until,
        )
    _print_table(table)


@app.command()
def cp(source: str, destination: str, host: HostOpt = None) -> None:
    """Copy a model to a new name."""
    _client(host).request("POST", "/api/copy", {"source": source, "destination": destination})
    print(f"copied '{source}' to '{destination}'")


@app.command()
def rm(models: Annotated[list[str], typer.Argument(help="Models to delete.")], host: HostOpt = None) -> None:
    """Delete models."""
    client = _client(host)
    failed = False
    for m in models:
        try:
            client.request("DELETE", "/api/delete", {"model": m})
        except NodeUnreachable:
            raise
        except CliError as e:
            print(f"omx: {e}", file=sys.stderr)
            failed = True
            continue
        print(f"deleted '{m}'")
    if failed:
        raise typer.Exit(1)


def _keep_alive(value: str | None) -> Any:
    """--keepalive: a bare number is seconds (sent as a number); anything else is a Go duration."""
    if value is None:
        return None
    if re.fullmatch(r"-?\d+(\.\d+)?", value.strip()):
        return float(value) if "." in value else int(value)
    return value.strip()


def _format(value: str | None) -> Any:
    if not value:
        return None
    if value.strip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            raise CliError("--format must be 'json' or a JSON schema object") from None
    if value != "json":
        raise CliError(f"invalid format '{value}': only 'json' or a JSON schema object")
    return value


def _print_stats(final: dict[str, Any]) -> None:
    """`--verbose`: Ollama's timing summary, on stderr so the answer stays clean on stdout."""
    def secs(key: str) -> float:
        return (number(final.get(key)) or 0) / 1e9

    n_prompt, n_eval = number(final.get("prompt_eval_count")) or 0, number(final.get("eval_count")) or 0
    lines = [f"total duration:       {secs('total_duration'):.3f}s",
             f"load duration:        {secs('load_duration'):.3f}s",
             f"prompt eval count:    {n_prompt} token(s)"]
    if secs("prompt_eval_duration"):
        lines.append(f"prompt eval rate:     {n_prompt / secs('prompt_eval_duration'):.2f} tokens/s")
    lines.append(f"eval count:           {n_eval} token(s)")
    if secs("eval_duration"):
        lines.append(f"eval rate:            {n_eval / secs('eval_duration'):.2f} tokens/s")
    print("\n".join(lines), file=sys.stderr)


@dataclass
class RunOptions:
    model: str
    format: Any = None
    keep_alive: Any = None
    wrap: int | None = None
    verbose: bool = False

    def body(self, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, **fields}
        if self.format is not None:
            body["format"] = self.format
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body


def _stream_text(client: NodeClient, path: str, body: dict[str, Any], opts: RunOptions,
                 pick: Callable[[dict[str, Any]], str]) -> str:
    """Stream one answer to stdout as it arrives; returns the whole text."""
    writer = TokenWriter(opts.wrap)
    parts: list[str] = []
    final: dict[str, Any] = {}
    with contextlib.closing(client.stream("POST", path, body)) as chunks:
        try:
            for chunk in chunks:
                text = str(pick(chunk))
                parts.append(text)
                writer.write(text)
                if chunk.get("done"):
                    final = chunk
        finally:
            writer.finish()
    if opts.verbose and final:
        _print_stats(final)
    return "".join(parts)


_CHAT_HELP = """Available commands:
  /clear          Clear the session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message.
"""


def utf8_text(data: bytes | str) -> str:
    """Prompt text as UTF-8, invalid bytes as U+FFFD: what `ollama run` sends (Go's json.Marshal replaces
    them), so a prompt with one stray Latin-1 byte still runs rather than failing to encode."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return data.decode("utf-8", "replace")


def _input(prompt: str) -> str:
    return utf8_text(input(prompt))


def _read_message() -> str | None:
    """One user message from the terminal (None at end of input); `\"\"\"` starts a multi-line one."""
    line = _input(">>> ")
    if not line.lstrip().startswith('"""'):
        return line
    text = line.lstrip()[3:]
    if text.endswith('"""') and len(text) >= 3:
        return text[:-3]
    parts = [text]
    while True:
        more = _input("... ")
        if more.rstrip().endswith('"""'):
            parts.append(more.rstrip()[:-3])
            return "\n".join(parts).strip("\n")
        parts.append(more)


def chat_loop(client: NodeClient, opts: RunOptions) -> None:
    """Interactive chat with history over /api/chat, until /bye or end of input."""
    # Load first, so a missing model fails before the first prompt, not after the user typed one.
    for _ in client.stream("POST", "/api/generate", opts.body(prompt="")):
        pass
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdin.reconfigure(errors="surrogateescape")  # type: ignore[attr-defined]  # utf8_text repairs it
    messages: list[dict[str, str]] = []
    while True:
        try:
            text = _read_message()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.")
            continue
        if not text or not text.strip():
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/bye", "/exit"):
                return
            if cmd == "/clear":
                messages.clear()
                print("Cleared session context")
            elif cmd in ("/?", "/help"):
                print(_CHAT_HELP)
            else:
                print(f"Unknown command '{cmd}'. Type /? for help")
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = _stream_text(client, "/api/chat", opts.body(messages=messages), opts,
                                 lambda c: obj(c.get("message")).get("content") or "")
        except KeyboardInterrupt:
            messages.pop()
            print()
            continue
        except CliError as e:
            messages.pop()
            print(f"omx: {e}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})
        print()


@app.command()
def run(
    model: str,
    prompt: Annotated[
        list[str] | None, typer.Argument(help="Prompt (default: stdin, or a chat on a terminal).")
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="'json' or a JSON schema object.")] = None,
    keepalive: Annotated[
        str | None, typer.Option("--keepalive", help="How long the model stays loaded (5m, 1h, -1).")
    ] = None,
    nowordwrap: Annotated[bool, typer.Option("--nowordwrap", help="Don't wrap long lines.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show timings after the response.")] = False,
    host: HostOpt = None,
) -> None:
    """Run a model: answer one prompt, or chat interactively."""
    client = _client(host)
    opts = RunOptions(model=model, format=_format(fmt), keep_alive=_keep_alive(keepalive), verbose=verbose)
    prompts = list(prompt or [])
    piped = not sys.stdin.isatty()
    if piped:
        # As `ollama run`: piped input comes first, then the prompt words; nothing at all only loads.
        data = utf8_text(sys.stdin.buffer.read())
        if data or not prompts:
            prompts.insert(0, data)
    if sys.stdout.isatty() and not nowordwrap and not piped:
        opts.wrap = shutil.get_terminal_size().columns - 1
    if not prompts:
        chat_loop(client, opts)
        return
    text = " ".join(prompts)
    if not text.strip():
        # An empty prompt only loads the model, as Ollama does.
        for _ in client.stream("POST", "/api/generate", opts.body(prompt="")):
            pass
        return
    _stream_text(client, "/api/generate", opts.body(prompt=text), opts, lambda c: c.get("response") or "")


@app.command()
def create(
    name: str,
    from_: Annotated[
        str | None, typer.Option("--from", help="GGUF file or Hugging Face model directory.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Modelfile (default: ./Modelfile if present).")
    ] = None,
    host: HostOpt = None,
) -> None:
    """Create a model from a GGUF file, a Hugging Face directory, or a Modelfile."""
    if file is None and from_ is None and Path("Modelfile").is_file():
        file = Path("Modelfile")
    mf = Modelfile()
    base = Path.cwd()
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CliError(f"{file}: not a Modelfile: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise CliError(f"{file}: {e.strerror or e}") from None
        try:
            mf = parse_modelfile(text, require_from=from_ is None)
        except ModelfileError as e:
            raise CliError(f"{file}: {e}") from None
        base = file.resolve().parent
    for warning in mf.warnings:
        print(f"omx: warning: {warning}", file=sys.stderr)
    if mf.adapters:
        raise CliError("ADAPTER is not supported by omx yet")
    source, source_base = (from_, Path.cwd()) if from_ is not None else (mf.from_, base)
    if not source:
        raise CliError("nothing to create from: give --from PATH, or -f with a Modelfile with a FROM line")
    body: dict[str, Any] = {"model": name, **mf.create_request()}
    body.pop("from", None)

    client = _client(host)
    view = ProgressView()
    try:
        path = _resolve_source(source, source_base)
        if path is None:
            body["from"] = source
        else:
            files = model_files(path)
            status = "transferring model data"
            total = sum(p.stat().st_size for _, p in files)
            view.update(status, total=total, completed=0)

            def advance(n: int) -> None:
                view.advance(status, n / 2)  # each byte is read twice: once to hash, once to upload

            digests: dict[str, str] = {}
            for fname, fpath in files:
                hexd = sha256_file(fpath, advance)
                upload_blob(client, fpath, hexd, advance)
                digests[fname] = f"sha256:{hexd}"
            body["files"] = digests
        for p in client.stream("POST", "/api/create", body):
            if p.get("status"):
                view.update(str(p["status"]), number(p.get("total")), number(p.get("completed")))
    finally:
        view.close()


@node_app.command(
    "start",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def node_start(ctx: typer.Context) -> None:
    """Start a node here: runs `python -m omx.node start ARGS` (--config, --host, --port, --data-dir, ...)."""
    argv = [sys.executable, "-m", "omx.node", "start", *ctx.args]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: signals, exit codes and the terminal go straight to the node.
    os.execv(sys.executable, argv)


@app.command("up", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                    "help_option_names": []})
def up(ctx: typer.Context) -> None:
    """Start a local cluster of real nodes: runs `python -m omx.node up [--nodes N] [--regions R] [--data-dir D]`."""
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "omx.node", "up", *ctx.args])


@node_app.command("status")
def node_status(host: HostOpt = None, as_json: JsonOpt = False) -> None:
    """This node: id, region, role, membership state, Raft state, leader, term, commit index, member counts."""
    st = _client(host).json("GET", "/api/v1/node/status")
    if as_json:
        _print_json(st)
        return
    raft = obj(st.get("raft"))
    rows = [
        ("id", st.get("id")), ("region", st.get("region")), ("role", st.get("role")),
        ("api", st.get("api_addr")), ("gossip", st.get("gossip_addr")),
        ("membership", f"{st.get('membership')} (incarnation {st.get('incarnation')}, "
                       f"local health {st.get('local_health')})"),
        ("members", ", ".join(f"{k} {v}" for k, v in sorted(obj(st.get("members")).items()))),
    ]
    if raft:
        rows += [("raft", f"{raft.get('raft_state')} at {raft.get('self')}"), ("leader", raft.get("leader") or "none"),
                 ("term", raft.get("term")), ("commit index", raft.get("commit_index")),
                 ("quorum", "yes" if raft.get("has_quorum") else "NO")]
    else:
        rows.append(("raft", "not a voter (worker)"))
    table = _table("FIELD", "VALUE")
    for k, v in rows:
        table.add_row(k, str(v))
    _print_table(table)


@node_app.command("leave")
def node_leave(host: HostOpt = None) -> None:
    """Leave the cluster gracefully (peers record 'left', never a failure); the process keeps running."""
    res = _client(host).json("POST", "/api/v1/node/leave")
    print(f"node {res.get('id')} left the cluster")


@app.command("join")
def join_cmd(peers: Annotated[str, typer.Option("--peers", help="HOST:PORT[,...] gossip addresses of members.")],
             host: HostOpt = None) -> None:
    """Ask a running node to join a cluster through the given members."""
    addrs = [p.strip() for p in peers.split(",") if p.strip()]
    res = _client(host).json("POST", "/api/v1/cluster/join", {"peers": addrs})
    print(f"joined through {res.get('joined')} of {len(addrs)} peer(s); {res.get('members')} members known")


@app.command("cluster")
def cluster_cmd(host: HostOpt = None, as_json: JsonOpt = False) -> None:
    """Every member of the cluster as this node sees it: status, region, role, addresses, Raft role."""
    data = _client(host).json("GET", "/api/v1/cluster", rows={"members": list})
    if as_json:
        _print_json(data)
        return
    table = _table("ID", "STATUS", "REGION", "ROLE", "RAFT", "API", "GOSSIP", "MODELS")
    for m in data.get("members") or []:
        raft = obj(m.get("raft"))
        role = raft.get("state", "-") if raft else "-"
        flags = " cordoned" if m.get("cordoned") else ""
        table.add_row(str(m.get("id")) + (" *" if m.get("self") else ""), str(m.get("status")) + flags,
                      str(m.get("region")), str(m.get("role")), str(role), str(m.get("api_addr")),
                      str(m.get("gossip_addr")), names(m.get("models")))
    _print_table(table)


@app.command("keygen")
def keygen(path: Annotated[Path, typer.Argument(help="Where to write the new cluster key (mode 600).")]) -> None:
    """Create a cluster key file; every node of the cluster starts with --cluster-key-file pointing at a copy."""
    from omx.protocols.clusterkey import generate_key_file

    try:
        generate_key_file(path)
    except FileExistsError:
        raise CliError(f"{path} already exists; refusing to overwrite a cluster key") from None
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror}") from None
    print(f"wrote a new cluster key to {path}")


for _action, _help in (("cordon", "Stop placing work on a node."), ("uncordon", "Allow work on a node again."),
                       ("drain", "Cordon a node and move its work elsewhere.")):
    def _make(action: str) -> Callable[..., None]:
        def cmd(node_id: Annotated[str, typer.Argument(help="Node id.")], host: HostOpt = None) -> None:
            _client(host).json("POST", f"/api/v1/nodes/{segment(node_id)}/{action}")
            print(f"{action}ed {node_id}")

        return cmd

    node_app.command(_action, help=_help)(_make(_action))


@node_app.command("remove")
def node_remove(node_id: Annotated[str, typer.Argument(help="Node id.")], host: HostOpt = None,
                force: Annotated[bool, typer.Option("--force", help="Remove even if still alive.")] = False,
                raft_addr: Annotated[str | None, typer.Option(
                    "--raft-addr", help="A control node's Raft HOST:PORT, when the cluster no longer knows it.")]
                = None) -> None:
    """Remove a node from the region's registry (a control node also loses its Raft vote)."""
    query = {k: v for k, v in (("force", "true" if force else None), ("raft_addr", raft_addr)) if v}
    res = _client(host).json("DELETE", f"/api/v1/nodes/{segment(node_id)}" + ("?" + urlencode(query) if query else ""))
    voters = res.get("voters")
    print(f"removed {node_id}" + (f" and its Raft vote; voters now {names(voters)}" if voters else ""))


@app.command()
def version(host: HostOpt = None, as_json: JsonOpt = False) -> None:
    """Show the client and node versions."""
    mine = client_version()
    try:
        server = _client(host).json("GET", "/api/version")
    except CliError as e:
        if as_json:
            _print_json({"client": mine, "node": None, "error": str(e)})
        else:
            print(f"omx client version {mine}")
            print(f"omx: warning: {e}", file=sys.stderr)
        return
    if as_json:
        _print_json({"client": mine, "node": server})
        return
    print(f"omx client version {mine}")
    node_v = server.get("omx_version")
    api_v = server.get("version")
    if node_v:
        print(f"omx node version {node_v} (Ollama API {api_v})")
    else:
        print(f"node version {api_v}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns every expected failure into one line and exit code 1."""
    args = sys.argv[1:] if argv is None else argv
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            # names, ids and prompts all go into JSON or URLs, which carry only UTF-8; a path could be opened,
            # but one rule for every argument beats a traceback for most of them
            shown = os.fsencode(arg).decode("ascii", "backslashreplace")
            print(f"omx: argument '{shown}' is not valid UTF-8", file=sys.stderr)
            sys.exit(1)
    try:
        app(args=args, prog_name="omx")
    except CliError as e:
        sys.stdout.flush()
        # one line, whatever the server sent
        print("omx: " + re.sub(r"\s*\n\s*", " ", str(e).strip()), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # the reader (`| head`) went away; keep Python from complaining at exit
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


model_app = typer.Typer(help="Models across the cluster: replicas, import, distribution.", no_args_is_help=True)
app.add_typer(model_app, name="model")
_cli_proxy.register(sys.modules[__name__], app, model_app)
_cli_transfer.register(sys.modules[__name__], app, model_app)

if __name__ == "__main__":
    main()
