"""Node settings: files, environment and flags, with precise errors for bad input."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from omx.node import server
from omx.node.config import ConfigError, load_config, parse_bytes
from omx.protocols.api import ApiError, keep_alive_seconds, parse_go_duration
from omx.protocols.clusterkey import ClusterKeyError, read_key_file
from omx.protocols.hosts import HostError, parse_host

pytestmark = pytest.mark.timeout(60)

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
        ("keep_alive = nan\n", "keep_alive: Input should be a finite number"),
        ("load_timeout = inf\n", "load_timeout: Input should be a finite number"),
        ('device = "cudaXYZ"\n', "device: Value error, must be auto, cpu, cuda or cuda:N"),
        ('device = "cuda:-1"\n', "device: Value error, must be auto, cpu, cuda or cuda:N"),
        ('data_dir = ""\n', "data_dir: Value error, must not be empty"),
        ('data_dir = "a\\u0000b"\n', "data_dir: Value error, must not contain a NUL byte"),
        (f'disk_budget = "{"9" * 400}TB"\n', "disk_budget: Value error, the size is too large (at most 9.2 EB)"),
        (b"port = 1\n\xff\n", "not UTF-8 text (byte 9)"),
        (bytes(range(256)), "not UTF-8 text"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str | bytes, expected: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert expected in str(e.value) and str(f) in str(e.value)


def test_json_config_rejects_nan(tmp_path: Path) -> None:
    f = tmp_path / "n.json"
    f.write_text('{"keep_alive": NaN}')
    with pytest.raises(ConfigError, match=r"keep_alive: Input should be a finite number \(got nan\)"):
        load_config(f)


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("OMX_KEEP_ALIVE", "nan", "keep_alive: Input should be a finite number"),
        ("OMX_DEVICE", "cudaXYZ", "device: Value error, must be auto, cpu, cuda or cuda:N"),
        ("OMX_DISK_BUDGET", "9" * 400, "disk_budget: Value error, the size is too large"),
        ("OMX_REGISTRIES", " , ", "registries: Value error, names no registry URL"),
        ("OMX_NUM_PARALLEL", "0", "num_parallel: Input should be greater than or equal to 1"),
    ],
)
def test_bad_env_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                          expected: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as e:
        load_config()
    assert str(e.value).startswith(f"invalid configuration ({env}):") and expected in str(e.value)


@pytest.mark.parametrize(("value", "expected"), [("[zz]:1", "'zz' is not an IPv6 address"),
                                                 ("::::", "'::::' is not an IPv6 address")])
def test_bad_omx_host_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("OMX_HOST", value)
    with pytest.raises(ConfigError) as e:
        load_config()
    assert str(e.value) == f"invalid configuration (OMX_HOST): {value!r} is not an address: {expected}"


def test_bad_flags_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^invalid configuration \(--gossip-port\):\n  gossip_port: "):
        load_config(None, {"gossip_port": 70000})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setenv("OMX_DEVICE", device)
    assert load_config().device == device


@pytest.mark.parametrize(("text", "size"), [("50GB", 50 * 10**9), ("1.5 GiB", 3 << 29), ("1048576", 1 << 20)])
def test_parse_bytes(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["9" * 400, "9" * 400 + "TB", "10000000TB"])
def test_parse_bytes_too_large(text: str) -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_bytes(text)


def test_binary_cluster_key_file(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_bytes(b"\xff" + bytes(range(100)))
    f.chmod(0o600)
    with pytest.raises(ClusterKeyError, match="not base64 text"):
        read_key_file(f)


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
        ("::1", "http://[::1]:11434"),
        ("HTTPS://h/p/", "https://h:443/p"),
    ],
)
def test_ollama_host_forms(value: str | None, url: str) -> None:
    assert parse_host(value).url == url


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://[::1", "'[' without a closing ']'"),
        ("[::1", "'[' without a closing ']'"),
        ("[zz]:5", "'zz' is not an IPv6 address"),
        ("[::1]x:5", "'x:5' after ']'"),
        ("::::", "'::::' is not an IPv6 address"),
        ("ftp://host", "the scheme must be http:// or https://"),
        ("a b:1", "'a b' is not a host name or IP address"),
    ],
)
def test_bad_host_forms(value: str, problem: str) -> None:
    with pytest.raises(HostError) as e:
        parse_host(value)
    assert str(e.value) == f"{value!r} is not an address: {problem}"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--host", "[::1"], {}, "omx: --host: '[::1' is not an address: '[' without a closing ']'"),
        ([], {"OMX_HOST": "[zz]:1"}, "omx: invalid configuration (OMX_HOST): '[zz]:1' is not an address: "
                                     "'zz' is not an IPv6 address"),
        (["--log-level", "bogus"], {}, "omx: --log-level 'bogus' is not a log level: use DEBUG, INFO, WARNING, "
                                       "ERROR or CRITICAL"),
        ([], {"OMX_LOG_LEVEL": "xx"}, "omx: OMX_LOG_LEVEL 'xx' is not a log level: use DEBUG, INFO, WARNING, "
                                      "ERROR or CRITICAL"),
        (["--data-dir", ""], {}, "omx: invalid configuration (--data-dir):"),
        (["--data-dir", "a\0b"], {}, "omx: invalid configuration (--data-dir):"),
    ],
)
def test_node_start_bad_flags_and_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      args: list[str], env: dict[str, str], message: str) -> None:
    for k in ("OMX_HOST", "OMX_LOG_LEVEL"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert server.main(args) == 2
    assert capsys.readouterr().err.splitlines()[0] == message


def test_node_start_data_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert server.main(["--data-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"omx: data_dir {tmp_path / 'file'}: Not a directory\n"


def test_node_start_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "omx.node", "start", "--port", str(port), "--gossip-port", "0",
                            "--raft-port", "0", "--data-dir", str(tmp_path), "--no-demo"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"omx: cannot listen on 127.0.0.1:{port}: "), r.stderr


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
