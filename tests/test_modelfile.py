"""Modelfile parsing, typed parameters and the /api/show rendering."""

from __future__ import annotations

import math

import pytest

from omx.protocols.modelfile import (
    ERR_INVALID_COMMAND,
    ERR_INVALID_ROLE,
    ERR_NO_FROM,
    ModelfileError,
    format_modelfile,
    format_parameters,
    go_float,
    parse_modelfile,
    parse_parameter,
)

FULL = '''# a comment
FROM llama3.2

  # indented comment
parameter temperature 0.7
PARAMETER stop <|start_header_id|>
PARAMETER stop "<|eot_id|>"
PARAMETER num_ctx 4096
PARAMETER num_ctx 8192
PARAMETER use_mmap false
TEMPLATE """{{ if .System }}<|system|>{{ .System }}{{ end }}
{{ .Prompt }} "quoted" # not a comment
"""
System You are Mario.
MESSAGE user Is Toronto in Canada?
message Assistant """yes"""
LICENSE """MIT
license text"""
LICENSE Apache-2.0
ADAPTER ./lora.gguf
'''


def test_full_modelfile() -> None:
    mf = parse_modelfile(FULL)
    assert mf.from_ == "llama3.2"
    assert mf.parameters == {"temperature": 0.7, "stop": ["<|start_header_id|>", "<|eot_id|>"],
                             "num_ctx": 8192, "use_mmap": False}
    assert mf.template == ('{{ if .System }}<|system|>{{ .System }}{{ end }}\n'
                           '{{ .Prompt }} "quoted" # not a comment\n')
    assert mf.system == "You are Mario."
    assert mf.messages == [{"role": "user", "content": "Is Toronto in Canada?"},
                           {"role": "assistant", "content": "yes"}]
    assert mf.license == ["MIT\nlicense text", "Apache-2.0"]
    assert mf.adapters == ["./lora.gguf"]
    assert mf.create_request() == {
        "from": "llama3.2", "template": mf.template, "system": "You are Mario.", "parameters": mf.parameters,
        "license": mf.license, "messages": mf.messages,
    }


def test_crlf_tabs_and_single_quoted_multiline() -> None:
    mf = parse_modelfile('FROM\tm\r\nSYSTEM "line one\r\n  line two "\r\nTEMPLATE \t {{ .Prompt }}  \r\n')
    assert mf.from_ == "m"
    assert mf.system == "line one\n  line two "
    assert mf.template == "{{ .Prompt }}"


def test_quotes_close_only_at_a_line_end() -> None:
    # Like Ollama, a value that opens a quote runs on until a line ends with the closing quote.
    mf = parse_modelfile('FROM m\nSYSTEM """a""" b\nc"""\n')
    assert mf.system == 'a""" b\nc'
    assert parse_modelfile('FROM m\nSYSTEM """"""').system == ""
    assert parse_modelfile('FROM m\nSYSTEM say "hi"').system == 'say "hi"'


@pytest.mark.parametrize(("text", "line", "msg"), [
    ("FROM m\nPARAMETER foo 1", 2, "unknown parameter 'foo'"),
    ("FROM m\n\nPARAMETER num_ctx 1.5", 3, "invalid int value [1.5]"),
    ("FROM m\nPARAMETER temperature hot", 2, "invalid float value [hot]"),
    ("FROM m\nPARAMETER temperature 1e39", 2, "invalid float value [1e39]"),
    ("FROM m\nPARAMETER use_mmap yes", 2, "invalid bool value [yes]"),
    ("FROM m\nPARAMETER num-ctx 1", 2, "invalid parameter name 'num-ctx'"),
    ("FROM m\nPARAMETER num_ctx", 2, "missing value for PARAMETER num_ctx"),
    ("FROM m\nMESSAGE tool hi", 2, ERR_INVALID_ROLE),
    ("FROM m\nMESSAGE user: hi", 2, ERR_INVALID_ROLE),
    ("FROM m\nINSTRUCTION x", 2, ERR_INVALID_COMMAND),
    ("FROM m\nFROM2 x", 2, ERR_INVALID_COMMAND),
    ("FROM m\n{{ .Prompt }}", 2, ERR_INVALID_COMMAND),
    ("FROM", 1, "missing value for FROM"),
    ("FROM   ", 1, "missing value for FROM"),
    ('FROM m\n\nTEMPLATE """{{ .Prompt }}\nno end', 3, "unterminated quoted string"),
    ('FROM m\nSYSTEM "open', 2, "unterminated quoted string"),
])
def test_errors_carry_line_numbers(text: str, line: int, msg: str) -> None:
    with pytest.raises(ModelfileError) as e:
        parse_modelfile(text)
    assert (e.value.line, e.value.msg) == (line, msg)
    assert str(e.value) == f"line {line}: {msg}"


