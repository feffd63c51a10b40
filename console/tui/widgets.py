"""Reusable widgets: a table that applies updates as diffs, and the confirm/form dialogs actions use."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label
from textual.widgets.data_table import ColumnKey

Cell = str | Text


class LiveTable(DataTable):
    """A DataTable fed whole row sets each poll, applied as a diff so 5,000 rows stay cheap to refresh.

    Rebuilding would reset the cursor and scroll position under the operator's hands; a diff keeps both.
    """

    COLUMNS: Sequence[tuple[str, str]] = ()

    def __init__(self, **kw: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)  # type: ignore[arg-type]
        self._cells: dict[str, tuple[Cell, ...]] = {}
        self._values: dict[str, Hashable] = {}

    def on_mount(self) -> None:
        for key, label in self.COLUMNS:
            self.add_column(label, key=key)

    @property
    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # the cursor may sit past a row that was just removed
            return None
        return str(key) if key is not None else None

    def sync(self, items: Sequence[tuple[str, Hashable]], render: Callable[[Any], tuple[Cell, ...]]) -> None:
        """Show `items` (key, value) in this order; only rows whose value changed are rendered again."""
        new = dict(items)
        for key in [k for k in self._cells if k not in new]:
            self.remove_row(key)
            del self._cells[key]
            del self._values[key]
        cols = [k for k, _ in self.COLUMNS]
        added = False
        for key, value in items:
            if key in self._values and self._values[key] == value:
                continue  # unchanged: most rows of a big cluster on most polls
            # Text, never str: DataTable parses str cells as markup (slow, and a node could inject styling)
            cells = tuple(c if isinstance(c, Text) else Text(c) for c in render(value))
            old = self._cells.get(key)
            if old is None:
                self.add_row(*cells, key=key)
                added = True
            else:
                for col, a, b in zip(cols, old, cells, strict=True):
                    if a != b:
                        # only ever widen: DataTable re-measures the whole column when a cell narrows it
                        wider = cell_len(str(b)) > self.columns[ColumnKey(col)].content_width
                        self.update_cell(key, col, b, update_width=wider)
            self._cells[key] = cells
            self._values[key] = value
        if added and len(items) > 1:
            # DataTable only appends; the first column holds the row key, so sort on it into the source's order
            order = {k: i for i, (k, _) in enumerate(items)}
            self.sort(self.COLUMNS[0][0], key=lambda v: order.get(str(v), 0))


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
