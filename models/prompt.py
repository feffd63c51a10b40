"""Prompt building from a Modelfile TEMPLATE, as Ollama's server/prompt.go and template/template.go do it.

Three execution modes, chosen the way Ollama chooses them:

* fill-in-the-middle: a generate request with both a prompt and a suffix renders once with
  ``.Prompt``/``.Suffix``;
* messages: a template that mentions ``.Messages`` (or ``.Document``) renders once with the collated
  messages, ``.System`` (all system messages joined), ``.Tools`` and the think flags;
* legacy: any other template is rendered once per completed system/user/assistant turn with
  ``.System``/``.Prompt``/``.Response``, and the last turn stops right after ``.Response`` so the
  model continues from there.

Before that, consecutive messages of one role (except ``tool``) are merged with a blank line, a
template that mentions neither ``.Messages`` nor ``.Response`` gets ``{{ .Response }}`` appended,
and a model without a template uses ``{{ .Prompt }}``.

Messages and tools are turned into :class:`~omx.models.gotemplate.GoStruct` values that mimic
Ollama's api types, so ``{{ .Function }}``, ``{{ .Function.Arguments }}``, ``{{ .Tools }}`` and
``{{ json ... }}`` produce the JSON Ollama produces (field order, omitted empty fields, key order).
Bad message or tool shapes raise :class:`PromptInputError`, a :class:`TemplateError`, so callers
that map TemplateError to HTTP 400 need nothing else.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from omx.models.gotemplate import (
    GoStruct,
    JSONList,
    JSONOrderedMap,
    OrderedMap,
    PropertyType,
    Template,
    TemplateError,
    parse,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "PromptInputError",
    "parse_template",
    "render_chat",
    "render_generate",
    "uses_messages",
]

DEFAULT_TEMPLATE: Final = "{{ .Prompt }}"
"""Ollama's template for models that have none."""

class PromptInputError(TemplateError):
    """A message, tool or think value Ollama's request decoding would reject (an HTTP 400)."""


def parse_template(source: str | None) -> Template:
    """Parse a Modelfile TEMPLATE as Ollama's template.Parse does (None or "" means the default).

    Appends ``{{ .Response }}`` when the template mentions neither ``.Messages`` nor ``.Response``.
    Raises TemplateError, which ``/api/create`` should report as a 400. Results are cached.
    """
    if source is not None and not isinstance(source, str):
        raise TemplateError(f"template must be a string, not {type(source).__name__}")
    return _parse_template(source or DEFAULT_TEMPLATE)


@functools.lru_cache(maxsize=256)
def _parse_template(source: str) -> Template:
    t = parse(source)
    if not t.identifiers & {"messages", "response"}:
        t = t.with_trailing_field("Response")
    return t


def uses_messages(template: str | Template | None) -> bool:
    """Whether the template is rendered once over ``.Messages`` rather than turn by turn."""
    t = _template(template)
    return "messages" in t.identifiers or "document" in t.identifiers


def _template(template: str | Template | None) -> Template:
    return template if isinstance(template, Template) else parse_template(template)


# --------------------------------------------------------------------------------------------------
# think


def _think(think: Any) -> tuple[bool, str, bool]:
    """(Think, ThinkLevel, IsThinkSet) from a request's think value (None, bool or level name)."""
    if think is None:
        return False, "", False
    if isinstance(think, bool):
        return think, "medium" if think else "", True
    if isinstance(think, str):  # a level ("high", "medium", "low"): thinking on at that level
        return bool(think), think, True
    raise PromptInputError(f"think must be a boolean or string, not {type(think).__name__}")


# --------------------------------------------------------------------------------------------------
# api types as template values


def _as_mapping(v: Any, what: str) -> Mapping[str, Any]:
    if hasattr(v, "model_dump") and not isinstance(v, Mapping):
        v = v.model_dump(exclude_none=True)
    if not isinstance(v, Mapping):
        raise PromptInputError(f"{what} must be an object, not {type(v).__name__}")
    return v


def _str(m: Mapping[str, Any], key: str, what: str) -> str:
    v = m.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise PromptInputError(f"{what}.{key} must be a string, not {type(v).__name__}")
    return v


def _str_list(m: Mapping[str, Any], key: str, what: str) -> list[str] | None:
    v = m.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise PromptInputError(f"{what}.{key} must be a list of strings")
    return list(v)


def _list(m: Mapping[str, Any], key: str, what: str) -> list[Any] | None:
    v = m.get(key)
    if v is None:
        return None
    if not isinstance(v, list):
        raise PromptInputError(f"{what}.{key} must be a list")
    return v


