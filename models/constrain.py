"""Ollama ``format`` (``"json"`` or a JSON schema) as grammar-constrained decoding via llguidance.

Flow: the request handler calls :func:`validate_format` (or ``GrammarCompiler.constraint`` directly)
so bad formats fail fast with Ollama's error text; the decode loop calls :func:`apply_masks` once per
step for the whole batch, samples, then ``Constraint.consume`` for each constrained row and ends the
sequence with done_reason ``"stop"`` once ``Constraint.is_done()``.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import llguidance
import llguidance.hf
import torch
from llguidance import LLMatcher

__all__ = [
    "JSON_WHITESPACE",
    "Constraint",
    "ConstraintError",
    "FormatError",
    "GrammarCompiler",
    "apply_bitmask_inplace",
    "apply_masks",
    "validate_format",
]

FormatSpec = Literal["json"] | dict[str, Any]

# llama.cpp's json.gbnf `ws`: one space, or a newline plus up to 20 indent chars. llguidance's default
# (any run of whitespace) lets a model emit newlines forever, the classic JSON-mode hang.
JSON_WHITESPACE = r"(?: |\n[ \t]{0,20})?"

# Ollama's "json" is llama.cpp's json.gbnf, whose root is an object.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# verbose errors dump parser state and the whole schema into the message; keep client errors short.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class FormatError(ValueError):
    """The request's ``format`` is not ``"json"`` nor a usable JSON schema (an HTTP 400)."""


class ConstraintError(RuntimeError):
    """A sampled token broke the grammar, or the grammar hit a resource limit mid-decode."""


