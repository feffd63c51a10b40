"""The six screens, as tab panes: each renders a `Snapshot` (or the event log) and nothing else."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Label, Select, Static

from omx.console.tui.actions import for_target
from omx.console.tui.data import EventRow, Instance, Member, MetricPoint, ModelInfo, Snapshot
from omx.console.tui.widgets import ChartGrid, LiveTable

STATUS_STYLE = {"alive": "bold green", "healthy": "bold green", "suspect": "bold yellow", "dead": "bold red",
                "left": "dim", "unhealthy": "bold red", "draining": "yellow", "cordoned": "yellow",
                "open": "bold red", "half_open": "yellow", "closed": "green"}
BLOCKS = " ▁▂▃▄▅▆▇█"


def styled(value: str) -> Text:
    return Text(value, style=STATUS_STYLE.get(value, ""))


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def fmt(v: float | None, unit: str = "", digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def spark(values: Iterable[float]) -> str:
    vals = list(values)[-24:]
    if not vals:
        return ""
    top = max(vals) or 1.0
    return "".join(BLOCKS[min(8, round(v / top * 8))] for v in vals)


def target_bindings(kind: str) -> list[Binding]:
    return [Binding(a.key, f"app.act('{a.id}')", a.label, tooltip=a.help) for a in for_target(kind)]


# ---- Cluster ----------------------------------------------------------------------------------------

class NodesTable(LiveTable):
    COLUMNS = (("id", "node"), ("leader", "★"), ("status", "membership"), ("region", "region"), ("role", "role"),
               ("raft", "raft"), ("sched", "scheduling"), ("addr", "api address"), ("load", "load"),
               ("models", "loaded models"), ("mem", "memory/gpu"))
    BINDINGS = target_bindings("node")


def node_cells(item: tuple[Member, bool]) -> tuple[str | Text, ...]:
    m, is_leader = item
    leader = Text("★ leader", style="bold magenta") if is_leader else ""
    raft = f"{m.raft_state} t{m.raft_term}" if m.raft_state else "–"
    sched = "schedulable" if m.sched == "schedulable" else Text(m.sched, style="yellow")
    you = " (connected)" if m.is_self else ""
    return (m.id, leader, styled(m.status), m.region, m.role, raft, sched, m.api_addr + you,
            f"{m.inflight}/{m.slots}" if m.slots else str(m.inflight), ", ".join(m.models) or "–", m.memory or "–")


class ClusterPane(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="cluster-summary", classes="summary")
        yield NodesTable(id="nodes-table")

    def show(self, snap: Snapshot) -> None:
        counts = snap.counts
        parts = [Text(f" {len(snap.members)} members ", style="bold")]
        for state in ("alive", "suspect", "dead", "left"):
            parts.append(Text(f" {state} {counts.get(state, 0)} ", style=STATUS_STYLE[state]))
        leaders = ", ".join(f"{r}: {lid}" for r, lid in sorted(snap.leaders.items())) or "none"
        parts.append(Text(f"  Raft leader {leaders}", style="magenta"))
        self.query_one("#cluster-summary", Static).update(Text.assemble(*parts))
        self.query_one(NodesTable).sync([(m.id, (m, snap.is_leader(m))) for m in snap.members], node_cells)


# ---- Instances --------------------------------------------------------------------------------------

class InstancesTable(LiveTable):
    COLUMNS = (("id", "instance"), ("kind", "kind"), ("node", "node"), ("status", "health"), ("circuit", "circuit"),
               ("models", "models (loaded)"), ("slots", "slots"), ("queue", "queue"), ("latency", "latency"),
               ("tps", "tokens/s"), ("url", "url"))
    BINDINGS = target_bindings("instance")


def instance_cells(i: Instance) -> tuple[str | Text, ...]:
    models = ", ".join(f"{m}*" if m in i.loaded else m for m in i.models) or "–"
    return (i.id, i.kind, i.node or "–", styled(i.status), styled(i.circuit), models, f"{i.inflight}/{i.slots}",
            str(i.queue), fmt(i.latency_ms, " ms", 0), fmt(i.tokens_per_s), i.url)


class InstancesPane(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="instances-summary", classes="summary")
        yield InstancesTable(id="instances-table")

    def show(self, snap: Snapshot) -> None:
        healthy = sum(1 for i in snap.instances if i.status == "healthy")
        ext = sum(1 for i in snap.instances if i.kind == "external")
        note = "  (derived from membership: this node has no proxy API yet)" if snap.instances_derived else ""
        self.query_one("#instances-summary", Static).update(Text.assemble(
            Text(f" {len(snap.instances)} instances ", style="bold"), Text(f" healthy {healthy} ", style="green"),
            Text(f" unhealthy {len(snap.instances) - healthy} ", style="red" if healthy < len(snap.instances)
                 else ""), f" external {ext}", Text(note, style="dim")))
        self.query_one(InstancesTable).sync([(i.id, i) for i in snap.instances], instance_cells)


# ---- Models -----------------------------------------------------------------------------------------

class ModelsTable(LiveTable):
    COLUMNS = (("name", "model"), ("size", "size"), ("digest", "digest"), ("replicas", "replicas (actual/desired)"),
               ("nodes", "placed on"), ("transfer", "transfer"))
    BINDINGS = target_bindings("model")


def model_cells(item: tuple[ModelInfo, str]) -> tuple[str | Text, ...]:
    m, transfer = item
    if not m.digest and not m.size and m.replicas is None:  # only known from a pull in progress
        return (m.name, "–", "–", "–", "–", transfer)
    desired = "–" if m.replicas is None else str(m.replicas)
    rep: str | Text = f"{m.actual}/{desired}"
    if m.replicas is not None and m.actual < m.replicas:
        rep = Text(rep, style="yellow")
    return (m.name, human_size(m.size), m.digest.removeprefix("sha256:")[:12], rep, ", ".join(m.nodes) or "–",
            transfer)


def model_items(snap: Snapshot, transfers: dict[str, str]) -> list[tuple[str, tuple[ModelInfo, str]]]:
    """Rows with their transfer column: this console's own pull first, then the cluster's fetches."""
    items = [(m.name, (m, ", ".join(t for t in (transfers.get(m.name, ""), m.transfer_text) if t)))
             for m in snap.models]
    known = {m.name for m in snap.models}
    items += [(n, (ModelInfo(n), t)) for n, t in transfers.items() if n not in known]  # a pull not yet listed
    return items


class ModelsPane(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="models-summary", classes="summary")
        yield ModelsTable(id="models-table")

    def show(self, snap: Snapshot, transfers: dict[str, str]) -> None:
        under = sum(1 for m in snap.models if m.replicas is not None and m.actual < m.replicas)
        moving = len(transfers) + sum(len(m.transfers) for m in snap.models)
        note = "  (no scheduler API on this node: desired replicas unknown)" if "/api/v1/models" in snap.missing \
            else ""
        self.query_one("#models-summary", Static).update(Text.assemble(
            Text(f" {len(snap.models)} models ", style="bold"),
            Text(f" under-replicated {under} ", style="yellow" if under else ""),
            f" transfers {moving}", Text(note, style="dim")))
        self.query_one(ModelsTable).sync(model_items(snap, transfers), model_cells)


# ---- Metrics ----------------------------------------------------------------------------------------

SERIES_TITLES = {"requests_per_s": "requests/s", "p50_ms": "latency p50 ms", "p99_ms": "latency p99 ms",
                 "ttft_p50_ms": "TTFT p50 ms", "ttft_p99_ms": "TTFT p99 ms", "tokens_per_s": "tokens/s"}
HISTORY = 120


class MetricsHistory:
    """Ring buffers of the cluster-wide series and of each node's requests/s."""

    def __init__(self) -> None:
        self.cluster: dict[str, deque[float]] = {s: deque(maxlen=HISTORY) for s in MetricPoint.SERIES}
        self.per_node: dict[str, deque[float]] = {}

    def add(self, snap: Snapshot) -> None:
        if snap.metrics is None:
            return
        for s in MetricPoint.SERIES:
            v = getattr(snap.metrics.cluster, s)
            self.cluster[s].append(v or 0.0)
        for nid, p in snap.metrics.per_node.items():
            self.per_node.setdefault(nid, deque(maxlen=HISTORY)).append(p.requests_per_s or 0.0)


