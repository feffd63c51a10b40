"""The demo models: built offline, loaded by transformers exactly as a real GGUF is."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omx.models.demo import (
    BENCH_100M,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    DEMO_PARAMS,
    DEMO_TEMPLATE,
    EOS_TOKEN,
    IM_END,
    IM_START,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TINY,
    build_llama_gguf,
    build_llama_hf_dir,
    random_llama_weights,
)

pytestmark = pytest.mark.fast

GGUF_NAME = "omx-tiny.gguf"
ROUND_TRIP = [
    "hello world",
    "\n  x",
    "  leading spaces and trailing  ",
    "emoji 👋🏽 🧑‍🚀 and CJK 漢字, accents héllo wörld",
    " a . b , c 's n't",
    "tabs\tand\r\nCRLF\n\n",
    "",
    "<not|special> <|im_start",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_llama_gguf(root / GGUF_NAME, TINY)
    build_llama_hf_dir(root / "hf", TINY)
    return root


@pytest.fixture(scope="module")
def gguf_tok(built: Path):
    return AutoTokenizer.from_pretrained(built, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def hf_tok(built: Path):
    return AutoTokenizer.from_pretrained(built / "hf")


@pytest.fixture(scope="module")
def gguf_model(built: Path):
    return AutoModelForCausalLM.from_pretrained(built, gguf_file=GGUF_NAME).eval()


@pytest.fixture(scope="module")
def hf_model(built: Path):
    return AutoModelForCausalLM.from_pretrained(built / "hf").eval()


def test_gguf_config_matches_spec(gguf_model):
    cfg = gguf_model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        TINY.hidden_size,
        TINY.intermediate_size,
        TINY.num_layers,
    )
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (TINY.num_heads, TINY.num_kv_heads)
    assert cfg.max_position_embeddings == TINY.context_length
    assert cfg.vocab_size == TINY.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert not cfg.tie_word_embeddings


@pytest.mark.parametrize("which", ["gguf", "hf"])
def test_tokenizer_round_trips_and_is_byte_level(which, gguf_tok, hf_tok):
    tok = gguf_tok if which == "gguf" else hf_tok
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == list(text.encode("utf-8")), text  # one token per byte, id == byte value
        assert tok.decode(ids) == text
    assert tok.encode("hi") == [104, 105]  # no BOS: the ChatML template does not want one


@pytest.mark.parametrize("which", ["gguf", "hf"])
def test_special_tokens_are_single_ids(which, gguf_tok, hf_tok):
    tok = gguf_tok if which == "gguf" else hf_tok
    ids = {t: tok.encode(t, add_special_tokens=False) for t in SPECIAL_TOKENS}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert sorted(v[0] for v in ids.values()) == list(range(256, 256 + len(SPECIAL_TOKENS)))
    assert tok.eos_token == IM_END and tok.eos_token_id == ids[IM_END][0]
    assert tok.bos_token == BOS_TOKEN and tok.pad_token == PAD_TOKEN
    text = f"{IM_START}user\nhi{IM_END}{EOS_TOKEN}"
    assert tok.encode(text, add_special_tokens=False) == [
        ids[IM_START][0],
        *b"user\nhi",
        ids[IM_END][0],
        ids[EOS_TOKEN][0],
    ]
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("which", ["gguf", "hf"])
def test_chat_template(which, gguf_tok, hf_tok):
    tok = gguf_tok if which == "gguf" else hf_tok
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # What DEMO_TEMPLATE renders for the same request in Ollama.
    assert (
        rendered
        == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "{{ .System }}" in DEMO_TEMPLATE and "range .Messages" in DEMO_TEMPLATE
    assert IM_END in DEMO_PARAMS["stop"]


def test_gguf_weights_and_logits_equal_hf_dir(gguf_model, hf_model):
    """Exact agreement proves the llama.cpp Q/K permutation is written the way the loader undoes it."""
    gguf_sd, hf_sd = gguf_model.state_dict(), hf_model.state_dict()
    assert gguf_sd.keys() == hf_sd.keys()
    for name, value in hf_sd.items():
        assert torch.equal(gguf_sd[name], value), name
    ids = torch.tensor([[(7 * i) % TINY.vocab_size for i in range(96)]])  # many positions: rotary matters
    with torch.no_grad():
        a, b = gguf_model(ids).logits, hf_model(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a.std() > 0.05  # random but not degenerate
    assert len(set(a[0].argmax(-1).tolist())) > 1


def test_gguf_model_generates(gguf_model, gguf_tok):
    prompt = gguf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([gguf_tok.encode(prompt, add_special_tokens=False)])
    out = gguf_model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert gguf_model.generation_config.eos_token_id == gguf_tok.eos_token_id


def test_f16_gguf_close_to_f32(tmp_path, gguf_model):
    build_llama_gguf(tmp_path / "f16.gguf", TINY, dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f16.gguf", dtype=torch.float32)
    ids = torch.tensor([list(range(40))])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, atol=2e-3, rtol=0)


def test_weights_depend_only_on_seed():
    a, b, c = random_llama_weights(TINY, 0), random_llama_weights(TINY, 0), random_llama_weights(TINY, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert sum(v.numel() for v in a.values()) == TINY.num_parameters


def test_bench_spec_is_about_100m():
    assert 80e6 <= BENCH_100M.num_parameters <= 130e6
