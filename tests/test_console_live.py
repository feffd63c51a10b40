"""`omx-console` against a real 3-node cluster: every action driven from the console, checked over HTTP.

The app runs headless under Pilot (and, at the end of the file, in tmux and in headless Chromium). The
tests that kill nodes come last: they leave the cluster degraded on purpose.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from omx.console.tui.app import OmxConsole
from omx.console.tui.client import HttpSource
from omx.console.tui.panes import EventsPane, InstancesTable, ModelsTable, NodesTable
from omx.console.tui.widgets import LiveTable
from omx.node.launch import NodeProc, start_cluster, wait_until

pytestmark = pytest.mark.timeout(300)
SIZE = (180, 50)


class RecordingConsole(OmxConsole):
    """Keeps every notification so a test can assert on what the operator was told."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.notes: list[tuple[str, str, str]] = []

    def notify(self, message: str, *, title: str = "", severity: str = "information", **kw: Any) -> None:  # type: ignore[override]
        self.notes.append((severity, title, message))
        super().notify(message, title=title, severity=severity, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    # Every node sees two GPUs: an nvidia-smi on its PATH answers the node's query the way the real one does
    fake_bin = tmp_path_factory.mktemp("fake-bin")
    smi = fake_bin / "nvidia-smi"
    smi.write_text('#!/bin/sh\n'
                   'case "$*" in *--query-gpu=memory.used,memory.total,utilization.gpu*) ;; *) exit 9;; esac\n'
                   'printf "4000, 81559, 30\\n12000, 81559, 50\\n"\n')
    smi.chmod(0o755)
    env = {"OMX_SUSPICION_MULT": "4", "OMX_LOG_LEVEL": "INFO", "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    for attempt in range(3):  # free ports are picked before the nodes bind them: a parallel test may take one
        try:
            nodes = start_cluster(tmp_path_factory.mktemp("console-cluster"), 3, 1, env=env)
            break
        except RuntimeError as e:
            if "in use" not in str(e) or attempt == 2:
                raise
    try:
        wait_until(lambda: all(len([m for m in get(n, "/api/v1/cluster")["members"] if m["status"] == "alive"]) == 3
                               for n in nodes), 90, what="3 alive members everywhere")
        wait_until(lambda: get(nodes[0], "/api/v1/cluster/leader").get("id"), 60, what="a Raft leader")
        yield nodes
    finally:
        for n in nodes:
            n.stop(signal.SIGKILL)


def get(node: NodeProc, path: str) -> dict:
    r = httpx.get(node.url + path, timeout=10)
    return r.json() if r.status_code == 200 else {}


def app_for(node: NodeProc, **kw: Any) -> RecordingConsole:
    return RecordingConsole(HttpSource(node.url), poll_interval=kw.pop("poll_interval", 0.5), **kw)


async def until(pilot: Any, cond: Callable[[], Any], limit: float = 30.0, what: str = "condition") -> None:
    """The async twin of `wait_until`: lets the app run between checks."""
    deadline = time.monotonic() + limit
    while True:
        try:
            if cond():
                return
        except (httpx.HTTPError, OSError, KeyError, StopIteration):
            pass
        if time.monotonic() > deadline:
            notes = getattr(pilot.app, "notes", [])
            raise TimeoutError(f"timed out after {limit:.0f}s waiting for {what}; console notifications: {notes}")
        await pilot.pause(0.1)


async def select(pilot: Any, table: LiveTable, key: str) -> None:
    await until(pilot, lambda: key in table.cells, 30, f"row {key}")
    table.focus()
    table.move_cursor(row=table.get_row_index(key))
    await pilot.pause()
    assert table.selected_key == key


def registry_node(node: NodeProc, nid: str) -> dict:
    return get(node, "/api/v1/registry")["state"]["nodes"][nid]


async def test_cluster_screen_shows_every_member_and_the_leader(cluster: list[NodeProc]) -> None:
    app = app_for(cluster[0])
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NodesTable)
        await until(pilot, lambda: set(table.cells) == {n.id for n in cluster}, 30, "3 rows")
        await until(pilot, lambda: all(str(c[2]) == "alive" for c in table.cells.values()), 30, "all alive")
        leader = get(cluster[0], "/api/v1/cluster/leader")["id"]
        await until(pilot, lambda: "leader" in str(table.cells[leader][1]), 30, "the leader marked")
        assert "3/3 alive" in str(app.query_one("#banner").render())
        # memory and GPU use: RAM from /proc/meminfo, the two GPUs (16,000 of 163,118 MiB, 40% on average)
        await until(pilot, lambda: all("gpu 2× 16.8/171.0 GB 40%" in str(c[-1]) for c in table.cells.values()), 30,
                    "GPU use on every row")
        assert all(str(c[-1]).split(" GB")[0].count("/") == 1 for c in table.cells.values())


async def test_node_actions_from_keys_palette_and_row_menu(cluster: list[NodeProc]) -> None:
    target = cluster[1]
    app = app_for(cluster[0])
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NodesTable)
        await select(pilot, table, target.id)
        await pilot.press("c")  # cordon: not destructive, no confirmation
        await until(pilot, lambda: registry_node(cluster[0], target.id)["cordoned"], 20, "cordon applied")
        await until(pilot, lambda: "cordoned" in str(table.cells[target.id][6]), 20, "cordon shown")
        await pilot.press("u")
        await until(pilot, lambda: not registry_node(cluster[0], target.id)["cordoned"], 20, "uncordon applied")

        await pilot.press("ctrl+p")  # drain from the command palette: destructive, so it asks first
        await pilot.press(*f"drain node {target.id}")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", 10, "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: registry_node(cluster[0], target.id)["draining"], 20, "drain applied")
        await until(pilot, lambda: "draining" in str(table.cells[target.id][6]), 20, "drain shown")

        await select(pilot, table, target.id)  # the mouse path: enter/click a row opens its action menu
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "RowActions", 10, "the row menu")
        await pilot.press("down", "enter")  # second entry: Uncordon
        await until(pilot, lambda: not registry_node(cluster[0], target.id)["draining"], 20, "uncordon via menu")