def test_missing_from() -> None:
    with pytest.raises(ModelfileError) as e:
        parse_modelfile("SYSTEM hi\n")
    assert str(e.value) == ERR_NO_FROM and e.value.line is None
    assert parse_modelfile("SYSTEM hi", require_from=False).system == "hi"
    assert parse_modelfile("", require_from=False).from_ == ""
    with pytest.raises(ModelfileError):
        parse_modelfile("")


def test_deprecated_parameters_are_warned_and_dropped() -> None:
    mf = parse_modelfile("FROM m\nPARAMETER mirostat 2\nPARAMETER penalize_newline true")
    assert mf.parameters == {}
    assert mf.warnings == ["parameter mirostat is deprecated", "parameter penalize_newline is deprecated"]


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("num_ctx", "+5", 5), ("seed", "-1", -1), ("num_predict", "9223372036854775807", 2**63 - 1),
    ("top_p", ".5", 0.5), ("temperature", "1e-3", 0.001), ("min_p", "0", 0.0), ("repeat_penalty", "1.", 1.0),
    ("use_mmap", "TRUE", True), ("use_mmap", "0", False), ("stop", "a b", ["a b"]),
])
def test_parse_parameter(name: str, raw: str, value: object) -> None:
    assert parse_parameter(name, raw) == value
    assert type(parse_parameter(name, raw)) is type(value)


def test_parse_parameter_special_floats_and_limits() -> None:
    assert math.isinf(parse_parameter("temperature", "Inf"))
    assert math.isnan(parse_parameter("temperature", "nan"))
    for name, raw in (("num_ctx", "9223372036854775808"), ("num_ctx", "1_000"), ("num_ctx", " 1"),
                      ("num_ctx", ""), ("top_k", "0x10"), ("temperature", "1,5"), ("temperature", "")):
        with pytest.raises(ModelfileError):
            parse_parameter(name, raw)


def test_format_parameters_like_ollama_show() -> None:
    text = format_parameters({"stop": ["<|eot_id|>", 'say "x"'], "num_ctx": 4096, "temperature": 0.7})
    assert text.splitlines() == [
        "num_ctx" + " " * 24 + "4096",
        "stop" + " " * 27 + '"<|eot_id|>"',
        "stop" + " " * 27 + '"say \\"x\\""',
        "temperature" + " " * 20 + "0.7",
    ]
    assert format_parameters({}) == ""


def test_format_modelfile_round_trips() -> None:
    template = '{{ .System }}\n{{ .Prompt }} "q"'
    text = format_modelfile(
        from_="/models/blobs/sha256-abc", short_name="m:latest", template=template, system=" padded ",
        parameters={"stop": ["<|end|>", " "], "num_ctx": 2048, "top_p": 0.9}, license=["MIT\ntext"],
        messages=[{"role": "user", "content": "hi\nthere"}], adapters=["/a/lora"],
    )
    assert text.startswith('# Modelfile generated by "ollama show"\n'
                           "# To build a new Modelfile based on this, replace FROM with:\n"
                           "# FROM m:latest\n\nFROM /models/blobs/sha256-abc\n")
    assert 'TEMPLATE """{{ .System }}' in text and 'SYSTEM " padded "' in text
    mf = parse_modelfile(text)
    assert mf.from_ == "/models/blobs/sha256-abc"
    assert (mf.template, mf.system) == (template, " padded ")
    assert (mf.license, mf.adapters) == (["MIT\ntext"], ["/a/lora"])
    assert mf.parameters == {"stop": ["<|end|>", " "], "num_ctx": 2048, "top_p": 0.9}
    assert mf.messages == [{"role": "user", "content": "hi\nthere"}]


@pytest.mark.parametrize(("v", "text"), [(4096, "4096"), (0.7, "0.7"), (1e-5, "1e-05"), (1e6, "1e+06"),
                                         (123456.0, "123456"), (0.0001, "0.0001"), (-2.5, "-2.5"),
                                         (1234567, "1.234567e+06"), (1e21, "1e+21"), (0.0, "0")])
def test_go_float(v: float, text: str) -> None:
    assert go_float(v) == text
