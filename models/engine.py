"""Continuous-batching decode loop over a transformers causal LM.

One thread owns the model. Requests join the running batch between decode steps (after a
prefill of their own), leave it when done, and every step decodes one token for all of them
at once: on a memory-bound CPU or GPU a batch of 8 costs little more than a batch of 1.
Sequences of different lengths share one left-padded KV cache; the attention mask hides the
padding and explicit position ids keep RoPE positions per sequence.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from omx.models.sampling import Sampler, SamplingParams

log = logging.getLogger("omx.engine")

Emit = Callable[[dict[str, Any]], None]


class GrammarConstraint(Protocol):
    """What the engine needs from a per-sequence output constraint (see omx.models.constrain)."""

    def consume(self, token_id: int) -> None: ...
    def is_done(self) -> bool: ...


@dataclass
class GenerateJob:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    num_ctx: int
    emit: Emit
    num_keep: int = 4
    constraint: GrammarConstraint | None = None
    stop_ids: frozenset[int] = frozenset()  # control tokens named by a stop string (they decode to no text)
    # Resuming a generation another runner started: its tokens end `prompt_ids`, and the first `skip_chars`
    # characters they decode to were delivered already (what is left is text that runner held back).
    resume_ids: list[int] = field(default_factory=list)
    skip_chars: int = 0
    # Log probabilities of the tokens chosen (-1: off), with this many most likely alternatives each (0-20).
    logprobs: int = -1


@dataclass
class EmbedJob:
    id: str
    inputs: list[str]
    truncate: bool
    num_ctx: int
    emit: Emit


@dataclass
class _Seq:
    job: GenerateJob
    sampler: Sampler
    history: list[int]
    prompt_len: int
    generated: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    pending: str = ""
    prompt_ns: int = 0
    decode_start: float = 0.0
    cancelled: bool = False
    reported: int = 0  # history[:reported] went out in token frames (the ids let another runner resume)
    skip: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # entries not yet sent, in token order


class Engine:
    """Owns a loaded model; `submit` and `cancel` are thread safe, `run` is the decode thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        num_parallel: int,
        eos_ids: set[int],
        apply_masks: Callable[[torch.Tensor, list[Any]], None] | None = None,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.device = device
        self.num_parallel = max(1, num_parallel)
        self.eos_ids = eos_ids
        self.apply_masks = apply_masks
        self.inbox: queue.Queue[GenerateJob | EmbedJob | None] = queue.Queue()
        self.waiting: list[GenerateJob] = []
        self.seqs: list[_Seq] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] 1 = real token, 0 = left padding
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.vocab_limit = int(getattr(model.config, "vocab_size", 0) or 0)

    # ---- thread-safe entry points -------------------------------------------------------
    def submit(self, job: GenerateJob | EmbedJob) -> None:
        self.inbox.put(job)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)
        self.inbox.put(None)  # wake the loop

    def stop(self) -> None:
        self.inbox.put(None)
        self._stopping = True

    # ---- decode thread ------------------------------------------------------------------
    def run(self) -> None:
        self._stopping = False
        while not self._stopping:
            self._drain_inbox(block=not self.seqs and not self.waiting)
            self._apply_cancellations()
            while self.waiting and len(self.seqs) < self.num_parallel:
                job = self.waiting.pop(0)
                try:
                    self._admit(job)
                except Exception as e:  # a bad request must not take the loop down
                    log.exception("prefill failed")
                    job.emit({"id": job.id, "t": "error", "error": f"prefill failed: {e}"})
            if self.seqs:
                try:
                    self._step()
                except Exception as e:
                    log.exception("decode step failed")
                    for s in self.seqs:
                        s.job.emit({"id": s.job.id, "t": "error", "error": f"decode failed: {e}"})
                    self._reset_batch()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(block=block, timeout=None if block else 0)
        except queue.Empty:
            return
        while True:
            if isinstance(item, GenerateJob):
                self.waiting.append(item)
            elif isinstance(item, EmbedJob):
                self._embed(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _apply_cancellations(self) -> None:
        with self._lock:
            if not self._cancelled:
                return
            gone, self._cancelled = self._cancelled, set()
        self.waiting = [j for j in self.waiting if j.id not in gone]
        for s in self.seqs:
            if s.job.id in gone:
                s.cancelled = True
        self._evict_finished()

    # ---- prefill and batch surgery --------------------------------------------------------
    def _fit_prompt(self, job: GenerateJob) -> list[int]:
        ids = job.prompt_ids
        limit = max(2, job.num_ctx - 1)
        if len(ids) <= limit:
            return ids
        keep = min(job.num_keep, limit // 2)
        # llama.cpp's truncation: keep the first num_keep tokens and the most recent tail
        return ids[:keep] + ids[len(ids) - (limit - keep) :]

    @torch.inference_mode()
    def _admit(self, job: GenerateJob) -> None:
        ids = self._fit_prompt(job)
        if not ids:
            ids = [self.tok.bos_token_id if self.tok.bos_token_id is not None else 0]
        t0 = time.perf_counter()
        inp = torch.tensor([ids], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        out = self.model(input_ids=inp, cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        seq = _Seq(job=job, sampler=Sampler(job.params, self.device), history=list(ids), prompt_len=len(ids))
        seq.prefix_offset = seq.read_offset = len(ids) - min(len(job.resume_ids), len(ids))
        seq.reported = len(ids)
        seq.skip = job.skip_chars
        seq.prompt_ns = int((time.perf_counter() - t0) * 1e9)
        seq.decode_start = time.perf_counter()
        self._merge(out.cache, len(ids))
        self.seqs.append(seq)
        self._sample_rows(logits, [seq])
        self._evict_finished()

    def _merge(self, new_cache: DynamicCache, new_len: int) -> None:
        new_mask = torch.ones((1, new_len), dtype=torch.long, device=self.device)
        if self.cache is None or self.mask is None or not self.seqs:
            self.cache, self.mask = new_cache, new_mask
            return
        cur_len = self.mask.shape[1]
        target = max(cur_len, new_len)
        layers = []
        for old, new in zip(self.cache.layers, new_cache.layers, strict=True):
            ok, ov = _left_pad(old.keys, target - cur_len), _left_pad(old.values, target - cur_len)
            nk, nv = _left_pad(new.keys, target - new_len), _left_pad(new.values, target - new_len)
            layers.append((torch.cat([ok, nk], 0), torch.cat([ov, nv], 0)))
        self.cache = DynamicCache(layers)
        self.mask = torch.cat(
            [F.pad(self.mask, (target - cur_len, 0)), F.pad(new_mask, (target - new_len, 0))], 0
        )

    def _reset_batch(self) -> None:
        self.seqs, self.cache, self.mask = [], None, None

    def _evict_finished(self) -> None:
        keep = [i for i, s in enumerate(self.seqs) if not s.cancelled]
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self._reset_batch()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        assert self.cache is not None and self.mask is not None
        mask = self.mask.index_select(0, idx)
        # drop columns that are padding for every remaining row
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]
        self.mask = mask[:, lead:]
        self.seqs = [self.seqs[i] for i in keep]

    # ---- decoding -------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self) -> None:
        assert self.mask is not None
        b = len(self.seqs)
        last = torch.tensor([[s.history[-1]] for s in self.seqs], dtype=torch.long, device=self.device)
        pos = torch.tensor([[len(s.history) - 1] for s in self.seqs], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, torch.ones((b, 1), dtype=torch.long, device=self.device)], 1)
        padded = bool((self.mask == 0).any())
        out = self.model(
            input_ids=last,
            attention_mask=self.mask if padded else None,
            position_ids=pos,
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        self._sample_rows(out.logits[:, -1, :].float(), list(self.seqs))
        self._evict_finished()

    def _sample_rows(self, logits: torch.Tensor, seqs: list[_Seq]) -> None:
        if self.vocab_limit and logits.shape[-1] > len(self.tok):
            logits[:, len(self.tok) :] = float("-inf")  # padded embedding rows are not real tokens
        # the model's own distribution, before penalties, grammar and sampling settings reshape it
        wanted = [row for row, s in enumerate(seqs) if s.job.logprobs >= 0]
        raw = torch.log_softmax(logits[wanted], -1) if wanted else None
        for row, s in enumerate(seqs):
            s.sampler.penalize(logits[row], s.history)
        constraints = [s.job.constraint for s in seqs]
        if self.apply_masks is not None and any(c is not None for c in constraints):
            self.apply_masks(logits, constraints)
        for row, s in enumerate(seqs):
            tok = s.sampler.sample(logits[row])
            if raw is not None and s.job.logprobs >= 0 and tok not in self.eos_ids and tok not in s.job.stop_ids:
                s.logprobs.append(self._logprob_entry(raw[wanted.index(row)], tok, s.job.logprobs))
            self._accept(s, tok)

    def _token_logprob(self, tok: int, logprob: float) -> dict[str, Any]:
        text = self.tok.decode([tok], skip_special_tokens=False)
        entry: dict[str, Any] = {"token": text, "logprob": logprob}
        if "\ufffd" not in text:  # part of a multi-byte character: its own bytes are not known here
            entry["bytes"] = list(text.encode())
        return entry

    def _logprob_entry(self, lp: torch.Tensor, tok: int, top: int) -> dict[str, Any]:
        """Ollama's (and OpenAI's) shape: the chosen token, then the `top` most likely ones."""
        entry = self._token_logprob(tok, float(lp[tok]))
        if top > 0:
            values, ids = torch.topk(lp, min(top, lp.shape[-1]))
            entry["top_logprobs"] = [self._token_logprob(int(i), float(v)) for v, i in zip(values, ids, strict=True)]
        return entry

    @staticmethod
    def _take_logprobs(s: _Seq) -> dict[str, Any]:
        """The pending entries for a token frame (the frame carries the text of those tokens, or text before)."""
        if not s.logprobs:
            return {}
        out, s.logprobs = s.logprobs, []
        return {"logprobs": out}

    def _accept(self, s: _Seq, tok: int) -> None:
        job = s.job
        c = job.constraint
        if tok in self.eos_ids or tok in job.stop_ids:
            # the grammar only allows an end token once the output is complete
            if c is not None and not c.is_done():
                try:
                    c.consume(tok)
                except Exception as e:
                    job.emit({"id": job.id, "t": "error", "error": f"constrained decoding failed: {e}"})
                    s.cancelled = True
                    return
            self._finish(s, "stop")
            return
        if c is not None:
            try:
                c.consume(tok)
            except Exception as e:
                job.emit({"id": job.id, "t": "error", "error": f"constrained decoding failed: {e}"})
                s.cancelled = True
                return
        s.history.append(tok)
        s.generated.append(tok)
        text = self._detok(s)
        if text and s.skip:
            cut = min(s.skip, len(text))
            text, s.skip = text[cut:], s.skip - cut
        if text:
            s.pending += text
            if self._flush_text(s):
                return
        if c is not None and c.is_done():
            self._finish(s, "stop")
        elif job.params.num_predict >= 0 and len(s.generated) >= job.params.num_predict:
            self._finish(s, "length")
        elif len(s.history) >= job.num_ctx:
            self._finish(s, "length")

    def _detok(self, s: _Seq) -> str:
        """Incremental detokenisation that never splits a multi-byte character; control tokens render as nothing,
        as in llama.cpp."""
        prefix = self.tok.decode(s.history[s.prefix_offset : s.read_offset], skip_special_tokens=True)
        full = self.tok.decode(s.history[s.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            s.prefix_offset, s.read_offset = s.read_offset, len(s.history)
            return full[len(prefix) :]
        return ""

    def _flush_text(self, s: _Seq) -> bool:
        """Emit pending text up to any stop string; returns True when a stop string ended the sequence."""
        stops = s.job.params.stop
        if stops:
            hit = min(((s.pending.find(x), x) for x in stops if x and x in s.pending), default=None)
            if hit is not None:
                s.pending = s.pending[: hit[0]]
                self._finish(s, "stop", flush_tail=False)
                return True
            hold = max((_overlap(s.pending, x) for x in stops if x), default=0)
        else:
            hold = 0
        out = s.pending[: len(s.pending) - hold]
        s.pending = s.pending[len(out) :]
        if out:
            s.job.emit({"id": s.job.id, "t": "token", "text": out, "ids": self._unreported(s),
                        **self._take_logprobs(s)})
        return False

    @staticmethod
    def _unreported(s: _Seq) -> list[int]:
        ids = s.history[s.reported:]
        s.reported = len(s.history)
        return ids

    def _finish(self, s: _Seq, reason: str, flush_tail: bool = True) -> None:
        job = s.job
        # bytes held back as an incomplete character are flushed as they are (with U+FFFD)
        tail = self.tok.decode(s.history[s.prefix_offset :], skip_special_tokens=True)
        head = self.tok.decode(s.history[s.prefix_offset : s.read_offset], skip_special_tokens=True)
        if flush_tail and len(tail) > len(head):
            s.pending += tail[len(head) :][s.skip:]
        if s.pending:
            job.emit({"id": job.id, "t": "token", "text": s.pending, "ids": self._unreported(s),
                      **self._take_logprobs(s)})
            s.pending = ""
        elif flush_tail and s.logprobs:  # tokens that render as no text (control tokens) still had a probability
            job.emit({"id": job.id, "t": "token", "text": "", "ids": self._unreported(s), **self._take_logprobs(s)})
        job.emit(
            {
                "id": job.id,
                "t": "done",
                "done_reason": reason,
                "prompt_eval_count": s.prompt_len,
                "prompt_eval_duration": s.prompt_ns,
                "eval_count": len(s.generated),
                "eval_duration": int((time.perf_counter() - s.decode_start) * 1e9),
                "context": s.history,
            }
        )
        s.cancelled = True  # leaves the batch at the next eviction

    # ---- embeddings -----------------------------------------------------------------------
    @torch.inference_mode()
    def _embed(self, job: EmbedJob) -> None:
        t0 = time.perf_counter()
        try:
            base = getattr(self.model, self.model.base_model_prefix, self.model)
            vectors: list[list[float]] = []
            count = 0
            for text in job.inputs:
                ids = self.tok.encode(text, add_special_tokens=True)
                if not ids:  # "" with no BOS to add: llama.cpp embeds its BOS; any one token gives a vector
                    ids = [next((t for t in (self.tok.bos_token_id, self.tok.eos_token_id) if t is not None), 0)]
                if len(ids) > job.num_ctx:
                    if not job.truncate:
                        job.emit({"id": job.id, "t": "error", "status": 400,
                                  "error": "the input length exceeds the context length"})
                        return
                    ids = ids[: job.num_ctx]
                count += len(ids)
                hidden = base(input_ids=torch.tensor([ids], device=self.device)).last_hidden_state
                vectors.append(hidden[0].float().mean(0).tolist())
        except Exception as e:
            log.exception("embedding failed")
            job.emit({"id": job.id, "t": "error", "error": f"embedding failed: {e}"})
            return
        job.emit({"id": job.id, "t": "embeddings", "embeddings": vectors, "prompt_eval_count": count,
                  "total_duration": int((time.perf_counter() - t0) * 1e9)})


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n > 0 else t


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop` (held back, may become a stop)."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
