"""The `omx` command line: formatting helpers offline, then every command against a real node."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from omx.console import cli

pytestmark = pytest.mark.timeout(60)

MODEL = "omx-tiny:latest"


def omx(
    *args: str, host: str | None = None, stdin: str = "", cwd: Path | None = None, timeout: float = 100
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (a fresh process, piped stdin and stdout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMX_HOST", None)
    if host is not None:
        env["OMX_HOST"] = host
    return subprocess.run(
        [sys.executable, "-m", "omx.console.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
    )


def ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert "Traceback" not in res.stderr
    return res


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """A failed command: exit 1 and exactly one `omx: ...` line on stderr, never a traceback."""
    assert res.returncode == 1, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("omx: ")
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- offline: formatting and helpers -------------------------------------------------------------

@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1 KB"), (1500, "1.5 KB"), (15_000_000, "15 MB"),
    (1_234_567_890, "1.2 GB"), (4_000_000_000, "4 GB"), (2_500_000_000_000, "2.5 TB"),
])
def test_human_bytes(n, text):
    assert cli.human_bytes(n) == text


@pytest.mark.parametrize("n", ["abc", float("inf"), float("nan"), [1], True, -5])
def test_human_bytes_of_a_non_size_is_a_question_mark(n):
    assert cli.human_bytes(n) == "?"


def test_human_time():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def ago(**kw):
        return cli.human_time(now - timedelta(**kw), now=now)

    assert ago(seconds=0) == "Less than a second ago"
    assert ago(seconds=1) == "1 second ago"
    assert ago(seconds=30) == "30 seconds ago"
    assert ago(seconds=90) == "About a minute ago"
    assert ago(minutes=2, seconds=5) == "2 minutes ago"
    assert ago(hours=1) == "About an hour ago"
    assert ago(hours=5) == "5 hours ago"
    assert ago(days=3) == "3 days ago"
    assert ago(days=21) == "3 weeks ago"
    assert ago(days=90) == "3 months ago"
    assert ago(days=800) == "2 years ago"
    assert cli.human_time(now + timedelta(minutes=4, seconds=30), now=now) == "4 minutes from now"
    assert cli.human_time(now + timedelta(days=3650), now=now) == "Forever"
    assert cli.human_time(None) == "Never"


def test_parse_time_accepts_go_timestamps():
    t = cli.parse_time("2025-05-10T08:06:48.639712648-07:00")
    assert t == datetime(2025, 5, 10, 15, 6, 48, 639712, tzinfo=UTC)
    assert cli.parse_time("2025-10-26T17:21:21Z") == datetime(2025, 10, 26, 17, 21, 21, tzinfo=UTC)
    assert cli.parse_time("not a time") is None
    assert cli.parse_time(None) is None


def test_processor_text():
    assert cli.processor_text(100, 0) == "100% CPU"
    assert cli.processor_text(100, 100) == "100% GPU"
    assert cli.processor_text(100, 25) == "75%/25% CPU/GPU"


def test_node_url(monkeypatch):
    monkeypatch.setattr(cli, "_globals", cli._Globals())
    monkeypatch.delenv("OMX_HOST", raising=False)
    assert cli.node_url() == "http://127.0.0.1:11434"
    monkeypatch.setenv("OMX_HOST", "0.0.0.0:9000")
    assert cli.node_url() == "http://0.0.0.0:9000"
    assert cli.node_url(":8080") == "http://127.0.0.1:8080"
    assert cli.node_url("https://example.com") == "https://example.com:443"


def test_token_writer_streams_and_wraps():
    class Out(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1

    out = Out()
    w = cli.TokenWriter(None, out)
    w.write("Hel")
    assert out.getvalue() == "Hel" and out.flushes == 1  # written at once, not at the end
    w.write("lo")
    w.finish()
    assert out.getvalue() == "Hello\n"

    out = Out()
    w = cli.TokenWriter(20, out)
    for piece in ["the quick brown ", "fox jumps over", " the lazy dog\nand ", "then some"]:
        w.write(piece)
    w.finish()
    lines = out.getvalue().split("\n")
    assert all(len(ln) <= 20 for ln in lines), lines
    assert " ".join(" ".join(lines).split()) == "the quick brown fox jumps over the lazy dog and then some"
    assert lines[0] == "the quick brown fox "


def test_render_show_summary():
    info = {
        "details": {"family": "llama", "parameter_size": "1.2M", "quantization_level": "F32"},
        "model_info": {"general.architecture": "llama", "llama.context_length": 2048,
                       "llama.embedding_length": 64},
        "capabilities": ["completion"],
        "parameters": 'stop                           "<|im_end|>"\ntemperature                    0.7',
        "system": "line one\nline two\nline three",
        "license": "MIT",
    }
    text = cli.render_show(info)
    assert re.search(r"^  Model$", text, re.M)
    assert re.search(r"^    architecture\s+llama$", text, re.M)
    assert re.search(r"^    context length\s+2048$", text, re.M)
    assert re.search(r"^    embedding length\s+64$", text, re.M)
    assert re.search(r"^    quantization\s+F32$", text, re.M)
    assert re.search(r"^    completion$", text, re.M)
    assert re.search(r'^    stop\s+"<\|im_end\|>"$', text, re.M)
    assert "line two" in text and "line three" not in text and "..." in text
    assert "line three" in cli.render_show(info, verbose=True)


def test_model_files_picks_hf_files_and_checks_gguf(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "tokenizer.model", "README.md", ".gitattributes"]:
        (hf / name).write_bytes(b"{}")
    assert [n for n, _ in cli.model_files(hf)] == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(cli.CliError, match="not a GGUF file"):
        cli.model_files(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(cli.CliError, match=r"needs config\.json"):
        cli.model_files(tmp_path / "empty")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"GGUF....")
    assert [n for n, _ in cli.model_files(tmp_path / "one")] == ["m.gguf"]


@pytest.mark.parametrize("args", [["list"], ["ps"], ["show", MODEL], ["run", MODEL, "hi"], ["cp", "a", "b"],
                                  ["rm", "a"], ["list", "--json"]])
def test_unreachable_node_is_one_line(args):
    port = free_port()
    line = one_error_line(omx(*args, host=f"127.0.0.1:{port}"))
    assert line == (
        f"omx: cannot reach the omx node at http://127.0.0.1:{port} (connection refused) — is it running? "
        "start one with 'omx node start'"
    )


def test_host_option_beats_env():
    port = free_port()
    line = one_error_line(omx("list", "--host", f"127.0.0.1:{port}", host="127.0.0.1:1"))
    assert f"http://127.0.0.1:{port} " in line
    line = one_error_line(omx("--host", f"127.0.0.1:{port}", "ps", host="127.0.0.1:1"))
    assert f"http://127.0.0.1:{port} " in line


def test_create_without_source_fails_cleanly(tmp_path):
    line = one_error_line(omx("create", "x", host=f"127.0.0.1:{free_port()}", cwd=tmp_path))
    assert "--from" in line
    line = one_error_line(omx("create", "x", "--from", str(tmp_path / "missing.gguf"),
                              host=f"127.0.0.1:{free_port()}"))
    assert "no such file" in line


def test_show_takes_one_field_flag():
    assert "only one of" in one_error_line(omx("show", MODEL, "--system", "--license", host="127.0.0.1:1"))


# ---- against a real node -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cleanup(node):
    """The node is shared with other modules: remove (and so unload) every model these tests made."""
    yield
    with node.client() as c:
        for m in c.get("/api/tags").json()["models"]:
            if m["name"].startswith("cli-"):
                c.request("DELETE", "/api/delete", json={"model": m["name"]})


@pytest.fixture(scope="module")
def seeded(node, cleanup) -> str:
    """The demo model with a seed and a length cap, so `run` output is deterministic and non-empty."""
    name = "cli-seeded:latest"
    with node.client() as c:
        r = c.post("/api/create", json={"model": name, "from": MODEL, "stream": False,
                                        "parameters": {"seed": 7, "num_predict": 24, "temperature": 0.7}})
        assert r.status_code == 200, r.text
    return name


@pytest.mark.timeout(120)
def test_list_table_and_json(node):
    table = ok(omx("list", host=node.host)).stdout
    assert table.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    data = json.loads(ok(omx("list", "--json", host=node.host)).stdout)
    entry = next(m for m in data["models"] if m["name"] == MODEL)
    row = next(ln for ln in table.splitlines() if ln.startswith(MODEL + " "))
    assert row.split()[1] == entry["digest"].removeprefix("sha256:")[:12]
    assert cli.human_bytes(entry["size"]) in row
    assert row.rstrip().endswith("ago")
    assert all(ln == ln.rstrip() for ln in table.splitlines())
    assert ok(omx("ls", host=node.host)).stdout.split()[:6] == table.split()[:6]


@pytest.mark.timeout(120)
def test_show(node):
    out = ok(omx("show", MODEL, host=node.host)).stdout
    assert re.search(r"^    architecture\s+llama$", out, re.M), out
    assert "Capabilities" in out and "completion" in out
    with node.client() as c:
        info = c.post("/api/show", json={"model": MODEL}).json()
    template = ok(omx("show", MODEL, "--template", host=node.host)).stdout
    assert template.rstrip("\n") == info["template"].rstrip("\n")
    assert "FROM " in ok(omx("show", MODEL, "--modelfile", host=node.host)).stdout
    data = json.loads(ok(omx("show", MODEL, "--json", host=node.host)).stdout)
    assert "model_info" in data


@pytest.mark.timeout(120)
def test_unknown_model_shows_server_message(node):
    want = "omx: model 'no-such-model' not found"
    assert one_error_line(omx("run", "no-such-model", "hi", host=node.host)) == want
    assert one_error_line(omx("show", "no-such-model", host=node.host)) == want


@pytest.mark.timeout(120)
def test_run_prompt_streams_output(node, seeded):
    res = ok(omx("run", seeded, "hello", "there", host=node.host))
    assert res.stdout.strip(), "no output"
    assert res.stdout.endswith("\n")
    with node.client() as c:
        body = {"model": seeded, "prompt": "hello there", "stream": False}
        want = c.post("/api/generate", json=body).json()
    # the CLI prints exactly the streamed tokens (plus a final newline)
    assert res.stdout.rstrip("\n") == want["response"].rstrip("\n")


@pytest.mark.timeout(120)
def test_run_reads_prompt_from_stdin(node, seeded):
    res = ok(omx("run", seeded, host=node.host, stdin="hello there"))
    assert res.stdout.strip()
    res = ok(omx("run", seeded, "--verbose", host=node.host, stdin="hello there"))
    assert "eval count:" in res.stderr


@pytest.mark.timeout(120)
def test_ps_lists_loaded_model(node, seeded):
    ok(omx("run", seeded, "hi", "--keepalive", "10m", host=node.host))
    out = ok(omx("ps", host=node.host)).stdout
    assert out.splitlines()[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    row = next(ln for ln in out.splitlines() if ln.startswith(seeded + " "))
    assert re.search(r"100% [CG]PU|CPU/GPU", row), row
    assert "from now" in row or "Forever" in row, row
    data = json.loads(ok(omx("ps", "--json", host=node.host)).stdout)
    assert any(m["name"] == seeded for m in data["models"])


@pytest.mark.timeout(120)
def test_cp_rm_round_trip(node, cleanup):
    res = ok(omx("cp", MODEL, "cli-copy:v1", host=node.host))
    assert res.stdout == f"copied '{MODEL}' to 'cli-copy:v1'\n"
    assert "cli-copy:v1" in ok(omx("list", host=node.host)).stdout
    res = ok(omx("rm", "cli-copy:v1", host=node.host))
    assert res.stdout == "deleted 'cli-copy:v1'\n"
    assert "cli-copy:v1" not in ok(omx("list", host=node.host)).stdout
    assert one_error_line(omx("rm", "cli-copy:v1", host=node.host)) == "omx: model 'cli-copy:v1' not found"
    assert MODEL in ok(omx("list", host=node.host)).stdout


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    from omx.models.demo import build_llama_gguf

    return build_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=3)


@pytest.mark.timeout(180)
def test_create_from_gguf(node, cleanup, gguf_file):
    res = ok(omx("create", "cli-gguf", "--from", str(gguf_file), host=node.host))
    assert "transferring model data" in res.stderr
    assert res.stderr.rstrip().endswith("success"), res.stderr
    assert "cli-gguf:latest" in ok(omx("list", host=node.host)).stdout
    # the second time every blob is already there (HEAD), and the model is rebuilt the same
    ok(omx("create", "cli-gguf", "--from", str(gguf_file), host=node.host))
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "cli-gguf", "prompt": "hi", "stream": False,
                                          "options": {"num_predict": 4}})
        assert r.status_code == 200, r.text


@pytest.mark.timeout(180)
def test_create_from_modelfile(node, cleanup, gguf_file, tmp_path):
    (tmp_path / "tiny.gguf").symlink_to(gguf_file)
    (tmp_path / "Modelfile").write_text(
        "# a comment\n"
        "FROM ./tiny.gguf\n"
        'SYSTEM """You are terse.\nVery terse."""\n'
        "PARAMETER temperature 0.5\n"
        'PARAMETER stop "<|im_end|>"\n'
        "LICENSE MIT\n"
    )
    res = ok(omx("create", "cli-mf", "-f", str(tmp_path / "Modelfile"), host=node.host))
    assert res.stderr.rstrip().endswith("success")
    assert ok(omx("show", "cli-mf", "--system", host=node.host)).stdout == "You are terse.\nVery terse.\n"
    params = ok(omx("show", "cli-mf", "--parameters", host=node.host)).stdout
    assert re.search(r"^temperature\s+0.5$", params, re.M), params
    assert ok(omx("show", "cli-mf", "--license", host=node.host)).stdout == "MIT\n"

    # FROM naming a model on the node sends "from" and reuses its weights
    (tmp_path / "Derived").write_text(f"FROM {MODEL}\nSYSTEM Be kind.\n")
    ok(omx("create", "cli-derived", "-f", str(tmp_path / "Derived"), host=node.host))
    assert ok(omx("show", "cli-derived", "--system", host=node.host)).stdout == "Be kind.\n"

    (tmp_path / "Bad").write_text("FROM ./tiny.gguf\nPARAMETER bogus 1\n")
    assert "unknown parameter 'bogus'" in one_error_line(omx("create", "x", "-f", str(tmp_path / "Bad"),
                                                             host=node.host))


@pytest.mark.timeout(180)
def test_create_from_hf_dir(node, cleanup, tmp_path):
    from omx.models.demo import build_llama_hf_dir

    hf = build_llama_hf_dir(tmp_path / "hf", seed=5)
    res = ok(omx("create", "cli-hf", "--from", str(hf), host=node.host))
    assert res.stderr.rstrip().endswith("success"), res.stderr
    assert not any(ln.startswith("sha256:") for ln in res.stderr.splitlines()), "a status line was wrapped"
    assert "cli-hf:latest" in ok(omx("list", host=node.host)).stdout
    with node.client() as c:
        r = c.post("/api/generate", json={"model": "cli-hf", "prompt": "hi", "stream": False,
                                          "options": {"num_predict": 4}})
        assert r.status_code == 200, r.text


@pytest.mark.timeout(120)
def test_create_from_unknown_model_fails(node, tmp_path):
    (tmp_path / "Modelfile").write_text("FROM no-such-base\n")
    line = one_error_line(omx("create", "x", "-f", str(tmp_path / "Modelfile"), host=node.host))
    assert "no-such-base" in line


@pytest.mark.timeout(60)
def test_version(node):
    out = ok(omx("version", host=node.host)).stdout
    assert out.startswith("omx client version ")
    assert "node version" in out
    data = json.loads(ok(omx("version", "--json", host=node.host)).stdout)
    assert data["node"]["version"]


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
def test_interactive_chat_in_a_terminal(node, seeded):
    """No prompt on a terminal: a chat loop that keeps going until /bye."""
    import pty

    main_fd, sub_fd = pty.openpty()
    env = {**os.environ, "OMX_HOST": node.host, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "omx.console.cli", "run", seeded],
                            stdin=sub_fd, stdout=sub_fd, stderr=sub_fd, env=env, close_fds=True)
    os.close(sub_fd)
    seen = b""

    def read_until(marker: bytes, count: int, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while seen.count(marker) < count:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([main_fd], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(main_fd, 4096)
                except OSError:
                    break

    try:
        read_until(b">>> ", 1)
        os.write(main_fd, b"hello\n")
        read_until(b">>> ", 2)
        os.write(main_fd, b"/clear\n")
        read_until(b"Cleared session context", 1)
        os.write(main_fd, b"/bye\n")
        assert proc.wait(30) == 0, seen.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)
    assert b"Traceback" not in seen


@pytest.mark.timeout(120)
def test_node_start_execs_the_node(tmp_path):
    """`omx node start ARGS` becomes the node process itself, with every argument passed through."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "omx.console.cli", "node", "start", "--host", "127.0.0.1", "--port", "0",
         "--gossip-port", "0", "--raft-port", "0", "--data-dir", str(tmp_path), "--no-demo", "--log-level", "INFO"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            m = re.search(r"omx node listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "node did not start"
        data = json.loads(ok(omx("list", "--json", host=url)).stdout)
        assert data == {"models": []}  # --no-demo reached the node
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- bad input: hostile arguments, files and servers ---------------------------------------------

class FakeNode:
    """A server that is not an omx node: canned answers by (method, path), and a record of every request."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.seen: list[tuple[str, str, bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.seen.append((self.command, self.path, body))
                status, data = fake.answers.get((self.command, self.path.split("?")[0]),
                                                (404, b'{"error": "not found"}'))
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def answer(self, method: str, path: str, body: object, status: int = 200) -> None:
        self.answers[(method, path)] = (status, body if isinstance(body, bytes) else json.dumps(body).encode())


@pytest.fixture
def fake() -> Iterator[FakeNode]:
    node = FakeNode()
    thread = threading.Thread(target=node.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        node.server.shutdown()
        node.server.server_close()
        thread.join(10)


@pytest.mark.parametrize(("args", "method", "path"), [
    (["node", "cordon", "../node/leave#"], "POST", "/api/v1/nodes/..%2Fnode%2Fleave%23/cordon"),
    (["node", "uncordon", "a b?c=1"], "POST", "/api/v1/nodes/a%20b%3Fc%3D1/uncordon"),
    (["node", "drain", ".."], "POST", "/api/v1/nodes/%2E%2E/drain"),
    (["node", "remove", "../../api/delete"], "DELETE", "/api/v1/nodes/..%2F..%2Fapi%2Fdelete"),
])
def test_node_ids_stay_one_path_segment(fake, args, method, path):
    fake.answer(method, path, {"id": "x"})
    ok(omx(*args, host=fake.host))
    assert [(m, p) for m, p, _ in fake.seen] == [(method, path)]


def test_empty_node_id_is_refused(fake):
    assert one_error_line(omx("node", "cordon", "", host=fake.host)) == "omx: the node id must not be empty"
    assert fake.seen == []


@pytest.mark.parametrize(("args", "env", "line"), [
    (["--host", "http://[::1", "list"], None,
     "omx: --host: 'http://[::1' is not an address: '[' without a closing ']'"),
    (["--host", "[zz]:5", "list"], None, "omx: --host: '[zz]:5' is not an address: 'zz' is not an IPv6 address"),
    (["list", "--host", "ftp://x"], None, "omx: --host: 'ftp://x' is not an address: the scheme must be http:// "
                                          "or https://"),
    (["list"], "::::", "omx: OMX_HOST: '::::' is not an address: '::::' is not an IPv6 address"),
    (["ps"], "a b:1", "omx: OMX_HOST: 'a b:1' is not an address: 'a b' is not a host name or IP address"),
])
def test_bad_host_is_one_line(args, env, line):
    assert one_error_line(omx(*args, host=env)) == line


@pytest.mark.parametrize("args", [["show", "\udcff"], ["pull", "\udcff"], ["rm", "ok", "\udcff"],
                                  ["run", "omx-tiny", "caf\udce9"], ["--host", "\udcff", "list"]])
def test_arguments_that_are_not_utf8_are_refused(args):
    line = one_error_line(omx(*args, host="127.0.0.1:1"))
    assert line.startswith("omx: argument '") and line.endswith("' is not valid UTF-8")
    assert "\\xff" in line or "\\xe9" in line


def test_run_sends_non_utf8_stdin_with_replacement_characters(fake):
    fake.answer("POST", "/api/generate", b'{"response": "ok", "done": true}\n')
    res = subprocess.run([sys.executable, "-m", "omx.console.cli", "--host", fake.host, "run", "m"],
                         input=b"caf\xe9 \xff\xfe!", capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"ok\n"
    assert json.loads(fake.seen[0][2])["prompt"] == "caf\ufffd \ufffd\ufffd!"


@pytest.mark.parametrize(("args", "path", "body", "problem"), [
    (["list"], "/api/tags", [1, 2], "/api/tags: a JSON array, not an object"),
    (["ps"], "/api/ps", "str", "/api/ps: a JSON string, not an object"),
    (["node", "status"], "/api/v1/node/status", None, "/api/v1/node/status: a JSON null, not an object"),
    (["cluster"], "/api/v1/cluster", [{}], "/api/v1/cluster: a JSON array, not an object"),
    (["proxy", "status"], "/api/v1/proxy/status", [1], "/api/v1/proxy/status: a JSON array, not an object"),
    (["proxy", "instances"], "/api/v1/proxy/instances", {"instances": [1]},
     "/api/v1/proxy/instances: 'instances' is not a list of objects"),
    (["proxy", "metrics"], "/api/v1/proxy/metrics", {"instances": {"a": 1}},
     "/api/v1/proxy/metrics: 'instances' is not a map of objects"),
    (["list"], "/api/tags", {"models": "abc"}, "/api/tags: 'models' is not a list of objects"),
    (["ps", "--json"], "/api/ps", 7, "/api/ps: a JSON number, not an object"),
])
def test_a_server_that_is_not_an_omx_node_is_one_line(fake, args, path, body, problem):
    fake.answer("GET", path, body)
    line = one_error_line(omx(*args, host=fake.host))
    assert line == f"omx: http://{fake.host} did not answer like an omx node: {problem}"


def test_version_of_a_server_that_is_not_an_omx_node_warns(fake):
    fake.answer("GET", "/api/version", [])
    res = ok(omx("version", host=fake.host))
    assert res.stdout.startswith("omx client version ")
    assert res.stderr == f"omx: warning: http://{fake.host} did not answer like an omx node: /api/version: " \
                         "a JSON array, not an object\n"


def test_tables_show_wrong_typed_fields_as_question_marks(fake):
    fake.answer("GET", "/api/tags", b'{"models": [{"name": "a", "size": "abc"}, {"name": "b", "size": 1e400}, '
                                    b'{"name": "c", "size": 5000}]}')
    rows = {ln.split()[0]: ln.split() for ln in ok(omx("list", host=fake.host)).stdout.splitlines()[1:]}
    assert rows["a"][1] == "?" and rows["b"][1] == "?" and rows["c"][1:3] == ["5", "KB"]
    fake.answer("GET", "/api/ps", {"models": [{"name": "a", "size": 100, "size_vram": "x"},
                                              {"name": "b", "size": "q"}]})
    rows = {ln.split()[0]: ln.split() for ln in ok(omx("ps", host=fake.host)).stdout.splitlines()[1:]}
    assert rows["a"][1:4] == ["100", "B", "?"] and rows["b"][1:3] == ["?", "?"]
    fake.answer("GET", "/api/v1/node/status", {"id": "n1", "raft": [1], "members": "x"})
    assert "n1" in ok(omx("node", "status", host=fake.host)).stdout
    fake.answer("GET", "/api/v1/proxy/instances", {"instances": [{"id": "i", "loaded": [1, None]}]})
    assert "1, None" in ok(omx("proxy", "instances", host=fake.host)).stdout


@pytest.mark.parametrize("interval", ["nan", "inf", "-inf", "0", "-1"])
def test_watch_interval_must_be_finite_and_positive(interval):
    line = one_error_line(omx("proxy", "metrics", "--watch", "--interval", interval, host="127.0.0.1:1"))
    assert line == "omx: --interval must be a positive, finite number of seconds"


@pytest.mark.parametrize("source", ["from", "modelfile"])
def test_unknown_user_in_a_path_is_one_line(tmp_path, source):
    if source == "from":
        res = omx("create", "t1", "--from", "~nouserxyz/a.gguf", host="127.0.0.1:1")
    else:
        (tmp_path / "Modelfile").write_text("FROM ~nouserxyz/a.gguf\n")
        res = omx("create", "t1", "-f", str(tmp_path / "Modelfile"), host="127.0.0.1:1")
    assert one_error_line(res) == "omx: ~nouserxyz/a.gguf: cannot expand '~nouserxyz': no such user"


def test_binary_modelfile_is_one_line(tmp_path):
    (tmp_path / "Modelfile").write_bytes(b"FROM x\n\xff\xfe\x00binary")
    line = one_error_line(omx("create", "t1", "-f", str(tmp_path / "Modelfile"), host="127.0.0.1:1"))
    assert line == f"omx: {tmp_path / 'Modelfile'}: not a Modelfile: not UTF-8 text (byte 7)"


def test_keygen_that_cannot_write_leaves_nothing_and_can_be_retried(tmp_path):
    import resource

    def no_file_growth() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    key = tmp_path / "keys" / "cluster.key"
    res = subprocess.run([sys.executable, "-m", "omx.console.cli", "keygen", str(key)], capture_output=True,
                         text=True, timeout=60, preexec_fn=no_file_growth)
    assert one_error_line(res) == f"omx: cannot write {key}: File too large"
    assert list(key.parent.iterdir()) == []  # neither an empty key nor a temp file
    assert ok(omx("keygen", str(key))).stdout == f"wrote a new cluster key to {key}\n"
    assert len(key.read_text().strip()) == 44 and key.stat().st_mode & 0o777 == 0o600
    line = one_error_line(omx("keygen", str(key)))
    assert line == f"omx: {key} already exists; refusing to overwrite a cluster key"


DIGEST = "sha256:" + "ab" * 32


def _ollama_store(root: Path, manifests: dict[str, bytes]) -> Path:
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / DIGEST.replace(":", "-")).write_bytes(b"blob")
    for tag, data in manifests.items():
        path = root / "manifests" / "registry.ollama.ai" / "library" / "m" / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_import_skips_each_bad_model_and_fails(fake, tmp_path):
    good = json.dumps({"layers": [{"digest": DIGEST, "size": 4}]}).encode()
    root = _ollama_store(tmp_path / "ollama", {
        "a-list": b"[]",
        "b-layer": b'{"layers": [1]}',
        "c-size": json.dumps({"layers": [{"digest": DIGEST, "size": "zz"}]}).encode(),
        "d-digest": b'{"layers": [{"digest": "sha256:../../../etc/passwd", "size": 1}]}',
        "e-text": b"not json",
        "f-good": good,
    })
    fake.answer("HEAD", f"/api/blobs/{DIGEST}", b"")
    fake.answer("PUT", "/api/v1/manifests", {})
    res = omx("model", "import", "--from-ollama", str(root), host=fake.host)
    name = "registry.ollama.ai/library/m:"
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    for tag, why in [("a-list", "the manifest is not a JSON object"),
                     ("b-layer", "the manifest has a layer that is not an object: 1"),
                     ("c-size", f'the manifest gives blob {DIGEST} the size "zz", not a byte count'),
                     ("d-digest", "the manifest names a malformed digest 'sha256:../../../etc/passwd'"),
                     ("e-text", "the manifest is not JSON")]:
        assert f"skipping {name}{tag}: {why}\n" in res.stderr
    assert "imported 1 of 6 model(s)" in res.stderr
    assert res.stderr.splitlines()[-1] == (f"omx: 5 model(s) not imported: {name}a-list, {name}b-layer, "
                                           f"{name}c-size, {name}d-digest, {name}e-text")
    assert [p for m, p, _ in fake.seen if m == "PUT"] == [
        "/api/v1/manifests?model=registry.ollama.ai%2Flibrary%2Fm%3Af-good"]


def test_import_skips_a_name_the_node_refuses(fake, tmp_path):
    good = json.dumps({"layers": [{"digest": DIGEST, "size": 4}]}).encode()
    root = _ollama_store(tmp_path / "ollama", {"bad tag": good, "ok": good})
    fake.answer("HEAD", f"/api/blobs/{DIGEST}", b"")
    fake.answer("PUT", "/api/v1/manifests", {"error": "invalid model name"}, status=400)
    res = omx("model", "import", "--from-ollama", str(root), host=fake.host)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "skipping registry.ollama.ai/library/m:bad tag: invalid model name" in res.stderr
    assert "skipping registry.ollama.ai/library/m:ok: invalid model name" in res.stderr  # tried, not aborted
    assert len([m for m, _, _ in fake.seen if m == "PUT"]) == 2


def test_import_from_an_unknown_users_home_is_one_line():
    line = one_error_line(omx("model", "import", "--from-ollama", "~nouserxyz", host="127.0.0.1:1"))
    assert line == "omx: ~nouserxyz: cannot expand '~nouserxyz': no such user"
