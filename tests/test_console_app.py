"""`omx-console` behaviour on frozen data: actions, confirmations, errors, palette, playground, `--web` warning."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest

from omx.console.tui.app import OmxConsole
from omx.console.tui.data import Snapshot
from omx.console.tui.frozen import FrozenSource, sample_snapshot
from omx.console.tui.launch import is_loopback
from omx.console.tui.panes import EventsPane, InstancesTable, ModelsTable, NodesTable
from omx.node.launch import free_ports

pytestmark = pytest.mark.timeout(120)


class Console(OmxConsole):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.notes: list[tuple[str, str, str]] = []

    def notify(self, message: str, *, title: str = "", severity: str = "information", **kw: Any) -> None:  # type: ignore[override]
        self.notes.append((severity, title, message))
        super().notify(message, title=title, severity=severity, **kw)  # type: ignore[arg-type]


async def ready(pilot: Any) -> None:
    while pilot.app.polls < 1:
        await pilot.pause(0.02)
    await pilot.pause()


async def test_destructive_actions_ask_and_cancel_does_nothing() -> None:
    src = FrozenSource()
    app = Console(src, poll_interval=3600)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        await pilot.press("down", "d")  # drain node-0002
        await pilot.pause()
        assert type(app.screen).__name__ == "ConfirmScreen"
        await pilot.press("n")
        await pilot.pause()
        assert src.calls == []
        await pilot.press("d")
        await pilot.pause()
        await pilot.click("#yes")
        await pilot.pause()
        assert src.calls == [("drain", ("node-0002",))]
        await pilot.press("down", "down", "x", "y")  # node-0004 is dead: removed without force
        await pilot.pause()
        assert src.calls[-1] == ("remove", ("node-0004", False))


async def test_failed_action_is_a_notification_and_the_app_lives_on() -> None:
    src = FrozenSource()
    src.fail = "node node-0001 is alive; make it leave first"
    app = Console(src, poll_interval=0.05)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        await pilot.press("c")
        while not any(s == "error" for s, _, _ in app.notes):
            await pilot.pause(0.02)
        assert ("error", "Cordon node node-0001 failed", src.fail) in app.notes
        polls = app.polls
        while app.polls < polls + 3:
            await pilot.pause(0.02)
        assert app.is_running


async def test_a_poll_that_raises_anything_shows_in_the_banner_and_recovers() -> None:
    class Flaky(FrozenSource):
        async def snapshot(self) -> Snapshot:
            self.polls += 1
            if self.polls == 2:
                raise KeyError("members")  # a malformed answer: a bug, still not a crash
            return self.snap

    app = Console(Flaky(), poll_interval=0.05)
    async with app.run_test(size=(150, 40)) as pilot:
        while app.error is None:
            await pilot.pause(0.02)
        assert "KeyError" in app.error
        while app.error is not None:
            await pilot.pause(0.02)
        assert any(t == "Reconnected" for _, t, _ in app.notes)


async def test_palette_lists_actions_per_target_and_runs_them() -> None:
    src = FrozenSource()
    app = Console(src, poll_interval=3600)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+p", *"uncordon node-0003")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert src.calls == [("uncordon", ("node-0003",))]
        await pilot.press("ctrl+p", *"scale model llama3")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert type(app.screen).__name__ == "FormScreen"
        await pilot.press("ctrl+a", "ctrl+k", *"5", "enter")  # replace the current value, then submit
        await pilot.pause(0.2)
        assert src.calls[-1] == ("scale", ("llama3:8b", 5))


async def test_scale_rejects_a_bad_number_without_calling() -> None:
    src = FrozenSource()
    app = Console(src, poll_interval=3600)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        await pilot.press("3", "s")
        await pilot.pause()
        app.screen.query_one("#field-replicas").value = "many"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert src.calls == [] and "whole number" in app.notes[-1][2]
        assert app.query_one(ModelsTable).selected_key == "omx-tiny:latest"


async def test_pull_progress_shows_in_the_models_screen() -> None:
    src = FrozenSource()
    app = Console(src, poll_interval=3600)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        await pilot.press("P")
        await pilot.pause()
        app.screen.query_one("#field-model").value = "qwen2:0.5b"  # type: ignore[attr-defined]
        await pilot.press("enter")
        while not any("Pull" in m for _, _, m in app.notes):
            await pilot.pause(0.02)
        assert src.calls == [("pull", ("qwen2:0.5b",))] and app.transfers == {}


async def test_events_filter_and_playground() -> None:
    app = Console(FrozenSource(), poll_interval=3600)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        pane = app.query_one(EventsPane)
        while len(pane.rows) < 8:
            await pilot.pause(0.02)
        await pilot.press("5")
        app.query_one("#events-filter").focus()
        await pilot.press(*"member.")
        await pilot.pause()
        assert app.query_one("#events-table").row_count == 3
        app.action_show_tab("playground")  # the filter has focus: digits would be typed into it
        await pilot.press(*"hi", "enter")
        while len(app.chat_log) < 2:
            await pilot.pause(0.02)
        assert app.chat_log[-1] == {"role": "assistant", "content": "Hello from the cluster."}


async def test_large_feed_renders_every_row() -> None:
    snap = sample_snapshot(nodes=1000, instances=5000)
    app = Console(FrozenSource(snap, events=[]), poll_interval=3600, live_events=False)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        assert app.query_one(NodesTable).row_count == 1000
        while app.query_one(InstancesTable).row_count < 5000:  # hidden screens catch up after the poll
            await pilot.pause(0.05)
        await pilot.press("2")
        await pilot.pause()
        assert app.query_one(InstancesTable).row_count == 5000


def test_web_mode_warns_when_bound_beyond_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "omx.console.tui", "--web", "--host", "0.0.0.0", "--port",
                             str(port), "--api-url", "http://127.0.0.1:1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "WARNING" in line and "authenticating proxy" in line
    finally:
        proc.terminate()
        proc.wait(10)


async def test_mouse_switches_screens_presses_keys_and_opens_row_menus() -> None:
    src = FrozenSource()
    app = Console(src, poll_interval=3600)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        bar = app.query_one("#tabs")
        await pilot.click(bar, offset=(14, 0))  # " 1 Cluster  2 Instances": the second tab
        await pilot.pause()
        assert app.active_tab == "instances" and app.focused is app.query_one(InstancesTable)
        await pilot.click("#tabs", offset=(2, 0))
        await pilot.pause()
        assert app.active_tab == "cluster"
        await pilot.click("KeyBar", offset=(2, 0))  # the first key shown: c Cordon, on the selected node
        await pilot.pause(0.2)
        assert src.calls == [("cordon", ("node-0001",))]
        await pilot.click(NodesTable, offset=(3, 3))  # header, then rows 0, 1, 2: node-0003
        await pilot.pause()
        assert type(app.screen).__name__ == "RowActions" and app.query_one(NodesTable).selected_key == "node-0003"


async def test_table_keeps_the_cursor_on_its_row_when_rows_come_and_go() -> None:
    snap = sample_snapshot(nodes=50)
    src = FrozenSource(snap, events=[])
    app = Console(src, poll_interval=3600, live_events=False)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        table = app.query_one(NodesTable)
        await pilot.press("end")
        assert table.selected_key == "node-0050"
        await pilot.press("pageup", "up")
        key = table.selected_key
        app.apply(replace(snap, members=snap.members[5:]))  # five rows above the cursor leave
        await pilot.pause()
        assert table.selected_key == key and table.row_count == 45
        assert str(table.cells["node-0010"][0]) == "node-0010" and "node-0001" not in table.cells


def screen_text(app: OmxConsole) -> str:
    """What the terminal shows now, as plain text."""
    update = app.screen._compositor.render_update(full=True)
    return "\n".join("".join(seg.text for seg in strip) for strip in update.strips)  # type: ignore[attr-defined]


async def test_a_switch_is_drawn_in_one_frame_and_no_later_change_is_lost() -> None:
    """Switching to a screen seen before reaches the terminal as one frame showing the new screen (a second,
    identical frame used to follow 30-60 ms later); a change that arrives after that frame is still drawn."""
    src = FrozenSource(sample_snapshot(nodes=300, instances=900))
    app = OmxConsole(src, poll_interval=3600, live_events=False)
    async with app.run_test(size=(150, 40)) as pilot:
        await ready(pilot)
        frames: list[str] = []
        display = app._display

        def catch(screen: Any, renderable: Any) -> None:
            display(screen, renderable)
            if renderable is not None:
                frames.append(type(renderable).__name__)

        app._display = catch  # type: ignore[method-assign]
        for key in "2341":  # first visits fill the tables (a layout of its own); then switches are timed
            await pilot.press(key)
            await pilot.pause()
        for key, marker in (("2", "900 instances"), ("4", "requests/s"), ("3", "models"), ("1", "300 members")):
            frames.clear()
            await pilot.press(key)
            await pilot.pause()
            await pilot.pause()
            assert len(frames) == 1, (key, frames)
            assert marker in screen_text(app), key
        # the poll after the switch: a member goes dead, its row must be redrawn
        snap = app.snap
        assert snap is not None
        first = snap.members[0]
        app.apply(replace(snap, members=(replace(first, status="dead", api_addr="changed-addr:1"), *snap.members[1:])))
        while "changed-addr:1" not in screen_text(app):
            await pilot.pause(0.02)
