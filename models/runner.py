"""The torch runner process: one loaded model, driven by the node over a pipe of JSON frames.

Run as `python -m omx.models.runner --spec JSON`. A model lives in its own process so that a
crash, an out-of-memory kill or an unload frees everything and never takes the node down. The
runner exits as soon as its stdin closes, so a dead node leaves no orphan holding GPU memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import threading
import time
from typing import Any, BinaryIO

from omx.protocols import frames

log = logging.getLogger("omx.runner")


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        # bf16/f16 matmuls are slow on most CPUs; on a GPU f32 wastes memory and bandwidth
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]
    except KeyError:
        raise ValueError(f"unknown dtype {requested!r}; expected auto, float32, float16 or bfloat16") from None


def load(spec: dict[str, Any]) -> tuple[Any, Any, str]:
    """Load (model, tokenizer, device) from a GGUF blob or a Hugging Face style directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = pick_device(spec.get("device", "auto"))
    dtype = pick_dtype(spec.get("dtype", "auto"), device)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if spec["kind"] == "gguf":
        kwargs["gguf_file"] = spec["file"]
    tok = AutoTokenizer.from_pretrained(spec["dir"], **kwargs)
    model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    torch.set_grad_enabled(False)
    return model, tok, device


def eos_ids(model: Any, tok: Any) -> set[int]:
    ids: set[int] = set()
    for src in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(i for i in src if isinstance(i, int))
    return ids


class Runner:
    def __init__(self, spec: dict[str, Any], out: BinaryIO) -> None:
        import torch

        from omx.models.engine import Engine

        self.out = out
        self.out_lock = threading.Lock()
        t0 = time.perf_counter()
        self.model, self.tok, device = load(spec)
        self.compiler: Any = None
        apply_masks = None
        try:
            from omx.models import constrain

            self.compiler = constrain.GrammarCompiler(
                self.tok, vocab_size=self.model.config.vocab_size, eos_token_ids=sorted(eos_ids(self.model, self.tok))
            )
            apply_masks = constrain.apply_masks
        except Exception as e:  # the model still serves unconstrained requests
            log.warning("structured output unavailable for this model: %s", e)
        self.engine = Engine(
            self.model,
            self.tok,
            torch.device(device),
            num_parallel=int(spec.get("num_parallel", 4)),
            eos_ids=eos_ids(self.model, self.tok),
            apply_masks=apply_masks,
        )
        # control tokens by text, so a stop string naming one (e.g. "<|im_end|>") stops on the token itself
        specials = set(self.tok.all_special_tokens)
        self.special_ids: dict[str, int] = {
            t: i for t, i in self.tok.get_added_vocab().items()
            if t in specials or (t.startswith("<") and t.endswith(">"))
        }
        # The loaded model and libraries (~250k objects) live as long as the runner: frozen, a full collection
        # no longer walks them (175 ms measured in a node process, a stall for every sequence being decoded).
        gc.collect()
        gc.freeze()
        self.thread = threading.Thread(target=self.engine.run, name="decode", daemon=True)
        self.thread.start()
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.send(
            {
                "t": "ready",
                "load_duration": int((time.perf_counter() - t0) * 1e9),
                "device": device,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "param_bytes": params,
                "context_length": int(getattr(self.model.config, "max_position_embeddings", 0) or 0),
                "num_parallel": self.engine.num_parallel,
                "pid": os.getpid(),
            }
        )

    def send(self, obj: dict[str, Any]) -> None:
        data = frames.encode(obj)
        with self.out_lock:
            self.out.write(data)
            self.out.flush()

    def handle(self, msg: dict[str, Any]) -> None:
        from omx.models.engine import EmbedJob, GenerateJob
        from omx.models.sampling import SamplingParams

        op, jid = msg.get("op"), str(msg.get("id", ""))
        if op == "cancel":
            self.engine.cancel(jid)
        elif op == "generate":
            try:
                prompt = msg.get("prompt", "")
                vocab = len(self.tok)

                def token_ids(v: object) -> bool:
                    return isinstance(v, list) and all(
                        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in v)

                if msg.get("context"):
                    if not token_ids(msg["context"]):
                        raise ValueError("context must be token ids of this model (from an earlier response of it)")
                    prompt = self.tok.decode(msg["context"], skip_special_tokens=False) + prompt
                ids = self.tok.encode(prompt, add_special_tokens=not msg.get("raw", False))
                resume_ids = msg.get("resume_ids") or []
                if not token_ids(resume_ids):
                    raise ValueError("resume_ids must be token ids of this model")
                constraint = None
                if msg.get("format") is not None:
                    if self.compiler is None:
                        raise ValueError("structured output is not available for this model")
                    constraint = self.compiler.constraint(msg["format"])
                opts = msg.get("options", {})
                logprobs = msg.get("logprobs", -1)
                if not isinstance(logprobs, int) or isinstance(logprobs, bool) or not -1 <= logprobs <= 20:
                    raise ValueError("top_logprobs must be between 0 and 20")
                special = self.special_ids
                job = GenerateJob(
                    id=jid,
                    prompt_ids=ids + resume_ids,
                    resume_ids=resume_ids,
                    skip_chars=max(0, int(msg.get("skip_chars") or 0)),
                    params=SamplingParams.from_options(opts),
                    num_ctx=int(msg.get("num_ctx", 4096)),
                    num_keep=int(opts.get("num_keep", 4)),
                    emit=self.send,
                    constraint=constraint,
                    stop_ids=frozenset(special[s] for s in opts.get("stop", []) if s in special),
                    logprobs=logprobs,
                )
            except Exception as e:
                self.send({"id": jid, "t": "error", "status": 400, "error": str(e)})
                return
            self.engine.submit(job)
        elif op == "embed":
            self.engine.submit(
                EmbedJob(
                    id=jid,
                    inputs=[str(x) for x in msg.get("inputs", [])],
                    truncate=bool(msg.get("truncate", True)),
                    num_ctx=int(msg.get("num_ctx", 4096)),
                    emit=self.send,
                )
            )
        elif op == "tokenize":
            self.send({"id": jid, "t": "tokens", "tokens": self.tok.encode(msg.get("text", ""))})
        else:
            self.send({"id": jid, "t": "error", "error": f"unknown op {op!r}"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omx-runner")
    ap.add_argument("--spec", required=True, help="JSON load spec from the node")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("OMX_LOG_LEVEL", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s runner %(levelname)s %(message)s")
    # The protocol owns the original stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")  # buffered: a raw write may take only part of a large frame
    os.dup2(2, 1)
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    spec = json.loads(args.spec)
    try:
        runner = Runner(spec, out)
    except Exception as e:
        log.exception("load failed")
        out.write(frames.encode({"t": "fatal", "error": f"{type(e).__name__}: {e}"}))
        out.flush()
        return 1
    while True:
        try:
            msg = frames.read_sync(inp)
        except frames.FrameError as e:
            log.error("node sent a bad frame: %s", e)
            return 1
        if msg is None:
            return 0  # node went away
        runner.handle(msg)


if __name__ == "__main__":
    sys.exit(main())