def _go_quote(s: str) -> str:
    """Go's ``%q``, so our error text is byte-identical to Ollama's."""
    esc = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\n": r"\n", "\r": r"\r", "\t": r"\t", "\v": r"\v"}
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in esc:
            out.append(esc[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _clean(msg: str) -> str:
    """llguidance errors are multi-line with a ``<non-verbose/>`` trailer; clients get one line."""
    return " ".join(msg.replace("<non-verbose/>", " ").split())


def _raw_json(obj: object) -> str:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(obj)


def _schema_key(schema: dict[str, Any]) -> str:
    # no sort_keys: property order is part of the grammar (llguidance emits properties in schema order)
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FormatError(f"invalid JSON schema in format: {e}") from None


def _json_options(whitespace_pattern: str | None, lenient: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {"lenient": lenient}
    if whitespace_pattern is not None:
        opts["whitespace_pattern"] = whitespace_pattern
    return opts


def _grammar_for(key: str, whitespace_pattern: str | None, lenient: bool) -> str:
    try:
        return LLMatcher.grammar_from_json_schema(key, defaults=_json_options(whitespace_pattern, lenient))
    except ValueError as e:
        raise FormatError(f"invalid JSON schema in format: {_clean(str(e))}") from None


_validated: OrderedDict[str, str] = OrderedDict()  # schema key -> "" or error text
_validated_lock = threading.Lock()


def validate_format(fmt: object) -> Literal["json"] | dict[str, Any] | None:
    """Normalise a request's ``format`` with Ollama's rules; raise :class:`FormatError` if unusable.

    ``None``/``""`` mean unconstrained, ``"json"`` any JSON object, a dict a JSON schema (compiled once
    here, tokenizer-free, so a broken schema is a 400 before it reaches the decode loop).
    """
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return "json"
    if not isinstance(fmt, dict):
        raise FormatError(
            f'invalid format: {_go_quote(_raw_json(fmt))}; expected "json" or a valid JSON Schema object'
        )
    key = _schema_key(fmt)
    with _validated_lock:
        err = _validated.get(key)
        if err is not None:
            _validated.move_to_end(key)
    if err is None:
        grammar = _grammar_for(key, JSON_WHITESPACE, True)
        is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_LIMITS)
        err = _clean("; ".join(msgs)) if is_error else ""  # warnings (e.g. ignored keywords) are fine
        with _validated_lock:
            _validated[key] = err
            while len(_validated) > 256:
                _validated.popitem(last=False)
    if err:
        raise FormatError(f"invalid JSON schema in format: {err}")
    return fmt


class GrammarCompiler:
    """Per-model llguidance tokenizer plus an LRU of compiled grammars (clients resend the same schema).

    Building the token trie costs up to ~1 s on 100k+ vocabularies and compiling a grammar ~1 ms, while
    ``LLMatcher.deep_copy`` of a fresh template costs microseconds, so each format is compiled once and
    every sequence gets a copy.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        eos_token_ids: int | Sequence[int] | None = None,
        cache_size: int = 64,
        whitespace_pattern: str | None = JSON_WHITESPACE,
        lenient: bool = True,
    ) -> None:
        """``vocab_size`` is the model's logits width; ids past the tokenizer are padding, never allowed.

        ``eos_token_ids`` are the ids allowed once the JSON is complete (default: the tokenizer's EOS).
        ``lenient`` ignores JSON-schema keywords llguidance cannot enforce, like llama.cpp does.
        """
        if isinstance(eos_token_ids, int):
            eos = [eos_token_ids]
        elif eos_token_ids is not None:
            eos = [int(i) for i in eos_token_ids]
        else:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # llguidance refuses n_vocab < tokenizer size; ids >= vocab_size are cut off again when masking.
        self.vocab_size = max(int(vocab_size or 0), len(tokenizer))
        if not eos or not all(0 <= t < self.vocab_size for t in eos):
            raise ValueError(f"constrained decoding needs EOS token ids in [0, {self.vocab_size}), got {eos}")
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        self.n_words = (self.vocab_size + 31) // 32
        self.whitespace_pattern = whitespace_pattern
        self.lenient = lenient
        self.cache_size = cache_size
        self._cache: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        words = [0] * self.n_words
        for t in self.eos_token_ids:
            words[t // 32] |= 1 << (t % 32)
        self._eos_row = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "size": len(self._cache)}

    def _template(self, fmt: FormatSpec) -> LLMatcher:
        key = _schema_key(fmt) if isinstance(fmt, dict) else "json"
        with self._lock:
            tmpl = self._cache.get(key)
            if tmpl is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return tmpl
            self._misses += 1
        schema = _schema_key(_ANY_OBJECT) if key == "json" else key
        grammar = _grammar_for(schema, self.whitespace_pattern, self.lenient)
        tmpl = LLMatcher(self.tokenizer, grammar, log_level=0, limits=_LIMITS)
        if tmpl.is_error():
            raise FormatError(f"invalid JSON schema in format: {_clean(tmpl.get_error())}")
        with self._lock:
            self._cache[key] = tmpl
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return tmpl

    def constraint(self, fmt: object) -> Constraint | None:
        """A fresh per-sequence constraint for a raw request ``format`` (None when unconstrained)."""
        spec = validate_format(fmt)
        if spec is None:
            return None
        return Constraint(self._template(spec).deep_copy(), self)


class Constraint:
    """Grammar state of one sequence. Not thread-safe; owned by the decode loop."""

    __slots__ = ("_compiler", "_matcher", "error", "n_tokens")

    def __init__(self, matcher: LLMatcher, compiler: GrammarCompiler) -> None:
        self._matcher = matcher
        self._compiler = compiler
        self.error: str | None = None  # set once the grammar failed; the mask then allows only EOS
        self.n_tokens = 0

    def _check(self) -> None:
        if self.error is None and self._matcher.is_error():
            self.error = f"format constraint failed: {_clean(self._matcher.get_error())}"

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write this sequence's allowed-token bits into row ``index`` of a CPU int32 bitmask."""
        if self.error is not None or self._matcher.is_stopped():
            bitmask[index].copy_(self._compiler._eos_row)
            return
        _fill_row(self._matcher, bitmask, index)
        self._check()

    def fill_mask(self, logits: torch.Tensor) -> None:
        """Set disallowed entries of one logits row (shape ``[V]`` or ``[1, V]``) to -inf, in place."""
        apply_masks(logits.view(1, -1), [self])

    def consume(self, token_id: int) -> None:
        """Advance the grammar; raises :class:`ConstraintError` (and sets ``error``) on a rejected token."""
        if self.error is None:
            try:
                ok = self._matcher.consume_token(int(token_id))
            except Exception as e:  # API misuse inside llguidance: report, don't kill the decode loop
                ok, self.error = False, f"format constraint failed: {e}"
            if ok:
                self.n_tokens += 1
            else:
                self._check()
                if self.error is None:
                    self.error = f"format constraint failed: token {int(token_id)} rejected"
        if self.error is not None:
            raise ConstraintError(self.error)

    def is_done(self) -> bool:
        """True once the JSON is complete: nothing but EOS may follow, or EOS was consumed."""
        return self.error is None and self._matcher.is_stopped() and not self._matcher.is_error()

    def is_accepting(self) -> bool:
        """True when stopping now (EOS, num_predict) leaves valid output, e.g. after ``{"a":1}``."""
        return self.error is None and self._matcher.is_accepting()


# llguidance's rayon pool only pays off with spare cores: on small CPU-only hosts its spinning threads
# fight torch's OpenMP threads, and a mask row costs only ~5-50 us anyway.
PARALLEL_MIN_ROWS = 4 if (os.cpu_count() or 1) >= 8 else 1 << 30

_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()
_luts: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _fill_row(matcher: LLMatcher, bitmask: torch.Tensor, index: int) -> None:
    """``llguidance.torch.fill_next_token_bitmask`` without importing that module.

    ``llguidance.torch`` applies ``torch.compile`` at import, which pulls in torch._dynamo: +3 s of
    runner start-up for two one-line pointer wrappers.
    """
    row = bitmask[index]
    if bitmask.dtype != torch.int32 or not bitmask.is_cpu or not row.is_contiguous():
        raise ValueError("bitmask must be a contiguous CPU int32 tensor")
    matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)


def _get_executor() -> llguidance.LLExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def _bias_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """byte -> 8 additive biases (0 allowed, -inf not), little-endian bit order like the bitmask."""
    lut = _luts.get((device, dtype))
    if lut is None:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        lut = torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)
        _luts[(device, dtype)] = lut
    return lut


def apply_bitmask_inplace(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Same result as ``llguidance.torch.apply_token_bitmask_inplace`` for finite logits; eager.

    The llguidance kernel is ``torch.compile``d (~18 s of inductor compile on first CPU use, stalling
    the first constrained request) and on CPU ``masked_fill_`` over [8, 128k] alone costs ~3 ms; a byte
    lookup into an additive 0/-inf bias is ~9x faster and ships only the packed bits to the device.
    Logit columns beyond the bitmask's width are disallowed.
    """
    rows, vocab = logits.shape
    packed = bitmask.contiguous().to(logits.device, non_blocking=False).view(torch.uint8).view(-1)
    bias = _bias_lut(logits.device, logits.dtype).index_select(0, packed.int()).view(rows, -1)
    width = min(vocab, bias.shape[1])
    logits[:, :width].add_(bias[:, :width])
    if vocab > width:
        logits[:, width:] = float("-inf")


def apply_masks(logits: torch.Tensor, constraints: Sequence[Constraint | None]) -> None:
    """Mask a ``[B, V]`` logits batch in place; row ``i`` follows ``constraints[i]`` (None = free).

    One bitmask for all constrained rows (filled on llguidance's thread pool, GIL released, when the
    batch and host are big enough), one host->device copy, one masked_fill. A finished or failed row
    allows only EOS, so the loop always has a token to sample.
    """
    if logits.dim() != 2 or logits.shape[0] != len(constraints):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(constraints)} constraints")
    active = [(i, c) for i, c in enumerate(constraints) if c is not None]
    if not active:
        return
    n_words = active[0][1]._compiler.n_words
    bitmask = torch.full((len(active), n_words), -1, dtype=torch.int32)
    live: list[tuple[LLMatcher, int]] = []
    for k, (_, c) in enumerate(active):
        if c._compiler.n_words != n_words:
            raise ValueError("constraints from different GrammarCompilers in one batch")
        if c.error is not None or c._matcher.is_stopped():
            bitmask[k].copy_(c._compiler._eos_row)
        else:
            live.append((c._matcher, k))
    if len(live) >= PARALLEL_MIN_ROWS:
        _get_executor().unsafe_compute_mask_ptr(live, bitmask.data_ptr(), n_words * 4, len(active))
    else:
        for matcher, k in live:
            _fill_row(matcher, bitmask, k)
    for _, k in live:
        c = active[k][1]
        c._check()
        if c.error is not None:
            bitmask[k].copy_(c._compiler._eos_row)
    rows = [i for i, _ in active]
    if rows == list(range(logits.shape[0])):
        apply_bitmask_inplace(logits, bitmask)
    else:
        index = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, index)
        apply_bitmask_inplace(sub, bitmask)
        logits.index_copy_(0, index, sub)