async def test_failed_action_shows_the_server_error_and_the_app_keeps_running(cluster: list[NodeProc]) -> None:
    app = app_for(cluster[0])
    async with app.run_test(size=SIZE) as pilot:
        await select(pilot, app.query_one(NodesTable), cluster[2].id)
        app.act_on("cordon", "no-such-node")
        await until(pilot, lambda: any(s == "error" for s, _, _ in app.notes), 20, "an error notification")
        msg = next(n for n in app.notes if n[0] == "error")[2]
        assert "no-such-node" in msg and "Traceback" not in msg, msg
        app.act_on("scale", "no-such-model:latest")
        await until(pilot, lambda: type(app.screen).__name__ == "FormScreen", 10, "the scale form")
        await pilot.press("enter")
        await until(pilot, lambda: sum(s == "error" for s, _, _ in app.notes) >= 2, 20, "a second error")
        assert "not found" in app.notes[-1][2], app.notes[-1]
        polls = app.polls
        await until(pilot, lambda: app.polls > polls + 1, 10, "polling to go on")


async def test_transfer_leadership_to_the_selected_voter(cluster: list[NodeProc]) -> None:
    app = app_for(cluster[0])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: get(cluster[0], "/api/v1/cluster/leader").get("id"), 30, "a leader")
        leader = get(cluster[0], "/api/v1/cluster/leader")["id"]
        to = next(n.id for n in cluster if n.id != leader)
        await select(pilot, app.query_one(NodesTable), to)
        await pilot.press("l")
        await until(pilot, lambda: get(cluster[0], "/api/v1/cluster/leader")["id"] == to, 60, "leadership moved")
        table = app.query_one(NodesTable)
        await until(pilot, lambda: "leader" in str(table.cells[to][1]), 30, "the new leader marked")
        assert not [n for n in app.notes if n[0] == "error"], app.notes


