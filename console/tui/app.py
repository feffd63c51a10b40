"""`OmxConsole`: the operator's live view of the cluster and the place every management action starts.

Two long-lived workers feed it: one polls the source (a single loop, so polls never overlap; an event
wakes it early) and one follows the node's event stream. Both catch everything: a failing cluster
shows up in the banner and in notifications, never as a crash.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import ContentSwitcher, Header, Input, OptionList, Select, Static
from textual.widgets.option_list import Option

from omx.console.tui.actions import ACTIONS, ActionSpec, for_target
from omx.console.tui.client import ApiError, Source
from omx.console.tui.data import EventRow, Snapshot
from omx.console.tui.panes import (
    ClusterPane,
    EventsPane,
    InstancesPane,
    InstancesTable,
    MetricsHistory,
    MetricsPane,
    MetricsTable,
    ModelsPane,
    ModelsTable,
    NodesTable,
    PlaygroundPane,
)
from omx.console.tui.widgets import ConfirmScreen, Field, FormScreen, KeyBar, LiveTable, OneFrameScreen, TabBar

TABS = (("cluster", "Cluster"), ("instances", "Instances"), ("models", "Models"), ("metrics", "Metrics"),
        ("events", "Events"), ("playground", "Playground"))
TABLE_FOR = {"node": ("cluster", NodesTable), "model": ("models", ModelsTable),
             "instance": ("instances", InstancesTable)}
GC_FULL_EVERY = 600.0  # seconds between full garbage collections (see OmxConsole._collect_garbage)
CATCH_UP_DELAY = 0.03  # seconds between hidden screens brought up to date after a poll (key presses go between)
# events that change what the screens show: they wake the poller early
WAKE_KINDS = ("member.", "raft.", "registry.", "model.", "router.", "scheduler.", "transfer.")


class ActionCommands(Provider):
    """Command palette entries: screens, general actions, and every action on every current target."""

    def _general(self) -> list[tuple[str, Callable[[], Any], str]]:
        app: OmxConsole = self.app  # type: ignore[assignment]
        out = [(f"Show {title}", partial(app.action_show_tab, tab), f"switch to the {title} screen")
               for tab, title in TABS]
        out += [(a.title, partial(app.act_on, a.id, None), a.help) for a in ACTIONS.values() if a.target is None]
        out.append(("Refresh now", app.action_refresh, "poll the cluster immediately"))
        return out

    def _targeted(self) -> list[tuple[str, Callable[[], Any], str]]:
        app: OmxConsole = self.app  # type: ignore[assignment]
        snap = app.snap
        if snap is None:
            return []
        targets = {"node": [m.id for m in snap.members], "model": [m.name for m in snap.models],
                   "instance": [i.id for i in snap.instances if i.kind == "external"]}
        return [(f"{a.title} {t}", partial(app.act_on, a.id, t), a.help)
                for kind, names in targets.items() for a in for_target(kind) for t in names]

    async def discover(self) -> Hits:
        for text, cb, help_ in self._general():
            yield DiscoveryHit(text, cb, help=help_)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, cb, help_ in [*self._general(), *self._targeted()]:
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), cb, help=help_)


class RowActions(ModalScreen[str | None]):
    """Enter (or a click) on a row: the actions that apply to it, for the mouse."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Close")]
    DEFAULT_CSS = """
    RowActions { align: center middle; }
    RowActions > Vertical { width: 60; height: auto; border: thick $primary; background: $surface; padding: 0 1; }
    RowActions OptionList { height: auto; max-height: 16; }
    """

    def __init__(self, kind: str, target: str) -> None:
        super().__init__()
        self.kind, self.target = kind, target

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(f"{self.kind} {self.target}", style="bold"))
            yield OptionList(*[Option(f"{a.title} ({a.key})", id=a.id) for a in for_target(self.kind)])

    @on(OptionList.OptionSelected)
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class OmxConsole(App[None]):
    TITLE = "omx-console"
    COMMANDS = App.COMMANDS | {ActionCommands}
    CSS = """
    #banner { height: 1; padding: 0 1; background: $panel; color: $text; }
    ContentSwitcher { height: 1fr; }
    ClusterPane, InstancesPane, ModelsPane, MetricsPane, EventsPane, PlaygroundPane { height: 1fr; }
    #prompt { margin: 0 0 0 0; }
    #banner.-error { background: $error; color: $text; text-style: bold; }
    .summary { height: 1; padding: 0 1; }
    LiveTable, EventsTable { height: 1fr; }
    #events-bar, #playground-bar { height: 3; }
    #events-filter { width: 1fr; }
    #events-status { width: auto; max-width: 60; padding: 1 1 0 1; }
    #model-label { padding: 1 0 0 1; }
    #chat-model { width: 50; }
    #transcript { height: 1fr; border: round $primary; }
    .msg { margin-bottom: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        *[Binding(str(i + 1), f"show_tab('{tab}')", title, show=False) for i, (tab, title) in enumerate(TABS)],
        *[Binding(a.key, f"act('{a.id}')", a.label, tooltip=a.help) for a in ACTIONS.values()
          if a.target is None],
        Binding("f5", "refresh", "Refresh"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, source: Source, poll_interval: float = 2.0, live_events: bool = True) -> None:
        super().__init__()
        # No animations: an operator's key press should redraw once, at once, in a terminal or over --web
        self.animation_level = "none"
        self.source = source
        self.poll_interval = poll_interval
        self.live_events = live_events
        self.snap: Snapshot | None = None
        self.error: str | None = None
        self.history = MetricsHistory()
        self.transfers: dict[str, str] = {}
        self.events_live = False
        self.chat_log: list[dict[str, str]] = []
        self.polls = 0
        self._wake = asyncio.Event()
        self._failovers_seen = 0
        self._stale: set[str] = set()  # screens not yet redrawn with the latest snapshot
        self._catching_up = False
        self.active_tab = "cluster"
        self._gc_full_at = time.monotonic()

    # ---- layout ---------------------------------------------------------------------------------
    def get_default_screen(self) -> OneFrameScreen:
        return OneFrameScreen(id="_default")

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting to " + self.source.url + " …", id="banner")
        # A tab bar and a ContentSwitcher rather than TabbedContent: one widget to redraw on a switch, in one frame
        yield TabBar(TABS, self.active_tab, id="tabs")
        with ContentSwitcher(initial=f"{self.active_tab}-pane"):
            panes = {"cluster": ClusterPane, "instances": InstancesPane, "models": ModelsPane,
                     "metrics": MetricsPane, "events": EventsPane, "playground": PlaygroundPane}
            for tab, _ in TABS:
                yield panes[tab](id=f"{tab}-pane")
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = self.source.url
        self.query_one(NodesTable).focus()
        self.run_worker(self._poll_loop(), name="poll", group="poll", exclusive=True, exit_on_error=False)
        if self.live_events:
            self.run_worker(self._event_loop(), name="events", group="events", exclusive=True, exit_on_error=False)
        else:
            self.query_one(EventsPane).set_status(False, "event stream off")

    # ---- live data --------------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        """The only poller: one request set at a time; sleeps `poll_interval` or until an event wakes it."""
        while True:
            try:
                snap = await self.source.snapshot()
            except ApiError as e:
                self._set_error(str(e))
            except Exception as e:  # a bug or odd reply must not kill live updates
                self._set_error(f"{type(e).__name__}: {e}")
            else:
                self.polls += 1
                self.apply(snap)
            self._report_failovers()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _event_loop(self) -> None:
        """Follow the connected member's event stream; after a failover, resume on the new member."""
        after, url, last_ts, backoff = 0, "", 0.0, 0.5
        pane = self.query_one(EventsPane)
        while True:
            if self.source.url != url:
                after, url = 0, self.source.url  # sequence numbers are per node: start over, skip what we saw
            try:
                pane.set_status(True, url)
                self.events_live = True
                async for ev in self.source.events(after):
                    after = max(after, ev.seq)
                    if ev.ts < last_ts and ev.kind != "stream.lagged":
                        continue
                    last_ts = max(last_ts, ev.ts)
                    pane.add([ev])
                    backoff = 0.5
                    if ev.kind.startswith(WAKE_KINDS):
                        self._wake.set()
                reason = "stream ended"
            except Exception as e:
                reason = str(e) or type(e).__name__
            self.events_live = False
            pane.set_status(False, reason[:50])
            self._wake.set()  # the poller notices a dead node at once and fails over
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _report_failovers(self) -> None:
        fo = getattr(self.source, "failovers", [])
        for old, new, reason in fo[self._failovers_seen:]:
            msg = f"lost {old} ({reason or 'no answer'}); reconnected to {new}"
            self.notify(msg, title="Failover", severity="warning", timeout=10)
            self.query_one(EventsPane).add([EventRow(seq=0, kind="console.failover", ts=time.time(),
                                                     data={"from": old, "to": new}, origin="console")])
        self._failovers_seen = len(fo)

    def _set_error(self, message: str) -> None:
        first = self.error is None
        self.error = message
        banner = self.query_one("#banner", Static)
        banner.add_class("-error")
        banner.update(f"⚠ {message} — retrying every {self.poll_interval:g}s; the last good data stays below")
        if first:
            self.notify(message, title="Cluster unreachable", severity="error", timeout=8)

    def apply(self, snap: Snapshot) -> None:
        """Render one snapshot on every screen (hidden panes too, so switching tabs never waits)."""
        self.snap = snap
        if self.error is not None:
            self.notify(f"connected to {snap.connected}", title="Reconnected", timeout=5)
        self.error = None
        self.sub_title = snap.connected
        counts = snap.counts
        banner = self.query_one("#banner", Static)
        banner.remove_class("-error")
        leader = ", ".join(sorted(snap.leaders.values())) or "none"
        banner.update(f"connected to {snap.connected} (node {snap.self_id}, region {snap.region}) · "
                      f"{counts.get('alive', 0)}/{len(snap.members)} alive · leader {leader}")
        self.history.add(snap)
        self._collect_garbage()
        # The visible screen is redrawn at once; the hidden ones catch up one at a time in the idle moments
        # after (see _catch_up), so a switch finds its screen current instead of diffing thousands of rows
        # between the key press and the frame, and no single step holds the event loop for long.
        self._stale = {tab for tab, _ in TABS}
        self._show(self.active_tab)
        self._schedule_catch_up()

    def _schedule_catch_up(self) -> None:
        if self._stale - {self.active_tab} and not self._catching_up:
            self._catching_up = True
            self.set_timer(CATCH_UP_DELAY, self._catch_up)

    def _catch_up(self) -> None:
        """Bring one hidden screen up to date with the latest snapshot, then schedule the next."""
        self._catching_up = False
        for tab, _ in TABS:
            if tab in self._stale and tab != self.active_tab:
                try:
                    self._show(tab)
                except NoMatches:  # the app is closing and its screens are gone
                    return
                break
        self._schedule_catch_up()

    def _collect_garbage(self) -> None:
        """Keep CPython's full collections off the key path.

        With 1,000 nodes and 5,000 instances the console holds millions of long-lived objects (rows, rendered
        strips); a full collection walks them all (~200 ms on a busy machine) at a moment of the collector's
        choosing, often in the middle of a key press. What survives a poll is frozen out of the collector's
        sight (plain data is still freed by reference counting); a real full collection runs right after a
        poll, at most every GC_FULL_EVERY seconds, so cyclic garbage is never kept for long.
        """
        now = time.monotonic()
        if now - self._gc_full_at >= GC_FULL_EVERY:
            self._gc_full_at = now
            gc.unfreeze()
            gc.collect()
        gc.freeze()

    def _show(self, tab: str) -> None:
        snap = self.snap
        if snap is None or tab not in self._stale:
            return
        self._stale.discard(tab)
        if tab == "cluster":
            self.query_one(ClusterPane).show(snap)
        elif tab == "instances":
            self.query_one(InstancesPane).show(snap)
        elif tab == "models":
            self.query_one(ModelsPane).show(snap, self.transfers)
        elif tab == "metrics":
            self.query_one(MetricsPane).show(snap, self.history)
        elif tab == "playground":
            self.query_one(PlaygroundPane).set_models([m.name for m in snap.models])

    # ---- navigation ---------------------------------------------------------------------------------
    def action_show_tab(self, tab: str) -> None:
        self.active_tab = tab
        self.query_one(TabBar).active = tab
        self.query_one(ContentSwitcher).current = f"{tab}-pane"
        self._show(tab)
        self._focus_tab(tab)

    def _focus_tab(self, tab: str) -> None:
        """Focus the screen's main widget now, not on a later message, so the switch is drawn in one frame.

        Widget.focus() defers to the next message and bindings follow after a refresh: the focus colours and the
        key bar would each cost another frame after the new screen is shown.
        """
        query = {"cluster": NodesTable, "instances": InstancesTable, "models": ModelsTable,
                 "metrics": MetricsTable, "events": "#events-table", "playground": "#prompt"}.get(tab)
        if query is not None:
            widget = self.query_one(query)
            screen, before = widget.screen, widget.screen.focused
            screen.set_focus(widget, scroll_visible=False)
            # the Focus/Blur events would restyle both widgets after the first frame; do it in this one
            if before is not None and before is not widget:
                before.has_focus = False
            widget.has_focus = True
            screen.refresh_bindings()

    def action_refresh(self) -> None:
        self._wake.set()

    @on(Input.Changed, "#events-filter")
    def _filter_events(self, event: Input.Changed) -> None:
        self.query_one(EventsPane).set_filter(event.value)

    # ---- actions --------------------------------------------------------------------------------
    def selected(self, kind: str) -> str | None:
        return self.query_one(TABLE_FOR[kind][1]).selected_key

    def action_act(self, action_id: str) -> None:
        """Key binding: act on the selected row of the table the action belongs to."""
        spec = ACTIONS[action_id]
        target = self.selected(spec.target) if spec.target else None
        if spec.target and target is None:
            self.notify(f"select a {spec.target} first", severity="warning")
            return
        self.act_on(action_id, target)

    def act_on(self, action_id: str, target: str | None) -> None:
        self._flow(ACTIONS[action_id], target)

    @on(LiveTable.RowSelected)
    def _row_menu(self, event: LiveTable.RowSelected) -> None:
        kind = {NodesTable: "node", ModelsTable: "model", InstancesTable: "instance"}.get(type(event.table))
        if kind is not None:
            key = event.key
            self.push_screen(RowActions(kind, key), lambda a: self.act_on(a, key) if a else None)

    async def _ask(self, title: str, fields: list[Field]) -> dict[str, str] | None:
        return await self.push_screen_wait(FormScreen(title, fields))

    @work(group="actions", exit_on_error=False)
    async def _flow(self, spec: ActionSpec, target: str | None) -> None:
        """Gather parameters, confirm what is destructive, call the source, report the outcome."""
        try:
            call = await self._prepare(spec, target)
            if call is None:
                return
            if spec.destructive and not await self.push_screen_wait(ConfirmScreen(self._question(spec, target))):
                self.notify(f"{spec.title} {target or ''}: cancelled", timeout=3)
                return
            await call()
        except ApiError as e:
            self.notify(str(e), title=f"{spec.title} {target or ''} failed".replace("  ", " "), severity="error",
                        timeout=10)
        except Exception as e:  # never let an action take the console down
            self.notify(f"{type(e).__name__}: {e}", title=f"{spec.title} failed", severity="error", timeout=10)
        else:
            self.notify(f"{spec.title.rstrip('…')} {target or ''}".strip() + ": done", timeout=4)
        finally:
            self._wake.set()

    def _question(self, spec: ActionSpec, target: str | None) -> str:
        extra = ""
        if spec.id == "remove" and self._member_status(target) in ("alive", "suspect"):
            extra = f"\nIt is still {self._member_status(target)}: it will be removed by force."
        return f"{spec.title} {target}?{extra}\n{spec.help[:1].upper()}{spec.help[1:]}."

    def _member_status(self, node: str | None) -> str:
        for m in self.snap.members if self.snap else ():
            if m.id == node:
                return m.status
        return "unknown"

    async def _prepare(self, spec: ActionSpec, t: str | None) -> Callable[[], Any] | None:
        """The call to make, after asking for whatever the action needs; None when the operator cancels."""
        src = self.source
        if spec.id in ("cordon", "uncordon", "drain"):
            return partial(src.node_action, t, spec.id)
        if spec.id == "remove":
            return partial(src.remove_node, t, self._member_status(t) in ("alive", "suspect"))
        if spec.id == "transfer_to":
            return partial(src.transfer_leader, t, None)
        if spec.id == "transfer":
            v = await self._ask("Transfer Raft leadership", [
                Field("to", "to node", placeholder="node id (empty: any other voter)"),
                Field("region", "region", self.snap.region if self.snap else "", "region")])
            return None if v is None else partial(src.transfer_leader, v["to"] or None, v["region"] or None)
        if spec.id == "scale":
            current = next((m.replicas for m in self.snap.models if m.name == t), None) if self.snap else None
            v = await self._ask(f"Scale {t}", [Field("replicas", "replicas", str(current or 1))])
            if v is None:
                return None
            try:
                n = int(v["replicas"])
                if n < 0:
                    raise ValueError
            except ValueError:
                raise ApiError(f"replicas must be a whole number ≥ 0, not {v['replicas']!r}") from None
            return partial(src.scale_model, t, n)
        if spec.id in ("load", "unload", "delete"):
            return partial({"load": src.load_model, "unload": src.unload_model, "delete": src.delete_model}[spec.id],
                           t)
        if spec.id == "copy":
            v = await self._ask(f"Copy {t}", [Field("destination", "new name", f"{t.split(':')[0]}-copy" if t else "")])
            return None if v is None or not v["destination"] else partial(src.copy_model, t, v["destination"])
        if spec.id == "pull":
            v = await self._ask("Pull a model", [Field("model", "model", placeholder="e.g. qwen2:0.5b")])
            return None if v is None or not v["model"] else partial(self._pull, v["model"])
        if spec.id == "add_instance":
            v = await self._ask("Add an external Ollama instance", [
                Field("url", "url", placeholder="http://host:11434")])
            return None if v is None or not v["url"] else partial(src.add_instance, v["url"])
        if spec.id == "remove_instance":
            url = next((i.url for i in self.snap.instances if i.id == t), t) if self.snap else t
            return partial(src.remove_instance, url)
        raise ApiError(f"unknown action {spec.id}")

    async def _pull(self, model: str) -> None:
        """Stream the pull's progress into the Models screen's transfer column."""
        self.transfers[model] = "starting"
        try:
            async for p in self.source.pull_model(model):
                total, done = p.get("total"), p.get("completed")
                status = str(p.get("status", ""))
                self.transfers[model] = f"{status} {done * 100 // total}%" if total and done is not None else status
                self._stale.add("models")
                self._show(self.active_tab)
        finally:
            self.transfers.pop(model, None)
            self._stale.add("models")
            self._show(self.active_tab)

    # ---- playground ---------------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def _send(self, event: Input.Submitted) -> None:
        model = self.query_one("#chat-model", Select).value
        text = event.value.strip()
        if not text:
            return
        if not isinstance(model, str):
            self.notify("choose a model first", severity="warning")
            return
        event.input.value = ""
        self.chat_log.append({"role": "user", "content": text})
        self.query_one(PlaygroundPane).add_message("you", text)
        self._chat(model)

    @work(group="chat", exclusive=True, exit_on_error=False)
    async def _chat(self, model: str) -> None:
        pane = self.query_one(PlaygroundPane)
        out = pane.add_message(model, "")
        reply = ""
        head = Text(f"{model}: ", style="bold green")
        try:
            async for chunk in self.source.chat(model, list(self.chat_log)):
                reply += (chunk.get("message") or {}).get("content", "")
                out.update(Text.assemble(head, reply))
                pane.query_one("#transcript").scroll_end(animate=False)
        except ApiError as e:
            out.update(Text.assemble(head, reply, Text(f" [error: {e}]", style="bold red")))
            self.notify(str(e), title="Chat failed", severity="error", timeout=8)
        except asyncio.CancelledError:
            out.update(Text.assemble(head, reply, Text(" [stopped]", style="dim")))
            raise
        except Exception as e:
            self.notify(f"{type(e).__name__}: {e}", title="Chat failed", severity="error", timeout=8)
        finally:
            if reply:
                self.chat_log.append({"role": "assistant", "content": reply})

    def action_stop_chat(self) -> None:
        self.workers.cancel_group(self, "chat")

    def action_clear_chat(self) -> None:
        self.chat_log.clear()
        self.query_one("#transcript").remove_children()

    async def on_unmount(self) -> None:
        gc.unfreeze()  # hand whatever this app kept back to the collector (tests run many apps in one process)
        await self.source.close()
