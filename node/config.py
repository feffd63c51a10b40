"""Node settings: defaults < config file (TOML or JSON) < OMX_* environment < command-line flags."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omx.protocols.api import parse_go_duration
from omx.protocols.hosts import HostError, parse_host


class ConfigError(Exception):
    """A settings problem, worded for the operator (file, key, what is wrong)."""


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """"50GB", "1.5 GiB", "1048576" → bytes (decimal units like Ollama's output, binary with an i)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size such as 50GB or 512MiB")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n < 2**63:  # also inf: float() turns 400 digits into inf, which int() cannot take
        raise ValueError("the size is too large (at most 9.2 EB)")
    return int(n)


def default_data_dir() -> Path:
    return Path(os.environ.get("OMX_HOME") or Path.home() / ".omx")


class NodeConfig(BaseModel):
    # no inf or nan in any float setting: keep_alive = nan would only fail when a model is loaded
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(11434, ge=0, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    provision_demo: bool = True
    max_loaded_models: int = Field(3, ge=1)
    num_parallel: int = Field(4, ge=1, le=256)
    max_queue: int = Field(512, ge=0)
    keep_alive: float = Field(300.0, description="seconds; negative keeps models loaded")
    load_timeout: float = Field(300.0, gt=0)
    context_length: int = Field(4096, ge=16)
    device: str = "auto"
    dtype: str = "auto"
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="limit for JSON request bodies")
    shutdown_grace: float = Field(30.0, ge=0)
    origins: list[str] = Field(default_factory=list)
    # cluster
    region: str = Field("default", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    role: Literal["control", "worker"] = "control"
    join: list[str] = Field(default_factory=list, description="gossip addresses of members to join")
    cluster_key_file: Path | None = None
    gossip_port: int = Field(7946, ge=0, le=65535)
    raft_port: int = Field(7947, ge=0, le=65535)
    raft_peers: list[str] = Field(default_factory=list, description="raft addresses of the other voters of the region")
    gossip_profile: Literal["lan", "local"] = "lan"
    join_timeout: float = Field(30.0, ge=0, description="how long to keep retrying unreachable join seeds")
    suspicion_mult: int = Field(0, ge=0, le=100, description="SWIM suspicion multiplier; 0 keeps the profile's")
    replace_dead_voters_after: float = Field(
        30.0, ge=0, le=3600, description="seconds a Raft voter must be dead in gossip and unreachable over Raft "
        "before the region leader gives its seat to a control node waiting for one; 0: never (omx node remove)")
    # routing and failover (node/router.py)
    routing_policy: Literal["affinity", "prefix"] = Field(
        "affinity", description="affinity: model affinity + power of two choices; prefix: also keep prompt prefixes "
        "on one replica so its KV cache is reused")
    route_attempts: int = Field(3, ge=1, le=10, description="replicas tried before the first byte of a response")
    route_connect_timeout: float = Field(3.0, gt=0, description="seconds to connect to a peer")
    route_stall_timeout: float = Field(30.0, gt=0, description="seconds without a byte before a stream is failed over")
    route_resumes: int = Field(2, ge=0, le=10, description="mid-stream resumptions per request")
    breaker_failures: int = Field(3, ge=1, description="consecutive failures that take a peer out of rotation")
    breaker_cooldown: float = Field(5.0, gt=0, description="seconds before a probe may bring a peer back")
    external_check_interval: float = Field(5.0, gt=0, description="seconds between external instance health checks")
    scheduler_interval: float = Field(2.0, gt=0, description="seconds between placement reconciliations")
    # model distribution (node/distribution.py, models/transfer.py)
    disk_budget: int = Field(0, ge=0, description="bytes the model store may use (\"50GB\" works); 0: the disk")
    bandwidth_limit: int = Field(0, ge=0, description="bytes per second for blob downloads (\"100MB\"); 0: none")
    registries: list[str] = Field(default_factory=lambda: ["https://registry.ollama.ai"],
                                  description="registry URLs tried in order for names without a host")
    allow_anonymous_blobs: bool = Field(False, description="serve manifests and blobs to peers without the token")

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            try:  # the env var, unlike the API, accepts a bare number of seconds
                return float(text)
            except ValueError:
                return parse_go_duration(text)
        return v

    @field_validator("disk_budget", "bandwidth_limit", mode="before")
    @classmethod
    def _byte_size(cls, v: Any) -> Any:
        return parse_bytes(v) if isinstance(v, str) else v

    @field_validator("registries", mode="before")
    @classmethod
    def _url_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            urls = [x.strip() for x in v.split(",") if x.strip()]
            if not urls:  # " , " is a typo; an empty list would silently mean the default registry
                raise ValueError("names no registry URL")
            v = urls
        return v

    @field_validator("registries")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if not u.startswith(("http://", "https://")) or len(u.split("://", 1)[1].strip("/")) == 0:
                raise ValueError(f"{u!r} is not an http(s):// registry URL")
        return [u.rstrip("/") for u in v]

    @field_validator("join", "raft_peers", mode="before")
    @classmethod
    def _addr_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("join", "raft_peers")
    @classmethod
    def _addrs(cls, v: list[str]) -> list[str]:
        for a in v:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{a!r} is not a HOST:PORT address")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("data_dir", "cluster_key_file", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if isinstance(v, str | Path):
            text = str(v)
            if not text.strip():  # Path("") is the working directory: never what was meant
                raise ValueError("must not be empty")
            if "\0" in text:
                raise ValueError("must not contain a NUL byte")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid UTF-8") from None
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError("must be auto, float32, float16 or bfloat16")
        return v

    @property
    def advertise_host(self) -> str:
        """The address peers and clients reach us at: a wildcard bind is advertised as loopback."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def keep_alive_effective(self) -> float:
        return math.inf if self.keep_alive < 0 else self.keep_alive


_ENV = {
    "OMX_MAX_LOADED_MODELS": "max_loaded_models",
    "OMX_NUM_PARALLEL": "num_parallel",
    "OMX_MAX_QUEUE": "max_queue",
    "OMX_KEEP_ALIVE": "keep_alive",
    "OMX_LOAD_TIMEOUT": "load_timeout",
    "OMX_CONTEXT_LENGTH": "context_length",
    "OMX_DEVICE": "device",
    "OMX_DTYPE": "dtype",
    "OMX_HOME": "data_dir",
    "OMX_MAX_BODY_BYTES": "max_body_bytes",
    "OMX_REGION": "region",
    "OMX_ROLE": "role",
    "OMX_JOIN": "join",
    "OMX_CLUSTER_KEY_FILE": "cluster_key_file",
    "OMX_SUSPICION_MULT": "suspicion_mult",
    "OMX_JOIN_TIMEOUT": "join_timeout",
    "OMX_REPLACE_DEAD_VOTERS_AFTER": "replace_dead_voters_after",
    "OMX_ROUTING_POLICY": "routing_policy",
    "OMX_DISK_BUDGET": "disk_budget",
    "OMX_BANDWIDTH_LIMIT": "bandwidth_limit",
    "OMX_REGISTRIES": "registries",
    "OMX_ALLOW_ANONYMOUS_BLOBS": "allow_anonymous_blobs",
}


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"config file {path}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of settings")
    return data


def flag_name(key: str) -> str:
    """The `omx node start` flag that carries a setting in load_config's overrides."""
    return "--no-demo" if key == "provision_demo" else "--" + key.replace("_", "-")


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}  # setting -> where its value came from, so an error names the culprit
    if path is not None:
        data.update(_read_file(path))
        origin.update(dict.fromkeys(data, str(path)))
    for env, key in _ENV.items():
        val = os.environ.get(env)
        if val is not None and val.strip() != "":
            data[key], origin[key] = val.strip().strip("\"'"), env
    host_env = os.environ.get("OMX_HOST")
    if host_env and "host" not in (overrides or {}):
        try:
            addr = parse_host(host_env)
        except HostError as e:
            raise ConfigError(f"invalid configuration (OMX_HOST): {e}") from None
        data["host"], data["port"] = addr.host, addr.port
        origin["host"] = origin["port"] = "OMX_HOST"
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k], origin[k] = v, flag_name(k)
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as e:
        lines, sources = [], []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(root)"
            msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{key}: {msg} (got {err.get('input')!r})")
            src = origin.get(str(err["loc"][0]) if err["loc"] else "", "defaults")
            if src not in sources:
                sources.append(src)
        raise ConfigError(f"invalid configuration ({', '.join(sources)}):\n  " + "\n  ".join(lines)) from None