def metric_cells(item: tuple[str, MetricPoint, str]) -> tuple[str | Text, ...]:
    nid, p, trend = item
    return (nid, fmt(p.requests_per_s, "", 2), fmt(p.p50_ms, " ms", 0), fmt(p.p99_ms, " ms", 0),
            fmt(p.ttft_p50_ms, " ms", 0), fmt(p.tokens_per_s), trend)


class MetricsTable(LiveTable):
    COLUMNS = (("id", "node / instance"), ("rps", "req/s"), ("p50", "p50"), ("p99", "p99"), ("ttft", "TTFT p50"),
               ("tps", "tokens/s"), ("trend", "req/s trend"))


class MetricsPane(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="metrics-summary", classes="summary")
        yield ChartGrid(id="charts")
        yield MetricsTable(id="metrics-nodes")

    def show(self, snap: Snapshot, hist: MetricsHistory) -> None:
        src = snap.metrics.source if snap.metrics else ""
        what = {"proxy": "proxy metrics API", "prometheus": "members' /metrics"}.get(src, "no metrics source")
        self.query_one("#metrics-summary", Static).update(Text(f" cluster-wide and per node, from {what}",
                                                               style="bold"))
        cur = snap.metrics.cluster if snap.metrics else MetricPoint()
        self.query_one(ChartGrid).set_charts([(f"{title}: {fmt(getattr(cur, s))}", hist.cluster[s])
                                              for s, title in SERIES_TITLES.items()])
        items = []
        if snap.metrics:
            items = [(nid, (nid, p, spark(hist.per_node.get(nid, ()))))
                     for nid, p in sorted(snap.metrics.per_node.items())]
        self.query_one(MetricsTable).sync(items, metric_cells)


