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
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

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


# the keywords through which llguidance's grammar reaches a sub-schema (it ignores "not", "if", unused $defs)
_ONE_SUB = ("additionalProperties", "additionalItems", "items")
_LIST_SUB = ("items", "prefixItems", "allOf", "anyOf", "oneOf")
_MAP_SUB = ("properties", "patternProperties")
_COMBINATORS = ("$ref", "allOf", "anyOf", "oneOf")
# keywords that make a `$ref` mean something other than a JSON pointer into the whole document
_REF_BASES = ("$id", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor")
# llguidance compiles a schema recursively, one native stack frame set per sub-schema on a path: a chain of
# ~2000 `$ref`s overflows the 8 MiB stack and kills the whole process (a segfault, not an exception).
MAX_SCHEMA_DEPTH = 256  # sub-schemas on the longest path through nesting and local `$ref`s
MAX_OPAQUE_OBJECTS = 512  # objects in a schema whose `$ref`s we do not resolve: bounds any path there
MAX_SCHEMA_OBJECTS = 10_000  # bounds the time a check takes (tens of us an object); OpenAI allows 5000 properties


def _resolve_ref(root: dict[str, Any], ref: object) -> object:
    """The sub-schema a local ``$ref`` ("#", "#/$defs/x") points at; None when it points at nothing."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    pointer = unquote(ref[1:])
    if not pointer.startswith("/"):
        return root if not pointer else None
    node: object = root
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _scan_schema(root: dict[str, Any]) -> tuple[bool, int]:
    """(every `$ref` is a JSON pointer into this document, how many objects the document holds, counted up
    to just past MAX_SCHEMA_OBJECTS)."""
    local, objects = True, 0
    stack: list[object] = [root]
    while stack and objects <= MAX_SCHEMA_OBJECTS:
        node = stack.pop()
        if isinstance(node, dict):
            objects += 1
            ref = node.get("$ref", "#")
            if (any(k in node for k in _REF_BASES) or not isinstance(ref, str)
                    or not (ref == "#" or ref.startswith("#/"))):
                local = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return local, objects


@dataclass
class _SchemaGraph:
    """The sub-schemas llguidance compiles (by id()), where each sits, and the edges between them."""

    where: dict[int, str]  # JSON pointer of each, in discovery order
    children: dict[int, list[int]]  # nested sub-schemas and `$ref` targets
    needs: dict[int, list[list[object]]]  # `$ref`/allOf/anyOf/oneOf nodes: groups, each needing a member that
                                          # can produce a value


def _schema_graph(root: dict[str, Any]) -> _SchemaGraph:
    """Walk root as llguidance compiles it (iteratively: the point is to find paths too deep to recurse)."""
    g = _SchemaGraph({}, {}, {})
    stack: list[tuple[object, str]] = [(root, "#")]
    while stack:
        node, at = stack.pop()
        if not isinstance(node, dict) or id(node) in g.where:
            continue
        g.where[id(node)] = at
        subs: list[tuple[object, str]] = [(node[k], f"{at}/{k}") for k in _ONE_SUB if k in node]
        for k in _LIST_SUB:
            if isinstance(node.get(k), list):
                subs += [(v, f"{at}/{k}/{i}") for i, v in enumerate(node[k])]
        for k in _MAP_SUB:
            if isinstance(node.get(k), dict):
                subs += [(v, f"{at}/{k}/{name.replace('~', '~0').replace('/', '~1')}") for name, v in node[k].items()]
        need: list[list[object]] = []
        if "$ref" in node:
            target = _resolve_ref(root, node["$ref"])
            if isinstance(target, dict | bool):
                need.append([target])
                subs.append((target, str(node["$ref"])))
        if isinstance(node.get("allOf"), list):
            need += [[v] for v in node["allOf"]]
        need += [node[k] for k in ("anyOf", "oneOf") if isinstance(node.get(k), list)]
        if any(k in node for k in _COMBINATORS):
            g.needs[id(node)] = need
        g.children[id(node)] = [id(v) for v, _ in subs if isinstance(v, dict)]
        stack.extend(reversed(subs))
    return g


def _endless_ref(g: _SchemaGraph) -> str | None:
    """Where the schema holds a ``$ref`` loop no value can end (``{"$ref": "#"}``), or None.

    llguidance compiles such a loop, then finds no token to allow once decoding reaches it, so the request
    would fail mid-generation. A sub-schema can produce a value unless it is made only of ``$ref``/``allOf``/
    ``anyOf``/``oneOf`` whose every way out leads back into the loop: a least fixed point, linear in the schema.
    """
    producing = {i for i in g.where if i not in g.needs}
    missing: dict[int, int] = {}
    watchers: dict[int, list[tuple[int, int]]] = {}
    done: set[tuple[int, int]] = set()
    for n, need in g.needs.items():
        missing[n] = 0
        for k, members in enumerate(need):
            if True in members or any(id(m) in producing for m in members if isinstance(m, dict)):
                done.add((n, k))
                continue
            missing[n] += 1
            for m in members:
                if isinstance(m, dict):
                    watchers.setdefault(id(m), []).append((n, k))
        if missing[n] == 0:
            producing.add(n)
    queue = list(producing)
    while queue:
        for n, k in watchers.get(queue.pop(), ()):
            if (n, k) not in done:
                done.add((n, k))
                missing[n] -= 1
                if missing[n] == 0 and n not in producing:
                    producing.add(n)
                    queue.append(n)
    return next((at for i, at in g.where.items() if i not in producing), None)


def _longest_path(children: dict[int, list[int]], root: int) -> int:
    """Sub-schemas on the longest path from root, a `$ref` loop counting all its members: a bound on how deep
    llguidance recurses. Iterative Tarjan; each loop's length is known once it is closed (sinks first)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    comp: dict[int, int] = {}
    comp_len: list[int] = []
    work: list[tuple[int, int]] = [(root, 0)]
    while work:
        v, i = work.pop()
        kids = children[v]
        if i == 0:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
        else:  # back from the child kids[i - 1]
            low[v] = min(low[v], low[kids[i - 1]])
        while i < len(kids):
            w = kids[i]
            i += 1
            if w not in index:
                work += [(v, i), (w, 0)]
                break
            if w in on_stack:
                low[v] = min(low[v], index[w])
        else:
            if low[v] == index[v]:
                members: list[int] = []
                while not members or members[-1] != v:
                    members.append(stack.pop())
                    on_stack.discard(members[-1])
                c = len(comp_len)
                for m in members:
                    comp[m] = c
                below = max((comp_len[comp[k]] for m in members for k in children[m] if comp[k] != c), default=0)
                comp_len.append(len(members) + below)
    return comp_len[comp[root]]


def _schema_error(schema: dict[str, Any], key: str) -> str:
    """Why llguidance cannot use this schema, "" when it can (compiled tokenizer-free, once per schema)."""
    local, objects = _scan_schema(schema)
    if objects > MAX_SCHEMA_OBJECTS:
        return f"too large: more than {MAX_SCHEMA_OBJECTS} objects"
    graph = _schema_graph(schema) if local else None
    if graph is None and objects > MAX_OPAQUE_OBJECTS:
        return (f"more than {MAX_OPAQUE_OBJECTS} objects in a schema with $id, $anchor or non-local $ref "
                f"(limit for such schemas)")
    if graph is not None and _longest_path(graph.children, id(schema)) > MAX_SCHEMA_DEPTH:
        return f"nested too deeply: more than {MAX_SCHEMA_DEPTH} levels of sub-schemas through $ref"
    grammar = _grammar_for(key, JSON_WHITESPACE, True)
    is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_LIMITS)
    if is_error:
        return _clean("; ".join(msgs))  # warnings (e.g. ignored keywords) are fine
    loop = _endless_ref(graph) if graph is not None else None
    return f"{_go_quote(loop)} refers back to itself and no value can match it" if loop is not None else ""


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
        err = _schema_error(fmt, key)
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
