"""Runner throughput, side by side in one run on the same ~100M-parameter random llama (built offline):

  (a) plain transformers `generate`, greedy, batch 1       — the reference
  (b) omx, one stream through the HTTP API                 — target ≥ 0.9 × (a)
  (c) omx, 8 concurrent streams, aggregate tokens/s        — target ≥ 3 × (b)

Usage: python scenarios/bench_runner.py [--tokens 128] [--repeats 3]
Medians over the repeats are printed; machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from omx.models.demo import BENCH_100M, build_llama_gguf
from omx.node.launch import start_node

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2


def plain_transformers(d: Path, tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file="bench.gguf")
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="bench.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(PROMPT)])
    rates = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            n = out.shape[1] - ids.shape[1]
            rates.append(n / (time.perf_counter() - t0))
    del model
    return statistics.median(rates)


def stream_once(c: httpx.Client, prompt: str, tokens: int, seed: int) -> tuple[int, float]:
    """One streamed generation; returns (tokens generated, wall seconds from request to final chunk)."""
    body = {"model": "bench", "prompt": prompt, "raw": True,
            "options": {"num_predict": tokens, "temperature": 0, "seed": seed, "stop": []}}
    t0 = time.perf_counter()
    n = 0
    with c.stream("POST", "/api/generate", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line:
                continue
            obj = json.loads(line)
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if obj.get("done"):
                n = obj["eval_count"]
    return n, time.perf_counter() - t0


def omx_rates(d: Path, tokens: int, repeats: int) -> tuple[float, float]:
    node = start_node(d / "node", "--no-demo", env={"OMX_NUM_PARALLEL": "8", "OMX_KEEP_ALIVE": "-1",
                                                      "OMX_LOG_LEVEL": "WARNING"})
    try:
        with httpx.Client(base_url=node.url, timeout=600) as c:
            blob = (d / "bench.gguf").read_bytes()
            import hashlib

            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            c.post(f"/api/blobs/{digest}", content=blob).raise_for_status()
            c.post("/api/create", json={"model": "bench", "files": {"bench.gguf": digest}, "stream": False}
                   ).raise_for_status()
            stream_once(c, PROMPT, 8, 0)  # load and warm up
            single = []
            for _ in range(repeats):
                n, dt = stream_once(c, PROMPT, tokens, 0)
                single.append(n / dt)
            agg = []
            for rep in range(repeats):
                results: list[tuple[int, float]] = [(0, 0.0)] * 8

                def worker(i: int, results: list[tuple[int, float]] = results, rep: int = rep) -> None:
                    with httpx.Client(base_url=node.url, timeout=600) as ci:
                        results[i] = stream_once(ci, f"{i} {PROMPT}", tokens, rep * 8 + i)

                threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                agg.append(sum(n for n, _ in results) / wall)
            return statistics.median(single), statistics.median(agg)
    finally:
        node.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        build_llama_gguf(d / "bench.gguf", BENCH_100M, dtype=torch.float16)
        print(f"model: {BENCH_100M.num_parameters / 1e6:.1f}M params, built in {time.perf_counter() - t0:.1f}s; "
              f"{args.tokens} new tokens, median of {args.repeats}; torch threads {torch.get_num_threads()}")
        plain = plain_transformers(d, args.tokens, args.repeats)
        single, agg = omx_rates(d, args.tokens, args.repeats)
    print(f"{'run':<40}{'tokens/s':>10}{'ratio':>10}")
    print(f"{'plain transformers generate (batch 1)':<40}{plain:>10.1f}{1.0:>10.2f}")
    print(f"{'omx single stream over HTTP':<40}{single:>10.1f}{single / plain:>10.2f}   target >= 0.90 x plain")
    print(f"{'omx 8 concurrent streams (aggregate)':<40}{agg:>10.1f}{agg / single:>10.2f}   target >= 3.00 x single")
    return 0


if __name__ == "__main__":
    sys.exit(main())
