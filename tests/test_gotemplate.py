"""Go text/template rendering of Ollama Modelfile TEMPLATEs (omx.models.gotemplate, omx.models.prompt).

Expected outputs were produced with Go's text/template (option missingkey=zero) and Ollama-shaped
structs, so these tables pin byte-exact compatibility with what Ollama sends to the model.
"""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omx.models.gotemplate import (
    MISSING,
    GoStruct,
    JSONList,
    JSONOrderedMap,
    TemplateError,
    go_json,
    go_sprintf,
    parse,
)
from omx.models.prompt import (
    DEFAULT_TEMPLATE,
    PromptInputError,
    parse_template,
    render_chat,
    render_generate,
    uses_messages,
)

D: dict[str, Any] = {"A": "z", "S": "héllo", "L": ["a", "b", "c"], "E": [], "M": {"b": "2", "a": "1"},
                     "N": {"X": {"Y": "deep"}}, "T": True, "F": False, "Z": "", "Q": "<a&b>"}

CASES: list[tuple[str, Any, str]] = [
    # text, trim markers, comments
    ("plain text", None, "plain text"),
    ("a {{- .A -}} b", D, "azb"),
    ("a\n\t {{- .A }}\n", D, "az\n"),
    ("{{ .A -}}\n\n  b", D, "zb"),
    ("x {{- /* comment */ -}} y", None, "xy"),
    ("x {{/* multi\nline */}} y", None, "x  y"),
    ("{{ -3 }}", None, "-3"),
    # fields, dot, $, variables and their scopes
    ("{{ .A }}|{{ .N.X.Y }}|{{ $.A }}|{{ . }}", {"A": "z", "N": {"X": {"Y": "deep"}}},
     "z|deep|z|map[A:z N:map[X:map[Y:deep]]]"),
    ("{{ with .N }}{{ .X.Y }}{{ $.A }}{{ end }}", D, "deepz"),
    ('{{ $x := .A }}{{ $x }}{{ $x = "y" }}{{ $x }}', D, "zy"),
    ('{{ $x := "out" }}{{ if .T }}{{ $x := "in" }}{{ $x }}{{ end }}{{ $x }}', D, "inout"),
    ('{{ $x := "out" }}{{ if .T }}{{ $x = "in" }}{{ end }}{{ $x }}', D, "in"),
    # if / else if / else, truthiness
    ("{{ if .T }}t{{ else }}f{{ end }}{{ if .F }}t{{ else if .Z }}z{{ else if .L }}l{{ else }}e{{ end }}", D, "tl"),
    ("{{ if .Missing }}m{{ else }}no{{ end }}{{ if .E }}e{{ else }}empty{{ end }}{{ if 0 }}0{{ end }}", D,
     "noempty"),
    ("{{ if $v := .A }}[{{ $v }}]{{ end }}", D, "[z]"),
    # range: values, index/value, else, maps in key order, break/continue, the $last idiom
    ("{{ range .L }}<{{ . }}>{{ end }}", D, "<a><b><c>"),
    ("{{ range $i, $v := .L }}{{ $i }}:{{ $v }} {{ end }}", D, "0:a 1:b 2:c "),
    ("{{ range $v := .L }}{{ $v }}{{ end }}", D, "abc"),
    ("{{ range .E }}x{{ else }}none{{ end }}", D, "none"),
    ("{{ range $k, $v := .M }}{{ $k }}={{ $v }};{{ end }}", D, "a=1;b=2;"),
    ('{{ range .L }}{{ if eq . "b" }}{{ continue }}{{ end }}{{ . }}{{ end }}', D, "ac"),
    ('{{ range .L }}{{ if eq . "b" }}{{ break }}{{ end }}{{ . }}{{ end }}', D, "a"),
    ("{{ range $i, $_ := .L }}{{ if eq (len (slice $.L $i)) 1 }}last={{ . }}{{ end }}{{ end }}", D, "last=c"),
    ("{{ range 3 }}{{ . }}{{ end }}", None, "012"),
    # with, else with
    ("{{ with .Z }}has{{ else }}empty{{ end }}{{ with .A }}<{{ . }}>{{ end }}", D, "empty<z>"),
    ("{{ with .Z }}z{{ else with .A }}a={{ . }}{{ end }}", D, "a=z"),
    # pipelines and parentheses
    ('{{ .A | printf "%s!" }}{{ "x" | printf "%s-%s" "a" }}', D, "z!a-x"),
    ("{{ .S | len }}{{ .L | len }}", D, "63"),
    ("{{ (.N.X).Y }}{{ (index .L 1) }}", D, "deepb"),
    # comparison and logic
    ('{{ eq .A "z" }} {{ eq .A "q" "z" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt "b" "a" }} {{ ge 1.5 2.5 }}',
     D, "true true true true true true false"),
    ("{{ and .T .A }}|{{ and .T .Z .A }}|{{ or .Z .F }}|{{ or .Z .A }}|{{ not .L }}|{{ not .E }}", D,
     "z||false|z|false|true"),
    ('{{ eq .Missing "x" }}', D, "false"),
    # builtins
    ('{{ index .L 2 }}{{ index .M "a" }}{{ index .N "X" "Y" }}', D, "c1deep"),
    ("{{ slice .L 1 }}{{ slice .S 0 1 }}{{ len (slice .L 0 2) }}", D, "[b c]h2"),
    ('{{ print "a" 1 2 "b" true }}|{{ println 1 "x" }}|', D, "a1 2btrue|1 x\n|"),
    ('{{ printf "%q|%d|%v|%5.2f|%-4s|%04d|%x|%c|%t|%%|%s|%v" .S 42 1e6 3.14159 "ab" 7 255 65 true "s" .L }}', D,
     '"héllo"|42|1e+06| 3.14|ab  |0007|ff|A|true|%|s|[a b c]'),
    ('{{ printf "%d %s" "x" 5 }}|{{ printf "%d" }}|{{ printf "%s" "a" "extra" }}', D,
     "%!d(string=x) %!s(int=5)|%!d(MISSING)|a%!(EXTRA string=extra)"),
    ("{{ json .L }} {{ json .M }} {{ json .Q }} {{ json 1.5 }}", D,
     '["a","b","c"] {"a":"1","b":"2"} "\\u003ca\\u0026b\\u003e" 1.5'),
    ('{{ html .Q }} {{ urlquery "a b&c" }} {{ js "it\'s" }}', D, "&lt;a&amp;b&gt; a+b%26c it\\'s"),
    # literals
    ("{{ 'a' }} {{ 0x1F }} {{ 0o17 }} {{ 1_000 }} {{ .5 }} {{ 1e3 }} {{ 1.0 }} {{ 100000.0 }} {{ 1e6 }} {{ true }}",
     None, "97 31 15 1000 0.5 1000 1 100000 1e+06 true"),
    ('{{ "tab\\there\\u00e9" }}{{ `raw\\n` }}', None, "tab\thereéraw\\n"),
    # missing keys and fields are empty and falsy (Go would print <no value>; templates only test them)
    ("[{{ .Nope }}][{{ .N.Nope.Deeper }}][{{ if .Nope }}x{{ end }}]", D, "[][][]"),
]


