"""Reusable widgets: a table that applies updates as diffs, and the confirm/form dialogs actions use."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events, messages, on
from textual._time import get_time
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.geometry import Region, Size
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Button, Input, Label

Cell = str | Text


class _Missing:
    pass


_MISSING = _Missing()


class RowCells(Mapping[str, tuple[Text, ...]]):
    """Read-only view of a table's rendered cells by row key (rendered on demand: rows are rendered lazily)."""

    def __init__(self, table: LiveTable) -> None:
        self._table = table

    def __getitem__(self, key: str) -> tuple[Text, ...]:
        if key not in self._table._index:
            raise KeyError(key)
        return self._table._row_cells(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table._keys)

    def __len__(self) -> int:
        return len(self._table._keys)


class LiveTable(ScrollView, can_focus=True):
    """A virtual table for thousands of live rows: only the visible rows are ever drawn, from cached strips.

    Textual's DataTable re-renders every visible cell whenever the cursor moves or any cell changes, and
    re-sorts/re-measures on updates; with 5,000 rows that made key presses take hundreds of ms. Here a row
    is rendered to a Strip once per change of its value (lazily, when it is first shown) and a cursor move
    repaints two lines. Rows are fed whole each poll as (key, value) pairs and applied as a diff, so the
    cursor stays on its row and the scroll position is kept under the operator's hands.
    """

    COLUMNS: Sequence[tuple[str, str]] = ()
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Select", show=False),
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First row", show=False),
        Binding("end", "jump(-1)", "Last row", show=False),
        Binding("left", "scroll_left", "Scroll left", show=False),
        Binding("right", "scroll_right", "Scroll right", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {"livetable--header", "livetable--cursor", "livetable--even-row"}
    DEFAULT_CSS = """
    LiveTable {
        background: $surface;
        color: $foreground;
        height: 1fr;
        &:focus {
            background-tint: $foreground 5%;
            & > .livetable--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .livetable--header { background-tint: $foreground 5%; }
        }
        &:dark > .livetable--even-row { background: $surface-darken-1 40%; }
        & > .livetable--header { text-style: bold; background: $panel; color: $foreground; }
        &:ansi > .livetable--header { background: ansi_bright_blue; color: ansi_default; }
        & > .livetable--even-row { background: $surface-lighten-1 50%; }
        & > .livetable--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """
    CACHE_ROWS = 4096  # rendered row strips kept; a page is ~50

    class RowSelected(Message):
        """Enter or a click on a row."""

        def __init__(self, table: LiveTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> LiveTable:
            return self.table

    def __init__(self, *, zebra_stripes: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.zebra_stripes = zebra_stripes
        self._keys: list[str] = []
        self._index: dict[str, int] = {}
        self._values: dict[str, Any] = {}
        self._cells: dict[str, tuple[Text, ...]] = {}  # rendered cells; rows whose value changed are dropped
        self._render: Callable[[Any], tuple[Cell, ...]] = lambda v: tuple(v)
        self._labels = tuple(Text(label) for _, label in self.COLUMNS)
        self._widths = [cell_len(t.plain) for t in self._labels]
        self._strips: dict[tuple[str, bool, bool], Strip] = {}  # (key, even, cursor) -> full-width row, this look
        self._base_style = Style()
        self._view_width = 0
        # one strip cache per look (focused or not, theme): switching screens moves focus, and re-rendering
        # every visible row on each focus change would cost as much as the DataTable this replaces
        self._looks: dict[tuple[Style, ...], tuple[dict[tuple[str, bool, bool], Strip], list[Strip | None]]] = {}
        self._header_box: list[Strip | None] = [None]
        self._look: tuple[Style, ...] | None = None
        self.cursor_row = 0

    # ---- data -----------------------------------------------------------------------------------------
    @property
    def row_count(self) -> int:
        return len(self._keys)

    @property
    def cells(self) -> RowCells:
        return RowCells(self)

    @property
    def selected_key(self) -> str | None:
        return self._keys[self.cursor_row] if 0 <= self.cursor_row < len(self._keys) else None

    def get_row_index(self, key: str) -> int:
        return self._index[key]

    def sync(self, items: Sequence[tuple[str, Hashable]], render: Callable[[Any], tuple[Cell, ...]]) -> None:
        """Show `items` (key, value) in this order; only rows whose value changed are rendered again."""
        self._render = render
        selected = self.selected_key
        keys = [k for k, _ in items]
        reordered = keys != self._keys
        if reordered:
            for gone in self._index.keys() - set(keys):
                self._forget(gone)
            self._keys = keys
            self._index = {k: i for i, k in enumerate(keys)}
            self._clear_strips()  # zebra parity follows the position
        widened = False
        top = round(self.scroll_y)
        bottom = top + self._page  # once per sync: the region it comes from is costly to compute per row
        for key, value in items:
            old = self._values.get(key, _MISSING)
            if old is value or old == value:
                continue  # unchanged: most rows of a big cluster on most polls
            self._values[key] = value
            self._drop_row(key)
            if old is _MISSING:  # new rows are measured at once so the columns fit them
                widened |= self._measure(self._row_cells(key))
            elif not reordered and top <= (row := self._index[key]) < bottom:
                self.refresh_line(row + 1)
        if widened:
            self._resized()
        if reordered:
            self.virtual_size = Size(self._total_width(), len(self._keys) + 1)
            row = self._index.get(selected, self.cursor_row) if selected is not None else self.cursor_row
            self.cursor_row = max(0, min(row, len(self._keys) - 1))
            self.refresh()

    def clear(self) -> None:
        self.sync([], self._render)

    def _forget(self, key: str) -> None:
        self._values.pop(key, None)
        self._drop_row(key)

    def _drop_row(self, key: str) -> None:
        self._cells.pop(key, None)
        for strips, _ in self._looks.values():
            for even in (True, False):
                for cursor in (True, False):
                    strips.pop((key, even, cursor), None)

    def _clear_strips(self) -> None:
        for strips, header in self._looks.values():
            strips.clear()
            header[0] = None

    def _row_cells(self, key: str) -> tuple[Text, ...]:
        cells = self._cells.get(key)
        if cells is None:
            # Text, never markup: a node's name or error text must not be able to inject styling
            cells = tuple(c if isinstance(c, Text) else Text(c) for c in self._render(self._values[key]))
            self._cells[key] = cells
        return cells

    def _measure(self, cells: tuple[Text, ...]) -> bool:
        """Widen columns to fit `cells`; columns never narrow, so the layout does not jump while data moves."""
        widened = False
        for i, c in enumerate(cells[: len(self._widths)]):
            w = cell_len(c.plain)
            if w > self._widths[i]:
                self._widths[i] = w
                widened = True
        return widened

    def _total_width(self) -> int:
        return sum(w + 2 for w in self._widths)

    def _resized(self) -> None:
        self._clear_strips()
        self.virtual_size = Size(self._total_width(), len(self._keys) + 1)
        self.refresh()

    # ---- cursor and keys ------------------------------------------------------------------------------
    @property
    def _page(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def move_cursor(self, row: int, scroll: bool = True) -> None:
        if not self._keys:
            self.cursor_row = 0
            return
        row = max(0, min(row, len(self._keys) - 1))
        if row != self.cursor_row:
            self.refresh_line(self.cursor_row + 1)
            self.refresh_line(row + 1)
            self.cursor_row = row
        if scroll:
            top = round(self.scroll_y)
            if row < top:
                self.scroll_to(y=row, animate=False, immediate=True)
            elif row >= top + self._page:
                self.scroll_to(y=row - self._page + 1, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        page = self._page
        self.scroll_to(y=round(self.scroll_y) + direction * page, animate=False, immediate=True)
        self.move_cursor(self.cursor_row + direction * page)

    def action_jump(self, row: int) -> None:
        self.move_cursor(row if row >= 0 else len(self._keys) - 1)

    def action_select_cursor(self) -> None:
        key = self.selected_key
        if key is not None:
            self.post_message(self.RowSelected(self, key))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1:
            return
        row = round(self.scroll_y) + offset.y - 1
        if row < len(self._keys):
            self.move_cursor(row)
            self.action_select_cursor()

    def _on_focus(self, event: events.Focus) -> None:
        """Skip the default repaint when the console already drew this table focused (it sets has_focus itself
        on a switch, so the first frame is the right one); the default handler's refresh would cost a second
        frame one screen update later. A stale Focus (focus already moved on, see _on_blur) is ignored too."""
        if self.screen.focused is not self or self.has_focus:
            event.prevent_default()
            if self.screen.focused is self and self.parent is not None:
                self.parent.post_message(events.DescendantFocus(self))

    def _on_blur(self, event: events.Blur) -> None:
        """Ignore a Blur that arrives after focus came back or after the console already blurred the table.

        A hidden pane's table gets its Blur late; applied then, it would restyle a focused table as blurred
        and back again, two extra frames after the new screen was drawn.
        """
        if self.screen.focused is self or not self.has_focus:
            event.prevent_default()
            if self.screen.focused is not self and self.parent is not None:
                self.parent.post_message(events.DescendantBlur(self))

    def _size_updated(self, size: Size, virtual_size: Size, container_size: Size, layout: bool = True) -> bool:
        """Compare against our own virtual size (set from the rows), not the compositor's.

        ScrollView compares the compositor's virtual size (always the viewport) with the table's (the rows), so
        every layout pass counts as a resize and repaints the scrollbars: one more frame after each switch.
        """
        return super()._size_updated(size, self.virtual_size, container_size, layout)

    # ---- drawing --------------------------------------------------------------------------------------
    def notify_style_update(self) -> None:
        """Theme, focus and CSS changes restyle the rows: pick (or start) the strip cache for the new look."""
        super().notify_style_update()
        self._look = None

    def on_resize(self) -> None:
        # a table shown again after a switch of screen gets a Resize of the same size: keep its strips then
        width = self.scrollable_content_region.width
        if width != self._view_width:
            self._view_width = width
            self._resized()  # rows are padded to the view's width

    def _line(self, cells: Sequence[Text], style: Style, over: Style | None = None) -> Strip:
        """One row: cells padded to their column widths, then to the view's width; `over` wins over cell colours."""
        segments: list[Segment] = []
        for text, width in zip(cells, self._widths, strict=False):
            pad = " " * (width - cell_len(text.plain) + 1)
            if not text.spans:
                cell_style = style + Style.parse(str(text.style)) if text.style else style
                segments.append(Segment(f" {text.plain}{pad}", cell_style))
            else:  # mixed styles in one cell: let Rich split it
                segments.append(Segment(" ", style))
                segments.extend(Segment(s.text, style + s.style if s.style else style)
                                for s in text.render(self.app.console) if s.text != "\n")
                segments.append(Segment(pad, style))
        total = self._total_width()
        if self._view_width > total:
            segments.append(Segment(" " * (self._view_width - total), style))
        if over is not None:
            segments = list(Segment.apply_style(segments, post_style=over))
        return Strip(segments, max(total, self._view_width))

    def _select_look(self) -> None:
        """Per frame: the styles every line uses, and the strip cache that goes with them."""
        base = self.rich_style
        self._base_style = base
        self._view_width = self.scrollable_content_region.width
        if self._look is None:
            look = (base, *(self.get_component_rich_style(f"livetable--{n}") for n in ("header", "even-row", "cursor")))
            if look not in self._looks:
                if len(self._looks) >= 4:
                    self._looks.clear()
                self._looks[look] = ({}, [None])
            self._strips, self._header_box = self._looks[look]
            self._look = look

    def render_lines(self, crop: Region) -> list[Strip]:
        self._select_look()
        return super().render_lines(crop)

    def _row_strip(self, row: int) -> Strip:
        key = self._keys[row]
        even, cursor = self.zebra_stripes and row % 2 == 0, row == self.cursor_row
        cached = self._strips.get((key, even, cursor))
        if cached is None:
            assert self._look is not None
            base, _header, even_style, cursor_style = self._look
            style = base + even_style if even else base
            cells = self._row_cells(key)
            if self._measure(cells):
                self.call_later(self._resized)
            # the cursor's colours win over the cells' own, as in DataTable
            cached = self._line(cells, style, cursor_style if cursor else None)
            if len(self._strips) >= self.CACHE_ROWS:
                self._strips.clear()
            self._strips[(key, even, cursor)] = cached
        return cached

    def render_line(self, y: int) -> Strip:
        if self._look is None:
            self._select_look()
        assert self._look is not None
        scroll_x, scroll_y = self.scroll_offset
        width, base = self._view_width, self._base_style
        if y == 0:
            strip = self._header_box[0]
            if strip is None:
                strip = self._header_box[0] = self._line(self._labels, base + self._look[1])
        else:
            row = scroll_y + y - 1
            if row >= len(self._keys):
                return Strip.blank(width, base)
            strip = self._row_strip(row)
        return strip.crop_extend(scroll_x, scroll_x + width, base)


class ChartGrid(Widget):
    """Live charts in a grid: each a rounded box with a title line and a block sparkline, newest value right.

    One widget drawing every chart from cached strips: the six charts of the Metrics screen were eighteen
    widgets (box, label, Textual Sparkline), and a switch to the screen spent more time styling and painting
    them than everything else on it; here a chart's lines are built once per change of data, size or theme.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"chartgrid--box", "chartgrid--title", "chartgrid--bars"}
    DEFAULT_CSS = """
    ChartGrid {
        height: 14;
        & > .chartgrid--box { color: $primary; }
        & > .chartgrid--title { text-style: bold; }
        & > .chartgrid--bars { color: $primary; }
    }
    """
    LEVELS = " ▁▂▃▄▅▆▇█"
    BAR_ROWS = 4  # chart height is this plus the title line and the box

    def __init__(self, columns: int = 3, **kw: Any) -> None:
        super().__init__(**kw)
        self.columns = columns
        self._charts: tuple[tuple[str, tuple[float, ...]], ...] = ()
        self._lines: tuple[tuple[Any, ...], list[Strip]] | None = None  # (key, lines)

    @property
    def charts(self) -> tuple[tuple[str, tuple[float, ...]], ...]:
        return self._charts

    def set_charts(self, charts: Sequence[tuple[str, Sequence[float]]]) -> None:
        """(title, values) per chart, in reading order; repaints only when something changed."""
        new = tuple((title, tuple(values)) for title, values in charts)
        if new != self._charts:
            self._charts = new
            self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._lines = None  # theme or CSS changed

    def _bars(self, values: tuple[float, ...], width: int) -> list[str]:
        shown = values[-width:] if width > 0 else ()
        top = max(shown, default=0.0) or 1.0
        levels = [max(0, round(v / top * self.BAR_ROWS * 8)) for v in shown]
        pad = " " * (width - len(shown))
        return [pad + "".join(self.LEVELS[min(8, max(0, lv - (self.BAR_ROWS - 1 - y) * 8))] for lv in levels)
                for y in range(self.BAR_ROWS)]

    def _build(self, width: int, height: int) -> list[Strip]:
        base = self.rich_style
        box = base + self.get_component_rich_style("chartgrid--box")
        title_style = base + self.get_component_rich_style("chartgrid--title")
        bars_style = base + self.get_component_rich_style("chartgrid--bars")
        cols = max(1, self.columns)
        gap = 1
        widths = [(width - gap * (cols - 1)) // cols + (1 if i < (width - gap * (cols - 1)) % cols else 0)
                  for i in range(cols)]
        chart_h = self.BAR_ROWS + 3
        lines: list[list[Segment]] = [[] for _ in range(height)]
        for n, (title, values) in enumerate(self._charts):
            row, col = divmod(n, cols)
            y0 = row * chart_h
            w = widths[col]
            if y0 + chart_h > height or w < 4:
                continue
            inner = w - 4  # box and one cell of padding each side
            body = [(title[:inner].ljust(inner), title_style)] + [(b, bars_style) for b in self._bars(values, inner)]
            out = [[Segment("╭" + "─" * (w - 2) + "╮", box)]]
            out += [[Segment("│ ", box), Segment(text, style), Segment(" │", box)] for text, style in body]
            out.append([Segment("╰" + "─" * (w - 2) + "╯", box)])
            x = sum(widths[:col]) + gap * col
            for dy, segs in enumerate(out):
                line = lines[y0 + dy]
                used = sum(seg.cell_length for seg in line)
                if used < x:
                    line.append(Segment(" " * (x - used), base))
                line.extend(segs)
        return [Strip(segs, sum(seg.cell_length for seg in segs)).extend_cell_length(width, base)
                for segs in lines]

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        key = (self._charts, width, height)
        if self._lines is None or self._lines[0] != key:
            self._lines = (key, self._build(width, height))
        lines = self._lines[1]
        return lines[y] if 0 <= y < len(lines) else Strip.blank(width, self.rich_style)


class OneFrameScreen(Screen[None]):
    """The console's main screen: after a full repaint, repaints requested before it are not drawn again.

    A switch of screen repaints everything in one frame, but the widgets whose refresh led to it report
    that refresh to the screen from their own message queues, often only after the frame was drawn;
    Textual then draws them once more on the next update tick, a redundant second frame that arrives
    30-60 ms after the first on a busy machine. What was requested before a full repaint is in it, so
    those late reports are dropped here. Builds on Textual's screen update internals: textual is pinned
    below 9 in pyproject, and test_console_app.py's one-frame test guards the behaviour.
    """

    _painted_at = float("-inf")
    _paint_deferred = False

    def _on_timer_update(self) -> None:
        full = self._repaint_required and self.is_current and not self.app._batch_count
        started = get_time()
        # a layout followed by a full repaint in the same tick: paint once, after both
        self._paint_deferred = full
        try:
            super()._on_timer_update()
        finally:
            self._paint_deferred = False
        if full:
            self._painted_at = started
            for widget in self._compositor.visible_widgets:
                widget._repaint_required = False  # drawn just now, with whatever it changed before

    def _compositor_refresh(self) -> None:
        if not self._paint_deferred or not self._repaint_required:
            super()._compositor_refresh()

    async def _on_update(self, message: messages.Update) -> None:
        if message.time < self._painted_at:
            message.stop()
            message.prevent_default()  # Screen._on_update would queue a repaint of what is already drawn


class TabBar(Widget):
    """One line of screen names, the active one highlighted; a click switches screen (`app.show_tab`).

    Stands in for TabbedContent's tab strip, which is a dozen widgets with an underline that moves in a
    second frame after every switch; this is one widget drawn in the same frame as the new screen.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"tabbar--tab", "tabbar--active", "tabbar--key"}
    DEFAULT_CSS = """
    TabBar {
        height: 1;
        background: $panel;
        & > .tabbar--tab { color: $foreground-muted; }
        & > .tabbar--key { color: $foreground-muted; text-style: dim; }
        & > .tabbar--active { color: $block-cursor-foreground; background: $block-cursor-background; text-style: bold; }
    }
    """

    def __init__(self, tabs: Sequence[tuple[str, str]], active: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.tabs = tuple(tabs)
        self._active = active

    @property
    def active(self) -> str:
        return self._active

    @property
    def link_style(self) -> Style:
        """Clickable, but drawn in the bar's own colours rather than underlined like a link."""
        return Style()

    @active.setter
    def active(self, tab: str) -> None:
        if tab != self._active:
            self._active = tab
            self.refresh()

    def render(self) -> Text:
        parts: list[tuple[str, Style]] = []
        for n, (tab, title) in enumerate(self.tabs, 1):
            click = Style.from_meta({"@click": f"app.show_tab({tab!r})"})
            name = "tabbar--active" if tab == self._active else "tabbar--tab"
            parts.append((f" {n}", self.get_component_rich_style("tabbar--key") + click))
            parts.append((f" {title} ", self.get_component_rich_style(name) + click))
        return Text.assemble(*parts, no_wrap=True, overflow="crop")


class KeyBar(Widget):
    """The key bindings of the focused widget, in one line: Textual's Footer, without its cost.

    Footer re-mounts one widget per key on every focus change (each switch of screen): ~15 mounts with CSS
    matching, a relayout and a second frame, which made switching screens take hundreds of ms with a big
    table. This renders the same keys as one line of text and repaints only when the set of keys changes.
    A click on a key presses it, as in Footer.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"keybar--key", "keybar--description"}
    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        color: $footer-foreground;
        background: $footer-background;
        & > .keybar--key { color: $footer-key-foreground; background: $footer-key-background; text-style: bold; }
        & > .keybar--description {
            color: $footer-description-foreground; background: $footer-description-background;
        }
    }
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._keys: tuple[tuple[str, str, str, bool], ...] = ()
        self._palette: tuple[str, str, str, bool] | None = None

    @property
    def link_style(self) -> Style:
        """Clickable, but drawn in the bar's own colours rather than underlined like a link."""
        return Style()

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen: Screen[Any]) -> None:
        if not self.is_attached or screen is not self.screen:
            return
        seen: set[str] = set()
        keys: list[tuple[str, str, str, bool]] = []
        palette = None
        for _node, binding, enabled, _tooltip in screen.active_bindings.values():
            if binding.key == self.app.COMMAND_PALETTE_BINDING and self.app.ENABLE_COMMAND_PALETTE:
                palette = (binding.key, self.app.get_key_display(binding), binding.description, enabled)
            elif binding.show and binding.action not in seen:  # one entry per action, as Footer shows
                seen.add(binding.action)
                keys.append((binding.key, self.app.get_key_display(binding), binding.description, enabled))
        if (tuple(keys), palette) != (self._keys, self._palette):
            self._keys, self._palette = tuple(keys), palette
            self.refresh()

    def _entry(self, key: str, display: str, description: str, enabled: bool) -> Text:
        click = Style.from_meta({"@click": f"app.simulate_key({key!r})"})
        dim = Style(dim=not enabled)
        return Text.assemble((f" {display} ", self.get_component_rich_style("keybar--key") + dim + click),
                             (f"{description} ", self.get_component_rich_style("keybar--description") + dim + click))

    def render(self) -> Text:
        line = Text.assemble(*(self._entry(*k) for k in self._keys), no_wrap=True, overflow="crop")
        if self._palette is not None:
            right = self._entry(*self._palette)
            gap = self.size.width - line.cell_len - right.cell_len
            if gap > 0:
                line.append(" " * gap)
                line.append_text(right)
        return line


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    value: str = ""
    placeholder: str = ""


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no for a destructive action; `y`/`n`/escape from the keyboard, buttons for the mouse."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 64; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    ConfirmScreen Label { width: 100%; margin-bottom: 1; }
    ConfirmScreen Horizontal { height: auto; align: right middle; }
    ConfirmScreen Button { margin-left: 2; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, id="question")
            with Horizontal():
                yield Button("No", id="no")
                yield Button("Yes", id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class FormScreen(ModalScreen[dict[str, str] | None]):
    """A few text fields for an action's parameters; enter submits, escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    FormScreen { align: center middle; }
    FormScreen > Grid { grid-size: 2; grid-columns: 16 1fr; grid-rows: auto; grid-gutter: 1;
                        width: 72; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    FormScreen #title { column-span: 2; text-style: bold; }
    FormScreen Label { padding-top: 1; }
    FormScreen Horizontal { column-span: 2; height: auto; align: right middle; }
    FormScreen Button { margin-left: 2; }
    """

    def __init__(self, title: str, fields: Sequence[Field]) -> None:
        super().__init__()
        self.title_text = title
        self.fields = list(fields)

    def compose(self) -> ComposeResult:
        with Grid():
            yield Label(self.title_text, id="title")
            for f in self.fields:
                yield Label(f.label)
                yield Input(value=f.value, placeholder=f.placeholder, id=f"field-{f.name}")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("OK", id="ok", variant="primary")

    def _values(self) -> dict[str, str]:
        return {f.name: self.query_one(f"#field-{f.name}", Input).value.strip() for f in self.fields}

    @on(Input.Submitted)
    def submitted(self) -> None:
        self.dismiss(self._values())

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self._values() if event.button.id == "ok" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)
