"""`omx-console`: the Textual operator console (also served to a browser with `--web`)."""

from omx.console.tui.launch import main

__all__ = ["main"]