def _arguments(v: Any, what: str) -> JSONOrderedMap:
    if v is None:
        return JSONOrderedMap()
    if isinstance(v, str):  # OpenAI-style JSON text
        try:
            v = json.loads(v) if v.strip() else {}
        except ValueError as e:
            raise PromptInputError(f"{what}.arguments is not valid JSON: {e}") from None
    if not isinstance(v, Mapping):
        raise PromptInputError(f"{what}.arguments must be an object")
    return JSONOrderedMap(v)


def _tool_call(tc: Any, what: str) -> GoStruct:
    tc = _as_mapping(tc, what)
    fn = _as_mapping(tc.get("function") or {}, f"{what}.function")
    index = fn.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise PromptInputError(f"{what}.function.index must be an integer")
    func = GoStruct("ToolCallFunction", [
        ("Index", index, "index", False),
        ("Name", _str(fn, "name", f"{what}.function"), "name", False),
        ("Arguments", _arguments(fn.get("arguments"), f"{what}.function"), "arguments", False),
    ])
    return GoStruct("ToolCall", [("ID", _str(tc, "id", what), "id", True), ("Function", func, "function", False)])


def _message(m: Any, i: int) -> dict[str, Any]:
    """A request message normalized to plain fields (role lower-cased, developer read as system)."""
    what = f"messages[{i}]"
    m = _as_mapping(m, what)
    role = _str(m, "role", what).lower()
    if role == "developer":
        role = "system"
    calls = _list(m, "tool_calls", what) or []
    return {
        "role": role,
        "content": _str(m, "content", what),
        "thinking": _str(m, "thinking", what),
        "images": _str_list(m, "images", what),
        "tool_calls": [_tool_call(tc, f"{what}.tool_calls[{k}]") for k, tc in enumerate(calls)],
        "tool_name": _str(m, "tool_name", what),
        "tool_call_id": _str(m, "tool_call_id", what),
    }


def _message_struct(m: Mapping[str, Any]) -> GoStruct:
    return GoStruct("Message", [
        ("Role", m["role"], "role", False),
        ("Content", m["content"], "content", False),
        ("Thinking", m["thinking"], "thinking", True),
        ("Images", m["images"], "images", True),
        ("ToolCalls", list(m["tool_calls"]), "tool_calls", True),
        ("ToolName", m["tool_name"], "tool_name", True),
        ("ToolCallID", m["tool_call_id"], "tool_call_id", True),
    ])


def _property_type(v: Any, what: str) -> PropertyType:
    if v is None:
        return PropertyType()
    if isinstance(v, str):
        return PropertyType((v,))
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return PropertyType(v)
    raise PromptInputError(f"{what}.type must be a string or a list of strings")


def _properties(v: Any, what: str) -> OrderedMap | None:
    if v is None:
        return None
    v = _as_mapping(v, what)
    return OrderedMap((k, _property(p, f"{what}.{k}")) for k, p in v.items())


def _property(p: Any, what: str) -> GoStruct:
    p = _as_mapping(p, what)
    any_of = _list(p, "anyOf", what)
    return GoStruct("ToolProperty", [
        ("AnyOf", [_property(x, f"{what}.anyOf[{k}]") for k, x in enumerate(any_of)] if any_of else None,
         "anyOf", True),
        ("Type", _property_type(p.get("type"), what), "type", True),
        ("Items", p.get("items"), "items", True),
        ("Description", _str(p, "description", what), "description", True),
        ("Enum", _list(p, "enum", what), "enum", True),
        ("Properties", _properties(p.get("properties"), f"{what}.properties"), "properties", True),
    ])


def _tool(t: Any, i: int) -> GoStruct:
    what = f"tools[{i}]"
    t = _as_mapping(t, what)
    fn = _as_mapping(t.get("function") or {}, f"{what}.function")
    params = _as_mapping(fn.get("parameters") or {}, f"{what}.function.parameters")
    pw = f"{what}.function.parameters"
    parameters = GoStruct("ToolFunctionParameters", [
        ("Type", _str(params, "type", pw), "type", False),
        ("Defs", params.get("$defs"), "$defs", True),
        ("Items", params.get("items"), "items", True),
        ("Required", _str_list(params, "required", pw), "required", True),
        ("Properties", _properties(params.get("properties"), f"{pw}.properties"), "properties", False),
    ], stringer=True)
    function = GoStruct("ToolFunction", [
        ("Name", _str(fn, "name", f"{what}.function"), "name", False),
        ("Description", _str(fn, "description", f"{what}.function"), "description", True),
        ("Parameters", parameters, "parameters", False),
    ], stringer=True)
    return GoStruct("Tool", [
        ("Type", _str(t, "type", what), "type", False),
        ("Items", t.get("items"), "items", True),
        ("Function", function, "function", False),
    ], stringer=True)


