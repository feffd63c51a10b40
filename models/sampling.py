"""Token sampling with Ollama's runtime options (llama.cpp semantics), one row of a decode batch at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Runtime options that shape sampling; defaults are Ollama's."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1
    num_predict: int = -1
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_options(cls, options: dict) -> SamplingParams:
        """Build from an already type-checked options map; unknown keys are ignored as Ollama does."""
        known = {k: v for k, v in options.items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)


class Sampler:
    """Per-sequence sampler: owns the RNG so a fixed seed reproduces a generation regardless of batching."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.p = params
        self.generator: torch.Generator | None = None
        if params.seed >= 0:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(params.seed)

    def penalize(self, logits: torch.Tensor, history: list[int]) -> None:
        """Apply repeat/presence/frequency penalties in place over the last `repeat_last_n` tokens."""
        p = self.p
        if not history:
            return
        if p.repeat_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
            return
        n = p.repeat_last_n
        if n == 0:
            return
        window = history if n < 0 else history[-n:]
        ids = torch.tensor(window, dtype=torch.long, device=logits.device)
        uniq, counts = torch.unique(ids, return_counts=True)
        vals = logits[uniq]
        if p.repeat_penalty != 1.0:
            vals = torch.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.frequency_penalty or p.presence_penalty:
            vals = vals - counts.to(vals.dtype) * p.frequency_penalty - p.presence_penalty
        logits[uniq] = vals

    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token from one row of logits (float32, already penalised and masked)."""
        p = self.p
        if p.temperature <= 0.0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if 0.0 < p.top_p < 1.0:
            sorted_probs, sorted_idx = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_probs, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = (cum - sorted_probs) >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, sorted_idx, sorted_probs)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        total = probs.sum()
        if not torch.isfinite(total) or total <= 0:
            return int(torch.argmax(logits))
        if probs.device.type != "cpu":
            probs = probs.cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))