async def test_model_actions_copy_delete_load_unload_scale(cluster: list[NodeProc]) -> None:
    model = "omx-tiny:latest"
    app = app_for(cluster[0])

    def tags() -> set[str]:
        return {m["name"] for m in get(cluster[0], "/api/tags")["models"]}

    def loaded() -> set[str]:
        return {m["name"] for m in get(cluster[0], "/api/ps")["models"]}

    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        table = app.query_one(ModelsTable)
        await select(pilot, table, model)
        await pilot.press("y")  # copy: a form asks for the new name
        await until(pilot, lambda: type(app.screen).__name__ == "FormScreen", 10, "the copy form")
        app.screen.query_one("#field-destination").value = "console-copy"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await until(pilot, lambda: "console-copy:latest" in tags(), 30, "the copy")
        await until(pilot, lambda: "console-copy:latest" in table.cells, 30, "the copy listed")

        await select(pilot, table, "console-copy:latest")
        await pilot.press("x")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", 10, "the confirmation")
        await pilot.press("n")  # cancelled: nothing happens
        await pilot.pause(0.5)
        assert "console-copy:latest" in tags()
        await pilot.press("x")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", 10, "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: "console-copy:latest" not in tags(), 60, "the copy deleted")

        await select(pilot, table, model)
        await pilot.press("l")
        await until(pilot, lambda: model in loaded(), 120, "the model loaded")
        await until(pilot, lambda: str(table.cells[model][3]).startswith("1/"), 30, "1 replica shown")
        await pilot.press("u")
        await until(pilot, lambda: model not in loaded(), 60, "the model unloaded")

        await pilot.press("s")
        await until(pilot, lambda: type(app.screen).__name__ == "FormScreen", 10, "the scale form")
        app.screen.query_one("#field-replicas").value = "2"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await until(pilot, lambda: next(m for m in get(cluster[0], "/api/v1/models")["models"]
                                        if m["name"] == model)["replicas"] == 2, 30, "desired replicas = 2")
        await until(pilot, lambda: str(table.cells[model][3]).endswith("/2"), 30, "replicas shown")
        await pilot.press("s")  # back to load-on-demand, so the replicas stop using the test machine's CPU
        await until(pilot, lambda: type(app.screen).__name__ == "FormScreen", 10, "the scale form")
        app.screen.query_one("#field-replicas").value = "0"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await until(pilot, lambda: str(table.cells[model][3]).endswith("/0"), 30, "replicas 0 shown")

        errors = [n for n in app.notes if n[0] == "error"]
        assert not errors, errors


async def test_pull_reports_progress_or_the_servers_error(cluster: list[NodeProc]) -> None:
    app = app_for(cluster[0])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("P")
        await until(pilot, lambda: type(app.screen).__name__ == "FormScreen", 10, "the pull form")
        app.screen.query_one("#field-model").value = "no-such-namespace/no-such-model:1b"  # type: ignore[attr-defined]
        await pilot.press("enter")
        # no registry is reachable from the test machine: the operator must get the server's reason
        await until(pilot, lambda: any(t.startswith("Pull model") for _, t, _ in app.notes), 120, "the outcome")
        sev, _title, msg = next(n for n in app.notes if n[1].startswith("Pull model"))
        assert sev == "error" and msg and "Traceback" not in msg
        assert not app.transfers


async def test_add_and_remove_an_external_instance(cluster: list[NodeProc]) -> None:
    url = "http://127.0.0.1:9"  # nothing listens: the instance is registered but unhealthy
    app = app_for(cluster[0])

    def listed() -> set[str]:
        return {i["url"] for i in get(cluster[0], "/api/v1/proxy/instances")["instances"] if i["kind"] == "external"}

    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.press("A")
        await until(pilot, lambda: type(app.screen).__name__ == "FormScreen", 10, "the add form")
        app.screen.query_one("#field-url").value = url  # type: ignore[attr-defined]
        await pilot.press("enter")
        await until(pilot, lambda: url in listed(), 30, "the instance registered")
        table = app.query_one(InstancesTable)
        await until(pilot, lambda: url in table.cells, 30, "the instance listed")
        assert str(table.cells[url][3]) == "unhealthy"
        await select(pilot, table, url)
        await pilot.press("x")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", 10, "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: url not in listed(), 30, "the instance removed")
        await until(pilot, lambda: url not in table.cells, 30, "the row gone")


async def test_playground_streams_a_reply(cluster: list[NodeProc]) -> None:
    app = app_for(cluster[0])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.snap and app.snap.models, 30, "models")
        await pilot.press("6")
        await pilot.press(*"hello", "enter")
        await until(pilot, lambda: len(app.chat_log) == 2, 120, "a reply")
        assert app.chat_log[1]["role"] == "assistant" and app.chat_log[1]["content"]
        assert not [n for n in app.notes if n[0] == "error"], app.notes


