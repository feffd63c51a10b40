"""Constrained decoding for Ollama's ``format``: random logits must still yield valid JSON."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from omx.models import constrain
from omx.models.constrain import (
    Constraint,
    ConstraintError,
    FormatError,
    GrammarCompiler,
    apply_masks,
    validate_format,
)

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
MODEL_VOCAB = 320  # > len(tokenizer): ids 261..319 are embedding padding, like real checkpoints
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable-char table used by the ByteLevel pre-tokenizer/decoder."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    chars = _byte_chars()
    tk = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[4]
    )


@pytest.fixture(scope="module")
def eos(tok: PreTrainedTokenizerFast) -> list[int]:
    return tok.convert_tokens_to_ids(["<|end_of_text|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def compiler(tok: PreTrainedTokenizerFast, eos: list[int]) -> GrammarCompiler:
    return GrammarCompiler(tok, vocab_size=MODEL_VOCAB, eos_token_ids=eos)


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _decode_batch(
    compiler: GrammarCompiler,
    tok: PreTrainedTokenizerFast,
    fmt: object,
    seed: int,
    *,
    batch: int = 8,
    max_tokens: int = 400,
    closer_bias: float = 0.0,
) -> list[tuple[Constraint, str]]:
    """Masked multinomial sampling from random logits, as the engine does; EOS ends a row."""
    gen = torch.Generator().manual_seed(seed)
    closers = torch.tensor(_ids(tok, '"}]'))
    eos = set(compiler.eos_token_ids)
    rows = [compiler.constraint(fmt) for _ in range(batch)]
    out: list[list[int]] = [[] for _ in range(batch)]
    ended = [False] * batch
    for _ in range(max_tokens):
        for i, c in enumerate(rows):
            ended[i] = ended[i] or c.is_done()
        if all(ended):
            break
        logits = torch.randn(batch, MODEL_VOCAB, generator=gen) * 3
        logits[:, closers] += closer_bias  # a "model" that wants to finish, mildly
        apply_masks(logits, rows)
        picks = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1).tolist()
        for i, (c, t) in enumerate(zip(rows, picks, strict=True)):
            if ended[i]:
                continue
            c.consume(t)
            if t in eos:
                ended[i] = True
            else:
                out[i].append(t)
    return [(c, tok.decode(o)) for c, o in zip(rows, out, strict=True)]


# --- validate_format ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [None, ""])
def test_absent_format_is_unconstrained(fmt: object, compiler: GrammarCompiler) -> None:
    assert validate_format(fmt) is None
    assert compiler.constraint(fmt) is None


def test_json_and_schema_formats_pass() -> None:
    assert validate_format("json") == "json"
    assert validate_format(SCHEMA) is SCHEMA
    assert validate_format({}) == {}  # Ollama accepts any object; {} is "any JSON value"


@pytest.mark.parametrize(
    ("fmt", "raw"),
    [("xml", r'"\"xml\""'), (5, '"5"'), ([1], '"[1]"'), ("JSON", r'"\"JSON\""'), (True, '"true"')],
)
def test_invalid_format_uses_ollama_message(fmt: object, raw: str) -> None:
    with pytest.raises(FormatError) as err:
        validate_format(fmt)
    assert str(err.value) == f'invalid format: {raw}; expected "json" or a valid JSON Schema object'
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("schema", [{"type": 12}, {"type": "bogus"}, {"$ref": "#/nope"}])
def test_invalid_schema_rejected(schema: dict, compiler: GrammarCompiler) -> None:
    with pytest.raises(FormatError, match=r"^invalid JSON schema in format: "):
        validate_format(schema)
    with pytest.raises(FormatError):
        compiler.constraint(schema)


def test_unsupported_keywords_are_ignored_like_llama_cpp() -> None:
    assert validate_format({"type": "string", "not": {"const": "x"}})


# --- decoding ----------------------------------------------------------------------------------


def test_json_random_logits_terminate_as_objects(
    compiler: GrammarCompiler, tok: PreTrainedTokenizerFast
) -> None:
    for seed in range(4):
        for c, text in _decode_batch(compiler, tok, "json", seed, closer_bias=3.0):
            assert c.is_done(), text
            assert isinstance(json.loads(text), dict), text


def test_json_pure_random_logits_stay_valid(compiler: GrammarCompiler, tok: PreTrainedTokenizerFast) -> None:
    """Unbiased noise wanders in strings (~1/146 chance of `"` per step); whatever ends is valid."""
    results = [r for seed in range(100, 103) for r in _decode_batch(compiler, tok, "json", seed)]
    done = [text for c, text in results if c.is_done()]
    for text in done:
        assert isinstance(json.loads(text), dict), text
    assert len(done) >= len(results) // 2
    assert all(c.error is None for c, _ in results)


def test_schema_random_logits_validate(compiler: GrammarCompiler, tok: PreTrainedTokenizerFast) -> None:
    for seed in range(3):
        for c, text in _decode_batch(compiler, tok, SCHEMA, seed):
            assert c.is_done(), text
            obj = json.loads(text)
            assert list(obj) == ["name", "age"], text
            assert isinstance(obj["name"], str) and len(obj["name"]) <= 8, text
            assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool), text


def test_mask_semantics(compiler: GrammarCompiler, tok: PreTrainedTokenizerFast, eos: list[int]) -> None:
    c = compiler.constraint("json")
    logits = torch.zeros(MODEL_VOCAB)
    c.fill_mask(logits)  # 1-D row
    assert torch.isfinite(logits).nonzero().flatten().tolist() == _ids(tok, "{")  # no leading space
    for t in _ids(tok, '{"a":1'):
        c.consume(t)
    logits = torch.zeros(1, MODEL_VOCAB)
    c.fill_mask(logits)
    allowed = set(torch.isfinite(logits[0]).nonzero().flatten().tolist())
    assert set(_ids(tok, "}")) <= allowed and not allowed & set(eos)  # not yet complete
    assert not allowed & set(range(256, MODEL_VOCAB))  # specials and padding ids never allowed
    c.consume(_ids(tok, "}")[0])
    assert c.is_done() and c.is_accepting()  # nothing can follow a closed object
    logits = torch.zeros(1, MODEL_VOCAB)
    c.fill_mask(logits)
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == set(eos)
    c.consume(eos[1])
    assert c.is_done() and c.error is None


def test_whitespace_is_bounded(compiler: GrammarCompiler, tok: PreTrainedTokenizerFast) -> None:
    c = compiler.constraint("json")
    for t in _ids(tok, "{\n" + " " * 20):
        c.consume(t)
    logits = torch.zeros(1, MODEL_VOCAB)
    c.fill_mask(logits)
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == set(_ids(tok, '"}'))


def test_rejected_token_raises_and_row_falls_back_to_eos(
    compiler: GrammarCompiler, tok: PreTrainedTokenizerFast, eos: list[int]
) -> None:
    c = compiler.constraint(SCHEMA)
    with pytest.raises(ConstraintError, match="format constraint failed"):
        c.consume(_ids(tok, "x")[0])
    assert c.error and not c.is_done() and not c.is_accepting()
    with pytest.raises(ConstraintError):
        c.consume(_ids(tok, "{")[0])  # stays failed
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_masks(logits, [c])
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == set(eos)
    bad = compiler.constraint("json")
    with pytest.raises(ConstraintError, match="out of range"):
        bad.consume(10**6)


def test_mixed_batch_and_wider_logits(compiler: GrammarCompiler, tok: PreTrainedTokenizerFast) -> None:
    wide = MODEL_VOCAB + 70  # logits wider than the compiler's vocab: extra columns are disallowed
    logits = torch.randn(3, wide)
    before = logits.clone()
    rows = [None, compiler.constraint("json"), None]
    apply_masks(logits, rows)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == _ids(tok, "{")
    with pytest.raises(ValueError):
        apply_masks(logits, rows[:2])


def test_grammar_cache_and_independent_states(
    compiler: GrammarCompiler, tok: PreTrainedTokenizerFast
) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    before = compiler.cache_info()
    a = compiler.constraint(schema)
    b = compiler.constraint(dict(schema))
    info = compiler.cache_info()
    assert info["misses"] == before["misses"] + 1 and info["hits"] == before["hits"] + 1
    for t in _ids(tok, '{"k":true}'):
        a.consume(t)
    assert a.is_done() and not b.is_done()


def test_mask_overhead_batch8(compiler: GrammarCompiler, tok: PreTrainedTokenizerFast) -> None:
    """Guards against pathologies only; the measured figure is printed (pytest -s)."""
    rows = [compiler.constraint(f) for f in ["json", SCHEMA] * 4]
    for c, prefix in zip(rows, ['{"ab', '{"name": "x'] * 4, strict=True):
        for t in _ids(tok, prefix):
            c.consume(t)
    base = torch.randn(8, MODEL_VOCAB)
    times = []
    for _ in range(200):
        logits = base.clone()
        t0 = time.perf_counter()
        apply_masks(logits, rows)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"apply_masks batch 8, vocab {MODEL_VOCAB}: median {med * 1e6:.0f} us/step")
    assert med < 0.02
    assert constrain.PARALLEL_MIN_ROWS >= 1


def test_parallel_fill_matches_serial(
    compiler: GrammarCompiler, tok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    def batch() -> list[Constraint | None]:
        rows: list[Constraint | None] = [compiler.constraint(f) for f in ["json", SCHEMA, "json", SCHEMA]]
        for c, prefix in zip(rows, ['{"a":', '{"name": "x', '{"b": [tr', "{"], strict=True):
            for t in _ids(tok, prefix):
                c.consume(t)
        return [rows[0], None, rows[1], rows[2], rows[3]]

    base = torch.randn(5, MODEL_VOCAB)
    serial, parallel = base.clone(), base.clone()
    monkeypatch.setattr(constrain, "PARALLEL_MIN_ROWS", 1 << 30)
    apply_masks(serial, batch())
    monkeypatch.setattr(constrain, "PARALLEL_MIN_ROWS", 2)
    apply_masks(parallel, batch())
    assert torch.equal(serial, parallel)
    assert torch.equal(parallel[1], base[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [70, 96, 130])
def test_apply_bitmask_matches_bit_semantics(dtype: torch.dtype, vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=gen)  # 96 bits
    logits = torch.randn(3, vocab, generator=gen).to(dtype)
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(3, -1).bool()
    allowed = torch.zeros(3, vocab, dtype=torch.bool)
    allowed[:, : min(vocab, 96)] = bits[:, :vocab]
    expect = logits.masked_fill(~allowed, float("-inf"))
    constrain.apply_bitmask_inplace(logits, bitmask)
    assert torch.equal(logits, expect)