@pytest.mark.parametrize(("src", "data", "want"), CASES)
def test_render_table(src: str, data: Any, want: str) -> None:
    assert parse(src).render(data) == want


ERRORS = [
    "{{ if .X }}unterminated",
    "{{ if }}{{ end }}",
    "{{ range .L }}",
    "{{ end }}",
    "{{ else }}",
    "{{ if 1 }}{{ else }}{{ else }}{{ end }}",
    "{{ nosuchfunc .X }}",
    "{{ .X",
    "{{ .X }",
    "{{/* unclosed comment",
    "{{/* c */ }}",
    "{{-.A}}",
    "{{ $undefined }}",
    "{{ $x = 1 }}",
    "{{ break }}",
    "{{ range .L }}{{ else }}{{ continue }}{{ end }}",
    "{{ .A | \"lit\" }}",
    "{{ print (1 }}",
    "{{ print 1) }}",
    "{{ \"unterminated }}",
    "{{ \"bad \\q escape\" }}",
    "{{ 'ab' }}",
    "{{ 1+2 }}",
    "{{ 99999999999999999999 }}",
    "{{ \"x\".Field }}",
    "{{ define \"t\" }}x{{ end }}",
    "{{ template \"t\" }}",
    "{{ ( }}",
    "{{ }}",
    "{{ # }}",
    "{{ a.b }}",
    "{{ $a, $b := 1 }}",
]


