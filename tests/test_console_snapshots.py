"""Snapshot tests: every screen of `omx-console`, fed frozen data, in the dark and the light theme.

Update after an intended UI change with `pytest tests/test_console_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from omx.console.tui.app import OmxConsole
from omx.console.tui.data import MetricPoint, MetricsSample
from omx.console.tui.frozen import FrozenSource, sample_snapshot

pytestmark = pytest.mark.timeout(120)
SCREENS = ["cluster", "instances", "models", "metrics", "events", "playground"]
THEMES = {"dark": "textual-dark", "light": "textual-light"}


def make_app(theme: str) -> OmxConsole:
    app = OmxConsole(FrozenSource(), poll_interval=3600)  # one poll at start, none while the picture is taken
    app.theme = THEMES[theme]
    return app


async def settle(pilot: Any, screen: str) -> None:
    app: OmxConsole = pilot.app
    while app.polls < 1 or app.query_one("#events-table").row_count < 8:  # type: ignore[attr-defined]
        await pilot.pause(0.05)
    if screen == "metrics":  # a history, so the charts have a shape
        snap = app.snap
        assert snap is not None and snap.metrics is not None
        for k in range(30):
            wave = (k % 10) / 10
            m = MetricsSample(cluster=MetricPoint(10 + 8 * wave, 40 + 20 * wave, 200 + 90 * wave, 12 + 5 * wave,
                                                  50 + 30 * wave, 200 + 100 * wave),
                              per_node=snap.metrics.per_node, source="proxy")
            app.apply(replace(snap, metrics=m))
    await pilot.press(str(SCREENS.index(screen) + 1))
    if screen == "playground":
        await pilot.press(*"hello", "enter")
        while len(app.chat_log) < 2:
            await pilot.pause(0.05)
    if screen == "models":
        app.transfers["qwen2:0.5b"] = "downloading 42%"
        app.query_one("#models-pane").show(app.snap, app.transfers)  # type: ignore[attr-defined]
    await pilot.pause()


@pytest.mark.parametrize("theme", list(THEMES))
@pytest.mark.parametrize("screen", SCREENS)
def test_screen(snap_compare: Any, screen: str, theme: str) -> None:
    assert snap_compare(make_app(theme), terminal_size=(150, 40), run_before=lambda pilot: settle(pilot, screen))


def test_confirmation_dialog(snap_compare: Any) -> None:
    async def before(pilot: Any) -> None:
        await settle(pilot, "cluster")
        await pilot.press("down", "x")
        await pilot.pause()

    assert snap_compare(make_app("dark"), terminal_size=(150, 40), run_before=before)


def test_unreachable_banner(snap_compare: Any) -> None:
    class Down(FrozenSource):
        async def snapshot(self) -> Any:
            from omx.console.tui.client import Unreachable

            self.polls += 1
            raise Unreachable("no cluster member reachable (http://10.0.0.1:11434: [Errno 111] Connection refused)")

    async def before(pilot: Any) -> None:
        while pilot.app.error is None:
            await pilot.pause(0.05)
        await pilot.pause()

    app = OmxConsole(Down(sample_snapshot(), events=[]), poll_interval=3600, live_events=False)
    assert snap_compare(app, terminal_size=(150, 40), run_before=before)