# ---- Events -----------------------------------------------------------------------------------------

EVENT_STYLE = {"member.dead": "bold red", "member.suspect": "yellow", "member.joined": "green",
               "member.alive": "green", "member.left": "dim", "raft.leader": "bold magenta",
               "raft.voter_down": "bold red", "raft.dead_voter_replaced": "bold yellow", "console.": "bold cyan",
               "router.circuit_open": "bold red", "router.": "blue", "scheduler.load_failed": "bold red",
               "scheduler.": "cyan"}
MAX_EVENTS = 2000


def event_style(kind: str) -> str:
    return next((v for k, v in EVENT_STYLE.items() if kind.startswith(k)), "")


class EventsTable(LiveTable):
    COLUMNS = (("time", "time"), ("kind", "kind"), ("details", "details"), ("via", "via"))


def event_cells(e: EventRow) -> tuple[Text, ...]:
    stamp = time.strftime("%H:%M:%S", time.gmtime(e.ts))
    return (Text(stamp), Text(e.kind, style=event_style(e.kind)), Text(e.summary), Text(e.origin))


class EventsPane(Vertical):
    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.rows: deque[EventRow] = deque(maxlen=MAX_EVENTS)
        self.filter = ""

    def compose(self) -> ComposeResult:
        with Horizontal(id="events-bar"):
            yield Input(placeholder="filter: kind prefix or any text (e.g. member.dead, raft, node-2)",
                        id="events-filter")
            yield Static(id="events-status")
        yield EventsTable(id="events-table")

    def matches(self, e: EventRow) -> bool:
        f = self.filter.lower()
        return not f or any(part in e.kind.lower() or part in e.summary.lower() for part in f.split())

    def _show(self, follow: bool) -> None:
        """Show the matching events; the cursor follows new events while it sits on the last one."""
        t = self.query_one(EventsTable)
        # id(): the deque keeps each event alive, so ids are unique among the rows shown
        t.sync([(str(id(e)), e) for e in self.rows if self.matches(e)], event_cells)
        if follow and t.row_count:
            t.move_cursor(row=t.row_count - 1)

    def add(self, events: list[EventRow]) -> None:
        t = self.query_one(EventsTable)
        at_end = t.cursor_row >= t.row_count - 1
        self.rows.extend(events)
        self._show(at_end)

    def set_filter(self, text: str) -> None:
        self.filter = text.strip()
        self._show(True)

    def set_status(self, live: bool, detail: str) -> None:
        self.query_one("#events-status", Static).update(
            Text(f" ● live {detail}", style="green") if live else Text(f" ○ polling: {detail}", style="yellow"))


# ---- Playground -------------------------------------------------------------------------------------

class PlaygroundPane(Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.stop_chat", "Stop"), Binding("ctrl+l", "app.clear_chat", "Clear")]

    def compose(self) -> ComposeResult:
        with Horizontal(id="playground-bar"):
            yield Label("model ", id="model-label")
            yield Select[str]([], id="chat-model", prompt="choose a model", allow_blank=True)
        yield VerticalScroll(id="transcript")
        yield Input(placeholder="message (enter sends, escape stops, ctrl+l clears)", id="prompt")

    def set_models(self, names: list[str]) -> None:
        sel = self.query_one("#chat-model", Select)
        current = sel.value
        if getattr(self, "_names", None) != names:
            self._names = names
            sel.set_options([(n, n) for n in names])
            if current in names:
                sel.value = current
            elif names and sel.is_blank():
                sel.value = names[0]

    def add_message(self, role: str, text: str) -> Static:
        w = Static(Text.assemble(Text(f"{role}: ", style="bold cyan" if role == "you" else "bold green"), text),
                   classes="msg user" if role == "you" else "msg assistant")
        self.query_one("#transcript", VerticalScroll).mount(w)
        return w