@pytest.mark.parametrize("src", ERRORS)
def test_parse_errors(src: str) -> None:
    with pytest.raises(TemplateError) as e:
        parse(src).render(D)
    assert str(e.value).startswith("template: ")


EXEC_ERRORS = [
    ("{{ index .L 9 }}", "index out of range"),
    ("{{ nil }}", "nil is not a command"),
    ("{{ len 3 }}", "len of type int"),
    ("{{ not 1 2 }}", "wrong number of args"),
    ('{{ eq 1 "a" }}', "incompatible types"),
    ("{{ lt true false }}", "invalid type for comparison"),
    ("{{ .A.B }}", "can't evaluate field B"),
    ("{{ .A 1 }}", "not a method"),
    ("{{ range .A }}{{ end }}", "can't iterate over"),
    ("{{ slice .L 2 1 }}", "invalid slice index"),
]


@pytest.mark.parametrize(("src", "msg"), EXEC_ERRORS)
def test_execution_errors(src: str, msg: str) -> None:
    t = parse(src)  # parses fine, fails when run
    with pytest.raises(TemplateError, match=msg) as e:
        t.render(D)
    assert e.value.line == 1 and e.value.col is not None


def test_error_position() -> None:
    with pytest.raises(TemplateError) as e:
        parse("line one\nline {{ two")
    assert (e.value.line, e.value.col) == (2, 6)
    assert "2:6" in str(e.value)


def test_limits_bound_work() -> None:
    with pytest.raises(TemplateError, match="steps"):
        parse("{{ range 100000000 }}x{{ end }}").render(max_steps=10_000)
    with pytest.raises(TemplateError, match="exceeds"):
        parse("{{ range 1000 }}xxxxxxxxxx{{ end }}").render(max_output=5_000)
    doubling = '{{ $x := "ab" }}{{ range 64 }}{{ $x = printf "%s%s" $x $x }}{{ end }}'
    with pytest.raises(TemplateError, match="limits"):
        parse(doubling).render(max_output=1 << 20)
    with pytest.raises(TemplateError, match="nesting"):
        parse("{{ print " + "(" * 500 + "1" + ")" * 500 + " }}")
    with pytest.raises(TemplateError, match="nesting"):
        parse("{{ if 1 }}" * 500 + "{{ end }}" * 500)


def test_identifiers_and_caching() -> None:
    t = parse("{{ range $i, $m := .Messages }}{{ $m.Role }}{{ end }}{{ if .System }}{{ $.Tools }}{{ end }}")
    # like Ollama's Identifiers: names used in commands, not the variables a pipeline declares
    assert t.identifiers == {"messages", "$m", "role", "system", "$", "tools"}
    assert parse("{{ .A }}") is parse("{{ .A }}")


def test_go_values() -> None:
    args = JSONOrderedMap({"unit": "c", "city": "Paris", "nested": {"b": 1, "a": [1.0, 1e21, 1e-7, None]}})
    call = GoStruct("F", [("Name", "f", "name", False), ("Arguments", args, "arguments", False),
                          ("Skip", "", "skip", True)])
    assert go_json(call) == ('{"name":"f","arguments":{"unit":"c","city":"Paris",'
                             '"nested":{"a":[1,1e+21,1e-7,null],"b":1}}}')
    t = parse("{{ .Function.Arguments }}|{{ .Function.Name }}|{{ .Function.Nope }}|{{ .Tools }}|{{ .None }}")
    data = {"Function": call, "Tools": JSONList(nil=True), "None": None}
    assert t.render(data) == '{"unit":"c","city":"Paris","nested":{"a":[1,1e+21,1e-7,null],"b":1}}|f||null|<no value>'
    assert not MISSING
    assert go_sprintf("%6.2f|%-5d|%+d|%x|%U", [3.14159, 42, 5, "hi", 0x1F600]) == "  3.14|42   |+5|6869|U+1F600"
    with pytest.raises(ValueError):
        go_json(float("nan"))
    assert parse("{{ json . }}").render(float("inf")) == ""  # Ollama ignores Marshal errors


