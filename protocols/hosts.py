"""OLLAMA_HOST-style addresses, parsed the same way by the node (bind) and every client."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DEFAULT_PORT = 11434
_NAME = re.compile(r"[\w.-]+")  # host names (IDN ones too) and IPv4 addresses
_PORT = re.compile(r"[0-9]{1,5}")


class HostError(ValueError):
    """A value that is no OLLAMA_HOST-style address; the message quotes it and says what is wrong."""


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


def _ipv6(text: str, value: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise HostError(f"{value!r} is not an address: {text!r} is not an IPv6 address") from None


def parse_host(value: str | None) -> HostAddr:
    """Ollama's envconfig.Host: `0.0.0.0`, `:8080`, `host:port`, `http://host` (80), `https://host` (443), `[::1]:p`.

    Raises HostError for what Ollama would turn into an unusable URL (`[::1`, `[zz]:5`, `::::`, `ftp://x`).
    """
    text = (value or "").strip().strip("\"'").strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HostError(f"{text!r} is not valid UTF-8") from None
    scheme, port = "http", DEFAULT_PORT
    if "://" in text:
        scheme, _, rest = text.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise HostError(f"{text!r} is not an address: the scheme must be http:// or https://")
        port = 443 if scheme == "https" else 80
    else:
        rest = text
    hostport, slash, path = rest.partition("/")
    path = slash + path if slash else ""
    port_text: str | None = None
    if hostport.startswith("["):
        inner, close, after = hostport[1:].partition("]")
        if not close:
            raise HostError(f"{text!r} is not an address: '[' without a closing ']'")
        if after and not after.startswith(":"):
            raise HostError(f"{text!r} is not an address: {after!r} after ']'")
        host = _ipv6(inner, text)
        port_text = after[1:] if after else None
    elif hostport.count(":") > 1:
        host = _ipv6(hostport, text)  # as Ollama: an unbracketed IPv6 address takes the default port
    else:
        host, colon, tail = hostport.partition(":")
        port_text = tail if colon else None
        if host and not _NAME.fullmatch(host):
            raise HostError(f"{text!r} is not an address: {host!r} is not a host name or IP address")
    if port_text is not None and _PORT.fullmatch(port_text) and int(port_text) <= 65535:
        port = int(port_text)
    # otherwise Ollama falls back to the default port on an invalid one
    return HostAddr(scheme=scheme, host=host or "127.0.0.1", port=port, path=path.rstrip("/"))