def _tools(tools: Sequence[Any] | None) -> JSONList:
    if tools is None:
        return JSONList(nil=True)
    if not isinstance(tools, (list, tuple)):
        raise PromptInputError("tools must be a list")
    return JSONList(_tool(t, i) for i, t in enumerate(tools))


# --------------------------------------------------------------------------------------------------
# execution (template.Execute)


def _collate(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Join system contents; merge consecutive same-role messages except tool results."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(m)
    return "\n\n".join(system), out


def _execute(tmpl: Template, *, messages: list[dict[str, Any]], tools: JSONList, prompt: str = "",
             suffix: str = "", think: Any = None) -> str:
    think_on, level, think_set = _think(think)
    flags = {"Think": think_on, "ThinkLevel": level, "IsThinkSet": think_set}
    if prompt and suffix:
        return tmpl.render({"Prompt": prompt, "Suffix": suffix, "Response": "", **flags})
    system, collated = _collate(messages)
    if "messages" in tmpl.identifiers or "document" in tmpl.identifiers:
        return tmpl.render({
            "System": system,
            "Messages": [_message_struct(m) for m in collated],
            "Tools": tools,
            "Response": "",
            "Query": "",
            "Document": "",
            "Instruction": "",
            **flags,
        })

    # legacy: one render per finished turn, then the open turn cut right after .Response
    parts: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def flush() -> None:
        parts.append(tmpl.render({**turn, **flags}))
        turn.update(System="", Prompt="", Response="")

    for m in collated:
        role = m["role"]
        if role == "system":
            if turn["Prompt"] or turn["Response"]:
                flush()
            turn["System"] = m["content"]
        elif role == "user":
            if turn["Response"]:
                flush()
            turn["Prompt"] = m["content"]
        elif role == "assistant":
            turn["Response"] = m["content"]
    parts.append(tmpl.truncated_after_field("Response").render({**turn, **flags}))
    return "".join(parts)


def render_generate(template: str | Template | None, *, system: str | None, prompt: str,
                    suffix: str | None = None, response: str = "", context_text: str | None = None,
                    think: Any = None, history: Sequence[Any] | None = None) -> str:
    """The prompt for ``/api/generate`` (not raw), as Ollama's GenerateHandler builds it.

    ``system`` is the effective system prompt (request's, else the Modelfile's). ``history`` holds
    the Modelfile MESSAGEs, used only when there is no ``context_text``; ``context_text`` (the
    detokenized ``context`` of an earlier reply) is prepended verbatim. ``response`` is an
    assistant prefill, rendered as a trailing assistant message. ``think`` is None, a bool or a
    level name.
    """
    tmpl = _template(template)
    if suffix:
        out = _execute(tmpl, messages=[], tools=JSONList(nil=True), prompt=prompt, suffix=suffix, think=think)
        return (context_text or "") + out
    raw: list[Any] = []
    if system:
        raw.append({"role": "system", "content": system})
    if context_text is None and history:
        raw.extend(history)
    raw.append({"role": "user", "content": prompt})
    if response:
        raw.append({"role": "assistant", "content": response})
    try:
        msgs = [_message(m, i) for i, m in enumerate(raw)]
    except RecursionError:
        raise PromptInputError("history is nested too deeply") from None
    return (context_text or "") + _execute(tmpl, messages=msgs, tools=JSONList(nil=True), think=think)


def render_chat(template: str | Template | None, *, messages: Sequence[Any], system: str | None,
                tools: Sequence[Any] | None, think: Any = None) -> str:
    """The prompt for ``/api/chat``, as Ollama's ChatHandler and chatPrompt build it.

    ``system`` is the Modelfile SYSTEM: it is prepended unless the first message is a system
    message. Messages are dicts (or pydantic models) with Ollama's fields: role, content,
    thinking, images, tool_calls, tool_name, tool_call_id. Image placeholders and context-window
    truncation are the caller's business, as in chatPrompt.
    """
    tmpl = _template(template)
    if not isinstance(messages, (list, tuple)):
        raise PromptInputError("messages must be a list")
    try:
        return _chat(tmpl, messages, system, tools, think)
    except RecursionError:
        raise PromptInputError("messages or tools are nested too deeply") from None


def _chat(tmpl: Template, messages: Sequence[Any], system: str | None, tools: Sequence[Any] | None,
          think: Any) -> str:
    msgs = [_message(m, i) for i, m in enumerate(messages)]
    # Ollama tests the request's own first role, before "developer" is read as "system"
    if system and (not msgs or _str(_as_mapping(messages[0], "messages[0]"), "role", "messages[0]").lower()
                   != "system"):
        msgs.insert(0, _message({"role": "system", "content": system}, 0))
    return _execute(tmpl, messages=msgs, tools=_tools(tools), think=think)