def test_custom_funcs() -> None:
    t = parse("{{ shout .A }}", funcs={"shout": lambda s: s.upper() + "!"})
    assert t.render({"A": "hi"}) == "HI!"
    with pytest.raises(TemplateError, match="error calling boom"):
        parse("{{ boom }}", funcs={"boom": lambda: 1 / 0}).render()


# --------------------------------------------------------------------------------------------------
# Real Ollama templates through omx.models.prompt

QWEN25 = """{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

LLAMA31 = """{{- if or .System .Tools }}<|start_header_id|>system<|end_header_id|>
{{- if .System }}

{{ .System }}
{{- end }}
{{- if .Tools }}

Cutting Knowledge Date: December 2023

When you receive a tool call response, use the output to format an answer to the orginal user question.

You are a helpful assistant with tool calling capabilities.
{{- end }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>
{{- if and $.Tools $last }}

Given the following functions, please respond with a JSON for a function call with its proper arguments that best \
answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. \
Do not use variables.

{{ range $.Tools }}
{{- . }}
{{ end }}
Question: {{ .Content }}<|eot_id|>
{{- else }}

{{ .Content }}<|eot_id|>
{{- end }}{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>
{{- if .ToolCalls }}
{{ range .ToolCalls }}
{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}
{{- else }}

{{ .Content }}
{{- end }}{{ if not $last }}<|eot_id|>{{ end }}
{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ .Content }}<|eot_id|>{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}
"""

LLAMA3_LEGACY = """{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>"""

ZEPHYR = ("{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}</s>\n"
          "{{ end }}<|assistant|>\n{{ .Response }}</s>")

MISTRAL_TOOLS = """{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}
{{- if and (le (len (slice $.Messages $index)) 2) $.Tools }}[AVAILABLE_TOOLS] {{ json $.Tools }}[/AVAILABLE_TOOLS]
{{- end }}[INST] {{ if and (eq (len (slice $.Messages $index)) 1) $.System }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}</s>
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}
{{- end }}]</s>
{{- end }}
{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}}[/TOOL_RESULTS]
{{- end }}
{{- end }}"""

COMMAND_R = """{{- if or .Tools .System }}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>
{{- if .Tools }}# Safety Preamble
{{ if .System }}# User Preamble
{{ .System }}
{{- end }}

## Available Tools
{{- range .Tools }}