def test_tmux_command_palette_action(cluster: list[NodeProc], tmp_path: Any) -> None:
    import shutil
    import subprocess
    import sys

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    target = cluster[1]
    session = f"omx-console-{time.monotonic_ns()}"
    cmd = f"{sys.executable} -m omx.console.tui --api-url {cluster[0].url} --poll 0.5"
    tmux = ["tmux", "-L", session, "-f", "/dev/null"]  # a private server: no one else's options or window sizes
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "180", "-y", "50", cmd], check=True)
    subprocess.run([*tmux, "resize-window", "-t", session, "-x", "180", "-y", "50"], check=False)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def keys(*k: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", session, *k], check=True)

    def until_screen(cond: Callable[[], bool], what: str, limit: float = 30) -> None:
        try:
            wait_until(cond, limit, what=what)
        except TimeoutError as e:
            raise AssertionError(f"{e}; the tmux screen:\n{screen()}") from None

    try:
        until_screen(lambda: all(n.id in screen() for n in cluster) and "alive 3" in screen(),
                     "the console to show the cluster in tmux", 60)
        keys("C-p")
        until_screen(lambda: "Search for commands" in screen(), "the palette")
        keys("-l", f"cordon node {target.id}")
        until_screen(lambda: f"Cordon node {target.id}" in screen(), "the palette hit")
        keys("Enter")
        wait_until(lambda: registry_node(cluster[0], target.id)["cordoned"], 20, what="the cordon")
        until_screen(lambda: "cordoned" in screen(), "the screen to show the cordon")
        (tmp_path / "tmux-screen.txt").write_text(screen())
        keys("C-p")
        until_screen(lambda: "Search for commands" in screen(), "the palette again")
        keys("-l", f"uncordon node {target.id}")
        until_screen(lambda: f"Uncordon node {target.id}" in screen(), "the uncordon hit")
        keys("Enter")
        wait_until(lambda: not registry_node(cluster[0], target.id)["cordoned"], 20, what="the uncordon")
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)


def test_web_console_renders_the_cluster_in_headless_chromium(cluster: list[NodeProc]) -> None:
    """`omx-console --web` in a real browser: the terminal stream carries the Cluster screen; a screenshot is kept."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from omx.node.launch import free_ports

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p),
                    None)
    if chromium is None:
        pytest.skip("no Chromium on this machine (.ci/run installs it)")
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "omx.console.tui", "--web", "--port", str(port),
                             "--api-url", cluster[0].url, "--poll", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    artifacts = Path(os.environ.get("OMX_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    frames: list[str] = []
    ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

    def screen_text() -> str:
        return ansi.sub("", "".join(f.decode("utf-8", "replace") if isinstance(f, bytes) else f for f in frames))

    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200, 60,
                   what="the web console to listen")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(f)))
            page.goto(f"http://127.0.0.1:{port}/")
            deadline = time.monotonic() + 60
            while not (all(n.id in screen_text() for n in cluster) and "3/3 alive" in screen_text()):
                assert time.monotonic() < deadline, f"no Cluster screen in the browser:\n{screen_text()[-2000:]}"
                page.wait_for_timeout(200)
            page.wait_for_timeout(500)  # let xterm.js paint the last frame
            shot = artifacts / "console-web-cluster.png"
            page.screenshot(path=str(shot))
            assert page.locator(".xterm").count() >= 1
            browser.close()
        assert shot.stat().st_size > 10_000
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_killed_node_shows_on_cluster_and_events(cluster: list[NodeProc]) -> None:
    victim = cluster[2]
    app = app_for(cluster[0])
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(NodesTable)
        await until(pilot, lambda: str(table.cells[victim.id][2]) == "alive", 30, "the victim alive")
        await until(pilot, lambda: app.events_live, 10, "the event stream")
        victim.stop(signal.SIGKILL)
        await until(pilot, lambda: str(table.cells[victim.id][2]) in ("suspect", "dead"), 60, "suspect/dead shown")
        events = app.query_one(EventsPane)
        await until(pilot, lambda: any(e.kind in ("member.suspect", "member.dead") and e.data.get("id") == victim.id
                                       for e in events.rows), 60, "a membership event")
        await until(pilot, lambda: str(table.cells[victim.id][2]) == "dead", 90, "dead shown")
        await until(pilot, lambda: any(e.kind == "member.dead" and e.data.get("id") == victim.id
                                       for e in events.rows), 60, "the member.dead event")
        await pilot.press("5")
        await pilot.press(*"member.dead")
        await until(pilot, lambda: app.query_one("#events-table").row_count >= 1, 30, "the filtered dead event")


async def test_console_reconnects_when_its_node_dies(cluster: list[NodeProc]) -> None:
    connected, survivor = cluster[0], cluster[1]
    app = app_for(connected)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.snap and survivor.url in app.source.known, 30, "the member list")
        connected.stop(signal.SIGKILL)
        await until(pilot, lambda: app.source.url == survivor.url, 60, "the failover")
        await until(pilot, lambda: app.snap.connected == survivor.url and app.error is None, 30, "fresh data")
        assert any(t == "Failover" for _, t, _ in app.notes), app.notes
        assert any(e.kind == "console.failover" for e in app.query_one(EventsPane).rows)
        assert survivor.url in str(app.query_one("#banner").render())
        table = app.query_one(NodesTable)
        await until(pilot, lambda: str(table.cells[connected.id][2]) in ("suspect", "dead"), 60,
                    "the dead node shown from the survivor's view")
        await asyncio.sleep(0)
