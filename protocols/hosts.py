"""OLLAMA_HOST-style addresses, parsed the same way by the node (bind) and every client."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORT = 11434


@dataclass(frozen=True)
class HostAddr:
    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_host(value: str | None) -> HostAddr:
    """Ollama's envconfig.Host: `0.0.0.0`, `:8080`, `host:port`, `http://host` (80), `https://host` (443), `[::1]:p`."""
    text = (value or "").strip().strip("\"'").strip()
    scheme, port = "http", DEFAULT_PORT
    if "://" in text:
        scheme, _, text = text.partition("://")
        port = 443 if scheme == "https" else 80
    hostport, slash, path = text.partition("/")
    path = slash + path if slash else ""
    parts = urlsplit(f"//{hostport}")
    host = parts.hostname if parts.hostname is not None else ""
    try:
        if parts.port is not None:
            port = parts.port
    except ValueError:
        port = DEFAULT_PORT  # Ollama falls back to the default port on an invalid one
    if not host:
        host = "127.0.0.1"
    return HostAddr(scheme=scheme, host=host, port=port, path=path.rstrip("/"))