```python
def {{ .Function.Name }}(
{{- range $name, $property := .Function.Parameters.Properties }}{{ $name }}: {{ $property.Type }}, \
{{ end }}) -> List[Dict]:
    '''{{ .Function.Description }}

{{- if .Function.Parameters.Properties }}

    Args:
{{- range $name, $property := .Function.Parameters.Properties }}
        {{ $name }} ({{ $property.Type }}): {{ $property.Description }}
{{- end }}
{{- end }}
    '''
    pass
```
{{- end }}
{{- else if .System }}{{ .System }}
{{- end }}<|END_OF_TURN_TOKEN|>
{{- end }}
{{- range .Messages }}
{{- if eq .Role "system" }}
{{- continue }}
{{- end }}<|START_OF_TURN_TOKEN|>
{{- if eq .Role "user" }}<|USER_TOKEN|>{{ .Content }}
{{- else if eq .Role "assistant" }}<|CHATBOT_TOKEN|>
{{- if .Content }}{{ .Content }}
{{- else if .ToolCalls }}
Action: ```json
[
{{- range .ToolCalls }}
    {
        "tool_name": "{{ .Function.Name }}",
        "parameters": {{ .Function.Arguments }}
    }
{{- end }}
]```
{{- end }}
{{- else if eq .Role "tool" }}<|SYSTEM_TOKEN|><results>
console_output: {{ .Content }}
</results>
{{- end }}<|END_OF_TURN_TOKEN|>
{{- end }}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>
"""

GEMMA3 = """{{- $system := .System }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{- if and (eq $i 1) $system }}
{{ $system }}
{{- end }}
{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- end }}
"""

CHATML = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ else }}
{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
{{- end }}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a <city>",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["c", "f"], "description": "Unit"}}}}}]
TOOL_FN_JSON = ('{"name":"get_weather","description":"Get the weather for a \\u003ccity\\u003e","parameters":'
                '{"type":"object","required":["city"],"properties":{"city":{"type":"string","description":'
                '"City name"},"unit":{"type":"string","description":"Unit","enum":["c","f"]}}}}')
TOOL_CONV = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}}]},
    {"role": "tool", "content": "22C"},
    {"role": "assistant", "content": "It is 22C."},
    {"role": "user", "content": "Thanks"},
]
MULTI = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]

REAL: list[tuple[str, str, list[dict[str, Any]], list[dict[str, Any]] | None, str]] = [
    ("qwen2.5 tools", QWEN25, TOOL_CONV, TOOLS,
     "<|im_start|>system\nYou are helpful.\n\n# Tools\n\nYou may call one or more functions to assist with the "
     "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
     '{"type": "function", "function": ' + TOOL_FN_JSON + "}\n</tools>\n\nFor each function call, return a json "
     "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
     '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n'
     "Weather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
     '{"name": "get_weather", "arguments": {"unit":"c","city":"Paris"}}\n</tool_call><|im_end|>\n'
     "<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 22C."
     "<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"),
    ("qwen2.5 plain", QWEN25, MULTI, None,
     "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
     "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3.1 tools", LLAMA31, TOOL_CONV, TOOLS,
     "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.\n\nCutting Knowledge Date: December 2023\n\n"
     "When you receive a tool call response, use the output to format an answer to the orginal user question.\n\n"
     "You are a helpful assistant with tool calling capabilities.<|eot_id|><|start_header_id|>user"
     "<|end_header_id|>\n\nWeather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
     '{"name": "get_weather", "parameters": {"unit":"c","city":"Paris"}}<|eot_id|><|start_header_id|>ipython'
     "<|end_header_id|>\n\n22C<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is 22C.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
     "function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
     '{"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\n\n'
     '{"type":"function","function":' + TOOL_FN_JSON + "}\n\nQuestion: Thanks<|eot_id|><|start_header_id|>"
     "assistant<|end_header_id|>\n\n\n"),
    ("llama3 legacy (fallback)", LLAMA3_LEGACY, MULTI, None,
     "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU1"
     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user"
     "<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("prompt/response only (fallback)", ZEPHYR, MULTI, None,
     "<|system|>\nS</s>\n<|user|>\nU1</s>\n<|assistant|>\nA1</s><|user|>\nU2</s>\n<|assistant|>\n"),
    ("mistral json tools", MISTRAL_TOOLS, TOOL_CONV, TOOLS,
     '[INST] Weather in Paris?[/INST][TOOL_CALLS] [{"name": "get_weather", "arguments": {"unit":"c",'
     '"city":"Paris"}}]</s>[TOOL_RESULTS] {"content": 22C}[/TOOL_RESULTS] It is 22C.</s>[AVAILABLE_TOOLS] '
     '[{"type":"function","function":' + TOOL_FN_JSON + "}][/AVAILABLE_TOOLS][INST] You are helpful.\n\n"
     "Thanks[/INST]"),
    ("command-r properties and continue", COMMAND_R, TOOL_CONV, TOOLS,
     "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># Safety Preamble\n# User Preamble\nYou are helpful.\n\n"
     "## Available Tools\n\n```python\ndef get_weather(city: string, unit: string, ) -> List[Dict]:\n"
     "    '''Get the weather for a <city>\n\n    Args:\n        city (string): City name\n"
     "        unit (string): Unit\n    '''\n    pass\n```<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
     "<|USER_TOKEN|>Weather in Paris?<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>\nAction: "
     '```json\n[\n    {\n        "tool_name": "get_weather",\n        "parameters": {"unit":"c","city":"Paris"}\n'
     "    }\n]```<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\nconsole_output: 22C\n"
     "</results><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>It is 22C.<|END_OF_TURN_TOKEN|>"
     "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Thanks<|END_OF_TURN_TOKEN|><|END_OF_TURN_TOKEN|>"
     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>\n"),
    ("gemma3", GEMMA3, MULTI, None,
     "<start_of_turn>user\nS\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>user\nU2"
     "<end_of_turn>\n<start_of_turn>model\n\n"),
    ("chatml", CHATML, MULTI, None,
     "<|im_start|>system\nS<|im_end|>\n<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
     "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize(("name", "src", "messages", "tools", "want"), REAL, ids=[r[0] for r in REAL])
def test_real_templates(name: str, src: str, messages: list[dict[str, Any]], tools: Any, want: str) -> None:
    assert render_chat(src, messages=messages, system=None, tools=tools) == want


def test_legacy_fallback_turns() -> None:
    # a system message mid-conversation closes the open turn; an assistant last message is a prefill
    msgs = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
            {"role": "system", "content": "S2"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "partial"}]
    assert render_chat(ZEPHYR, messages=msgs, system=None, tools=None) == (
        "<|user|>\nU1</s>\n<|assistant|>\nA1</s><|system|>\nS2</s>\n<|user|>\nU2</s>\n<|assistant|>\npartial")
    # the last turn stops right after .Response, also inside a branch
    t = "{{ if .Prompt }}A{{ .Response }}B{{ end }}C"
    assert render_chat(t, messages=[{"role": "user", "content": "x"}], system=None, tools=None) == "A"


def test_system_prepend_and_collate() -> None:
    t = "{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}|{{ .System }}"
    msgs = [{"role": "user", "content": "a"}, {"role": "USER", "content": "b"},
            {"role": "tool", "content": "t1"}, {"role": "tool", "content": "t2"}]
    assert render_chat(t, messages=msgs, system="MS", tools=None) == (
        "[system:MS][user:a\n\nb][tool:t1][tool:t2]|MS")
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    assert render_chat(t, messages=own, system="MS", tools=None) == "[system:mine][user:q]|mine"
    dev = [{"role": "developer", "content": "d"}, {"role": "user", "content": "q"}]
    assert render_chat(t, messages=dev, system=None, tools=None) == "[system:d][user:q]|d"


def test_generate_modes() -> None:
    assert render_generate(None, system="S", prompt="hi") == "hi"  # default {{ .Prompt }}
    assert render_generate("", system=None, prompt="hi") == "hi"
    assert render_generate(LLAMA3_LEGACY, system="S", prompt="hi") == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_generate(QWEN25, system=None, prompt="hi") == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    fim = "{{ if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{ else }}{{ .Prompt }}{{ end }}"
    assert render_generate(fim, system="ignored", prompt="def f(", suffix="return 1") == (
        "<PRE> def f( <SUF>return 1 <MID>")
    assert render_generate(DEFAULT_TEMPLATE, system=None, prompt="more", context_text="earlier ") == "earlier more"
    assert render_generate(ZEPHYR, system=None, prompt="q", response="Sure,") == "<|user|>\nq</s>\n<|assistant|>\nSure,"
    hist = [{"role": "user", "content": "h1"}, {"role": "assistant", "content": "h2"}]
    assert render_generate(ZEPHYR, system=None, prompt="q", history=hist) == (
        "<|user|>\nh1</s>\n<|assistant|>\nh2</s><|user|>\nq</s>\n<|assistant|>\n")


def test_think_flags() -> None:
    t = "{{ .Think }}/{{ .ThinkLevel }}/{{ .IsThinkSet }}{{ range .Messages }}{{ end }}"
    one = [{"role": "user", "content": "q"}]
    assert render_chat(t, messages=one, system=None, tools=None) == "false//false"
    assert render_chat(t, messages=one, system=None, tools=None, think=True) == "true/medium/true"
    assert render_chat(t, messages=one, system=None, tools=None, think=False) == "false//true"
    assert render_chat(t, messages=one, system=None, tools=None, think="high") == "true/high/true"
    assert render_generate("{{ .Think }}{{ .Prompt }}", system=None, prompt="p", think=True) == "truep"


def test_tool_shapes() -> None:
    t = "{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Arguments }}{{ json . }}{{ end }}{{ end }}"
    msgs = [{"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "f", "arguments": '{"b": 2, "a": {"y": 1, "x": 0}}'}}]}]
    assert render_chat(t, messages=msgs, system=None, tools=None) == (
        '{"b":2,"a":{"x":0,"y":1}}{"function":{"index":0,"name":"f","arguments":{"b":2,"a":{"x":0,"y":1}}}}')
    assert render_chat("{{ .Tools }}{{ .Messages }}", messages=[], system=None, tools=None) == "null[]"
    assert render_chat("{{ .Tools }}{{ .Messages }}", messages=[], system=None, tools=[]) == "[][]"
    tool = {"type": "function", "strict": True, "function": {"name": "n", "parameters": {
        "type": "object", "additionalProperties": False, "properties": {"p": {"type": ["string", "null"]}}}}}
    got = render_chat("{{ range .Tools }}{{ . }}|{{ range .Function.Parameters.Properties }}{{ .Type }}"
                      "{{ toTypeScriptType . }}{{ end }}{{ end }}{{ .Messages }}",
                      messages=[], system=None, tools=[tool])
    assert got == ('{"type":"function","function":{"name":"n","parameters":{"type":"object","properties":'
                   '{"p":{"type":["string","null"]}}}}}|[string null]string | null[]')


@pytest.mark.parametrize(("messages", "tools"), [
    ([{"role": "user", "content": 3}], None),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]}], None),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}], None),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": 5}}]),
    ([{"role": "user", "content": "x"}], [{"function": {"parameters": {"properties": {"p": {"type": 1}}}}}]),
    ("nope", None),
])
def test_bad_input_is_a_template_error(messages: Any, tools: Any) -> None:
    with pytest.raises(PromptInputError):
        render_chat(QWEN25, messages=messages, system=None, tools=tools)


def test_parse_template() -> None:
    assert not uses_messages(LLAMA3_LEGACY) and uses_messages(QWEN25)
    assert "response" in parse_template("{{ .Prompt }}").identifiers  # {{ .Response }} appended
    assert parse_template(None) is parse_template(DEFAULT_TEMPLATE)
    with pytest.raises(TemplateError):
        parse_template("{{ if .System }}no end")
    with pytest.raises(TemplateError):
        render_chat("{{ index .Messages 5 }}", messages=[{"role": "user", "content": "x"}], system=None,
                    tools=None)


# --------------------------------------------------------------------------------------------------
# Fuzzing: any text either renders or raises TemplateError, quickly

_ALPHABET = st.sampled_from(list("{}{}{{}}-  .$|()\"'`:=,/*\n\t") + list(string.ascii_letters[:8]) + [
    "{{", "}}", "{{-", " -}}", "if", "else", "end", "range", "with", "break", "continue", "eq", "len", "index",
    "slice", "printf", "json", "not", "and", "or", ".A", ".L", ".M", "$x", "$", ":=", "1", "-2", "0x1",
    "1e3", "'a'", '"s"', "%d", "%s", "nil", "true", "99999999999999999999", "\\", "\ud800", "é",
])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_fuzz_render_or_template_error(src: str) -> None:
    try:
        out = parse(src).render(D, max_steps=5_000, max_output=20_000)
    except TemplateError:
        return
    assert isinstance(out, str) and len(out) <= 20_000


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_random_text_and_chat(src: str) -> None:
    try:
        render_chat(src, messages=[{"role": "user", "content": src}], system="s", tools=TOOLS)
    except TemplateError:
        pass
