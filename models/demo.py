"""Tiny llama models built offline, so a node can serve a demo model with no download.

The demo model goes through exactly the code path of a real one: a GGUF file that transformers
loads with ``from_pretrained(dir, gguf_file=name)``. The same weights can also be written as a
Hugging Face directory, which gives tests an independent reference for the GGUF conversion.

The tokenizer is byte-level BPE with no merges: each of the 256 bytes is one token (id == byte
value) and the special tokens follow. It round-trips any text and needs no training data.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import torch

if TYPE_CHECKING:
    from omx.models.store import Store

__all__ = [
    "BENCH_100M",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEMO_MODEL_NAME",
    "DEMO_PARAMS",
    "DEMO_TEMPLATE",
    "EOS_TOKEN",
    "IM_END",
    "IM_START",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "STOP_IDS",
    "TINY",
    "VOCAB_SIZE",
    "LlamaSpec",
    "build_llama_gguf",
    "build_llama_hf_dir",
    "ensure_demo_model",
    "random_llama_weights",
    "vocab_tokens",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids: 256, 257, ... right after the byte tokens.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID, PAD_ID = range(256, VOCAB_SIZE)
# A chat turn ends with <|im_end|>, so that is the token generation stops on (as in Qwen's GGUFs).
STOP_IDS: tuple[int, ...] = (IM_END_ID, EOS_ID)

# Jinja ChatML, stored in the GGUF / tokenizer_config for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The same ChatML as an Ollama Go template. Like Ollama's qwen templates, system text comes from
# .System (Ollama collates all system messages into it) and system entries of .Messages are skipped.
DEMO_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n"
    "{{ .System }}<|im_end|>\n"
    "{{ end }}"
    "{{- range .Messages }}"
    '{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}"
    "{{- end }}<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class LlamaSpec:
    """Shape of a llama model; everything the builders need besides the seed."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context_length: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"bad head layout in {self}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        """Fixed by the byte-level tokenizer, which every demo model shares."""
        return VOCAB_SIZE

    @property
    def num_parameters(self) -> int:
        """Parameter count, untied embeddings included, computed from the shapes alone."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        return self.num_layers * layer + 2 * self.vocab_size * h + h


TINY = LlamaSpec(
    name="omx-tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
)
BENCH_100M = LlamaSpec(
    name="omx-bench-100m",
    hidden_size=768,
    intermediate_size=3072,
    num_layers=12,
    num_heads=12,
    num_kv_heads=4,
)

DEMO_PARAMS: dict[str, object] = {
    "stop": [IM_START, IM_END, EOS_TOKEN],
    "temperature": 0.7,
    "num_ctx": TINY.context_length,
}


def vocab_tokens() -> list[str]:
    """Token strings in id order, bytes spelled in GPT-2's byte-to-unicode alphabet.

    That alphabet is what both a ``gpt2`` GGUF vocabulary and an HF byte-level BPE expect.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)] + list(SPECIAL_TOKENS)


def random_llama_weights(spec: LlamaSpec = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named float32 weights, identical for a given (spec, seed) -- the one source for both builders.

    Normal(0, init_std) matrices and unit norms: small enough that activations stay sane, random
    enough that logits differ per token.
    """
    gen = torch.Generator().manual_seed(seed)
    h, kv, ff = spec.hidden_size, spec.num_kv_heads * spec.head_dim, spec.intermediate_size

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * spec.init_std

    weights = {"model.embed_tokens.weight": normal(spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": normal(h, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "mlp.gate_proj.weight": normal(ff, h),
            p + "mlp.up_proj.weight": normal(ff, h),
            p + "mlp.down_proj.weight": normal(h, ff),
        }
    weights["model.norm.weight"] = torch.ones(h)
    weights["lm_head.weight"] = normal(spec.vocab_size, h)
    return weights


def _stored(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast matrices to the storage dtype; 1-D norms stay float32, as llama.cpp keeps them."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}")
    return (w.to(dtype) if w.ndim > 1 else w).contiguous()


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: rotary pairs go from HF's half-split to interleaved.

    transformers' GGUF loader applies the inverse, so writing anything else scrambles attention.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_FILE_TYPES = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16}


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can write an empty typed array, which the format allows but gguf-py refuses."""

    def _pack_val(
        self,
        val: Any,
        vtype: gguf.GGUFValueType,
        add_vtype: bool,
        sub_type: gguf.GGUFValueType | None = None,
    ) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def build_llama_gguf(
    path: Path, spec: LlamaSpec = TINY, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a llama GGUF with random weights and the byte-level tokenizer; returns ``path``.

    ``dtype`` (float32, or float16 to halve the file) applies to matrices only. The file appears
    atomically, so a node killed mid-provisioning never leaves a truncated model behind.
    """
    if dtype not in _FILE_TYPES:
        raise ValueError(f"GGUF dtype must be float32 or float16, not {dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, spec.num_layers)
    tmp = path.with_name(path.name + ".partial")
    writer = _Writer(tmp, arch)

    writer.add_name(spec.name)
    writer.add_description("random-weight llama built by omx.models.demo; output is noise")
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_vocab_size(spec.vocab_size)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)

    tokens = vocab_tokens()
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # No merges, but the key must exist: llama.cpp refuses a gpt2 vocabulary without it, and
    # transformers would otherwise try to derive merges from (absent) scores.
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(IM_END_ID)
    writer.add_eot_token_id(IM_END_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for hf_name, w in random_llama_weights(spec, seed).items():
        base, suffix = hf_name.rsplit(".", 1)
        if base.endswith("q_proj"):
            w = _permute_qk(w, spec.num_heads)
        elif base.endswith("k_proj"):
            w = _permute_qk(w, spec.num_kv_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", _stored(w, dtype).numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def build_llama_hf_dir(
    path: Path, spec: LlamaSpec = TINY, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the same model as a Hugging Face directory (config, safetensors, tokenizer); returns ``path``."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, GPT2Tokenizer, LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.context_length,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
        dtype=dtype,
    )
    config.save_pretrained(path)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID).save_pretrained(
        path
    )
    weights = {k: _stored(v, dtype) for k, v in random_llama_weights(spec, seed).items()}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})

    vocab = {tok: i for i, tok in enumerate(vocab_tokens())}
    tok = GPT2Tokenizer(
        vocab=vocab,
        merges=[],
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        add_prefix_space=False,
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [EOS_TOKEN, IM_START]}, replace_extra_special_tokens=False
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = spec.context_length
    # Template inline in tokenizer_config.json (not chat_template.jinja) so older readers see it too.
    tok.save_pretrained(path, save_jinja_files=False)
    return path


DEMO_MODEL_NAME = "omx-tiny:latest"


def ensure_demo_model(store: Store, name: str = DEMO_MODEL_NAME) -> None:
    """Build the tiny demo GGUF and register it through the same create path any imported model takes."""
    with tempfile.TemporaryDirectory(prefix="omx-demo-") as tmp:
        path = build_llama_gguf(Path(tmp) / "omx-tiny.gguf", TINY)
        for _ in store.create(name, gguf=path, template=DEMO_TEMPLATE, parameters=DEMO_PARAMS,
                              license="Random weights, no license restrictions: generated by omx."):
            pass
