"""Every management action in one table: key bindings, the command palette and the dispatcher all read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActionSpec:
    id: str
    title: str  # palette text, followed by the target's name
    target: str | None  # "node" | "model" | "instance" | None (no target)
    key: str  # binding on the matching table (or the app when target is None)
    help: str
    destructive: bool = False
    short: str = ""  # footer label, when the title is too long for it

    @property
    def label(self) -> str:
        return self.short or self.title.split(" ")[0]


ACTIONS: dict[str, ActionSpec] = {a.id: a for a in (
    ActionSpec("cordon", "Cordon node", "node", "c", "stop scheduling new models onto the node"),
    ActionSpec("uncordon", "Uncordon node", "node", "u", "allow scheduling again (also ends a drain)"),
    ActionSpec("drain", "Drain node", "node", "d", "cordon and move the node's models elsewhere", destructive=True),
    ActionSpec("remove", "Remove node", "node", "x", "forget the node in the registry", destructive=True),
    ActionSpec("transfer_to", "Transfer leadership to", "node", "l", "make this control node the Raft leader",
               short="Make leader"),
    ActionSpec("scale", "Scale model", "model", "s", "set the desired replica count"),
    ActionSpec("load", "Load model", "model", "l", "load the model into a runner"),
    ActionSpec("unload", "Unload model", "model", "u", "unload the model from its runners"),
    ActionSpec("copy", "Copy model", "model", "y", "copy the model under a new name"),
    ActionSpec("delete", "Delete model", "model", "x", "delete the model from the cluster", destructive=True),
    ActionSpec("remove_instance", "Remove external instance", "instance", "x", "stop routing to the instance",
               destructive=True, short="Remove"),
    ActionSpec("pull", "Pull model…", None, "P", "download a model from its registry", short="Pull"),
    ActionSpec("add_instance", "Add external instance…", None, "A", "route requests to another Ollama server",
               short="Add instance"),
    ActionSpec("transfer", "Transfer Raft leadership…", None, "T", "move leadership to another voter",
               short="Leader"),
)}


def for_target(kind: str) -> list[ActionSpec]:
    return [a for a in ACTIONS.values() if a.target == kind]
