"""Node settings: files, environment and flags, with precise errors for bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from omx.node.config import ConfigError, load_config
from omx.protocols.api import ApiError, keep_alive_seconds, parse_go_duration
from omx.protocols.hosts import parse_host

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads() -> None:
    cfg = load_config(ROOT / "deploy" / "node.example.toml")
    assert cfg.port == 11434 and cfg.keep_alive == 300.0 and cfg.num_parallel == 4


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "n.toml"
    f.write_text('num_parallel = 2\nmax_queue = 7\nkeep_alive = "-1m"\n')
    monkeypatch.setenv("OMX_NUM_PARALLEL", "3")
    cfg = load_config(f, {"max_queue": 9})
    assert cfg.num_parallel == 3 and cfg.max_queue == 9 and math.isinf(cfg.keep_alive_effective)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num_paralel = 2\n", "num_paralel: unknown setting"),
        ("num_parallel = 0\n", "num_parallel: Input should be greater than or equal to 1"),
        ('port = "http"\n', "port: Input should be a valid integer"),
        ('device = "tpu"\n', "device: Value error, must be auto, cpu, cuda or cuda:N"),
        ("num_parallel = \n", "not valid TOML"),
        ('keep_alive = "5 minutes"\n', "keep_alive"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert expected in str(e.value) and str(f) in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.timeout(60)
def test_node_start_with_bad_config_exits_with_one_message(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("max_queue = -1\n")
    r = subprocess.run([sys.executable, "-m", "omx.node", "start", "--config", str(f)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "max_queue" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("value", "url"),
    [
        (None, "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://0.0.0.0:11434"),
        (":8080", "http://127.0.0.1:8080"),
        ("example.com:1234", "http://example.com:1234"),
        ("http://example.com", "http://example.com:80"),
        ("https://example.com", "https://example.com:443"),
        ("[::1]:9000", "http://[::1]:9000"),
        ("host:notaport", "http://host:11434"),
        ('  "127.0.0.2:5"  ', "http://127.0.0.2:5"),
    ],
)
def test_ollama_host_forms(value: str | None, url: str) -> None:
    assert parse_host(value).url == url


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), ("-1m", -60.0), ("0", 0.0), ("300ms", 0.3), ("1.5h", 5400.0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", 'time: missing unit in duration "-1"'), ("5x", 'time: unknown unit "x" in duration "5x"'),
     ("", 'time: invalid duration ""'), ("m", 'time: invalid duration "m"')],
)
def test_bad_durations(value: str, message: str) -> None:
    with pytest.raises(ApiError) as e:
        keep_alive_seconds(value)
    assert e.value.status == 400 and e.value.message == message


def test_keep_alive_numbers() -> None:
    assert keep_alive_seconds(None) is None
    assert keep_alive_seconds(0.0) == 0
    assert keep_alive_seconds(300) == 300
    assert math.isinf(keep_alive_seconds(-1))
    assert math.isinf(keep_alive_seconds(1e308))
