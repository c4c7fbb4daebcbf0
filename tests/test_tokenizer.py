"""Our SentencePiece backend on the real Mistral-7B tokenizer (shipped in mistral-common)."""
import shutil

import pytest

from conftest import package_file
from model import SentencePieceTokenizer

CHAT = ["[RIYA] hey are we still going tonight?", "[FRIEND] yes!! 🙂 meet at 8:30\n[RIYA] ok",
        "naïve café — “quotes”, 漢字 and\ttabs", "lol\n\nok", "[SAM] 👍🏽🎉"]


@pytest.fixture(scope="module")
def model_file():
    return package_file("mistral_common", "data", "tokenizer.model.v1")


@pytest.fixture(scope="module")
def tok(model_file):
    return SentencePieceTokenizer(model_file)


def test_known_ids_for_a_tagged_message(tok):
    # Mistral-7B-v0.1's ids for this line (tag = several ordinary tokens: ▁[ RI Y A ]), after BOS.
    assert tok.encode("[RIYA] hey are we still going tonight?") == [
        1, 733, 8671, 28802, 28741, 28793, 28139, 460, 478, 1309, 1404, 11402, 28804]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)


def test_matches_transformers_tokenizer_built_from_the_same_file(tok, model_file, tmp_path):
    from transformers import LlamaTokenizer

    shutil.copy(model_file, tmp_path / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(tmp_path)
    assert hf.bos_token_id == tok.bos_id
    for s in CHAT:  # (built from a bare tokenizer.model, transformers does not add BOS itself)
        assert tok.encode(s) == [tok.bos_id] + hf(s, add_special_tokens=False)["input_ids"]
    # Not compared: text with runs of spaces. transformers 5 rebuilds this file as a Metaspace
    # tokenizer that merges "▁▁" across words ("a  b" -> ▁a ▁▁ b), while SentencePiece, which Mistral
    # was trained with, keeps "▁b" whole (▁a ▁ ▁b). We use SentencePiece itself.


@pytest.mark.parametrize("s", CHAT + ["  two leading spaces", " one", "a  b   c", "", "\n"])
def test_decode_inverts_encode(tok, s):
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("a, b", [("[RIYA] hey", "\n[FRIEND] yo"), ("[RIYA] hey", " there"),
                                  ("ok", "\n\n[SAM] 🙂 8:30")])
def test_continuation_segments_concatenate_like_the_whole_text(tok, a, b):
    whole = tok.encode(a + b)
    assert tok.encode(a) + tok.encode(b, start=False) == whole
    # Why it matters: SentencePiece's dummy-prefix space would otherwise appear at every join.
    naive = tok.encode(a) + tok.encode(b)[1:]  # [1:] drops the second BOS
    assert naive != whole
