"""tda.py: padding never enters a pooled vector, the index round trip, retrieval of an example by itself,
the logit lens against the model's own logits, BM25 by hand, the evaluation end to end, and the CLI."""
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tda
from model import BadInput, capture, load_checkpoint, load_tokenizer
from prep import build_examples, load_pair, one_line, tag
from conftest import script



@pytest.fixture(scope="module")
def indexed(small_chat, tiny_adapter, tmp_path_factory):
    """An index of small_chat built with the tiny model and its adapter: (options, tensors, settings, pointers)."""
    opts = tda.Options(data=str(small_chat), adapter=str(tiny_adapter), layers="1,3", batch_size=8,
                       index=str(tmp_path_factory.mktemp("tda") / "index.safetensors"))
    tda.build_index(opts)
    return (opts, *tda.load_index(opts.index))


@pytest.fixture(scope="module")
def chat_model(tiny_chat_dir):
    return load_checkpoint(tiny_chat_dir), load_tokenizer(tiny_chat_dir)


def assert_same_top(ids_a, p_a, ids_b, p_b):
    """Two top-k lists agree up to near-ties, which rounding may swap (the tiny random model's
    distribution is nearly uniform): an id in both has the same probability, and an id in only one
    sits at the cut, no likelier than the other list's least likely."""
    a, b = dict(zip(ids_a.tolist(), p_a.tolist())), dict(zip(ids_b.tolist(), p_b.tolist()))
    for i in a.keys() & b.keys():
        assert a[i] == pytest.approx(b[i], rel=1e-4, abs=1e-9)
    for mine, other in ((a, b), (b, a)):
        for i in mine.keys() - other.keys():
            assert mine[i] <= min(other.values()) * (1 + 1e-4)


def test_padding_never_enters_a_pooled_vector(chat_model, small_chat):
    model, tok = chat_model
    train, _ = build_examples(load_pair(small_chat)[0], tok, context_messages=2)
    by_length = {len(e.tokens): (e.tokens, e.loss_mask) for e in train}
    lengths = sorted(by_length)
    rows = [by_length[n] for n in lengths[:: len(lengths) // 6][:6]]  # six lengths: all but the longest padded
    batched = tda.pool(model, rows, [0, 2, 3], batch_size=6)
    for j, row in enumerate(rows):
        alone = tda.pool(model, [row], [0, 2, 3], batch_size=1)
        for name in alone:
            if name.endswith(".ids"):
                p = name.removesuffix(".ids") + ".p"
                assert_same_top(batched[name][j], batched[p][j], alone[name][0], alone[p][0])
            else:
                torch.testing.assert_close(batched[name][j], alone[name][0], atol=1e-5, rtol=1e-4, msg=name)

    # The test can fail: the naive mean over the shortest sequence's padded row is another vector.
    T = len(rows[-1][0])
    tokens = torch.zeros(2, T, dtype=torch.long)
    tokens[0, : len(rows[0][0])], tokens[1] = torch.tensor(rows[0][0]), torch.tensor(rows[-1][0])
    acts = {}
    with torch.no_grad():
        model(tokens, hooks=capture(acts, "resid.2"), unembed=False)
    naive = acts["resid.2"][0].mean(0)
    assert not torch.allclose(naive, batched["act.all.2"][0], atol=1e-3)


def test_the_index_round_trips_and_points_back_to_each_example(indexed, small_chat, tiny_chat_dir):
    opts, index, settings, pointers = indexed
    tok = load_tokenizer(tiny_chat_dir)
    messages, _ = load_pair(small_chat)
    train, _ = build_examples(messages, tok, context_messages=2)
    N, D = len(train), 64
    assert settings["layers"] == [1, 3] and settings["adapter"] == opts.adapter
    assert settings["model"] == str(tiny_chat_dir) and settings["context_messages"] == 2
    assert len(pointers) == N > 100
    for L in (1, 3):
        for p in ("mean", "last", "all"):
            assert index[f"act.{p}.{L}"].shape == (N, D) and index[f"act.{p}.{L}"].isfinite().all()
        for p in ("mean", "last"):
            assert index[f"lens.{p}.{L}.ids"].shape == index[f"lens.{p}.{L}.p"].shape == (N, tda.LENS_TOP)
            assert index[f"lens.{p}.{L}.norm"].shape == (N,)
    for e, ptr in zip(train, pointers):
        m = messages[ptr["message"]]
        assert (m.speaker, m.text, m.time.isoformat()) == (ptr["speaker"], ptr["text"], ptr["time"])
        assert e.text.endswith(f"{tag(m.speaker)} {one_line(m.text)}\n")
    assert not list(Path(opts.index).parent.glob(".*tmp"))  # written atomically: no temporary file left


def test_a_query_equal_to_an_indexed_example_retrieves_it_first(indexed, small_chat, tiny_chat_dir):
    opts, index, settings, pointers = indexed
    train, _ = build_examples(load_pair(small_chat)[0], load_tokenizer(tiny_chat_dir), context_messages=2)
    # An example with two lines of context whose target text is unique, and whose last 4 tokens are too:
    # the tiny model's sliding window is 4, so the last token's stream sees no further back.
    texts = Counter(p["text"] for p in pointers)
    ends = Counter(tuple(e.tokens[-4:]) for e in train)
    j = next(j for j, e in enumerate(train) if e.text.count("\n") == 3 and texts[pointers[j]["text"]] == 1
             and ends[tuple(e.tokens[-4:])] == 1)
    e = train[j]
    # The example's context (its lines up to the target's tag) is the prompt, its target the reply.
    opts = replace(opts, prompt=e.text[: e.cut], reply=one_line(pointers[j]["text"]), mode="act", k=3)
    for pool in ("mean", "last", "all"):
        reply, hits, _ = tda.query(replace(opts, pool=pool))
        for L, rows in hits.items():
            assert rows[0][0] == j and rows[0][1] == pytest.approx(1.0, abs=1e-5), (pool, L)
            assert rows[1][1] < 1 - 1e-4


def test_the_lens_at_the_last_site_equals_the_final_logits(tiny):
    ids = torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    lens = tda.logit_lens(tiny, ids, list(range(9)))  # (n_layers + 1, T, V)
    assert lens.shape == (tiny.cfg.n_layers + 1, 9, 101)
    with torch.no_grad():
        torch.testing.assert_close(lens[-1], tiny(torch.tensor([ids]))[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lens[-2], lens[-1], atol=1e-2)  # an earlier layer predicts something else


def test_the_sparse_lens_cosine_is_the_dense_one_when_nothing_is_cut(tiny):
    # tiny's vocabulary (101) is smaller than LENS_TOP, so every probability is stored: exact cosines.
    rows = [(torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist(),
             [False] * 3 + [True] * (n - 3)) for n in (6, 9, 12)]
    pooled = tda.pool(tiny, rows, [2], batch_size=3)
    for p in ("mean", "last"):
        dense = torch.zeros(3, 101).scatter_(1, pooled[f"lens.{p}.2.ids"].long(), pooled[f"lens.{p}.2.p"])
        expected = F.normalize(dense, dim=-1) @ F.normalize(dense, dim=-1).T
        torch.testing.assert_close(tda.similarity(pooled, pooled, f"lens.{p}.2", 101), expected)



def test_paraphrases_are_seeded_and_edit_the_text():
    text = "I do not think we should go there tonight, honestly."
    a, b = tda.paraphrase(text, random.Random(3)), tda.paraphrase(text, random.Random(3))
    assert a == b != text
    assert tda.contraction("I do not know", random.Random(0)) == "I don't know"
    assert tda.no_punctuation("Don't GO, ok?!", None) == "dont go ok"


def test_eval_runs_end_to_end_and_bm25_finds_copies(indexed, tmp_path):
    opts, *_ = indexed
    result = tda.evaluate(replace(opts, queries=20, out=str(tmp_path)))
    recall = result["recall"]
    assert len(recall) == 1 + 2 * (3 + 2)  # BM25, then 2 layers x (3 act poolings + 2 lens poolings)
    assert recall["BM25"]["copy R@1"] >= 0.9 and recall["BM25"]["paraphrase R@10"] >= 0.5
    assert all(0 <= v <= 1 for row in recall.values() for v in row.values())
    table = tda.markdown(result)
    assert "| act mean resid.3 |" in table and "Best by R@1" in table and result["best"]["copy"]


def test_bad_layers_are_one_sentence_naming_the_flag():
    with pytest.raises(BadInput, match="--layers 31"):
        tda.parse_layers("31", 30)
    with pytest.raises(BadInput, match="--layers"):
        tda.parse_layers("7,x", 30)
    assert tda.parse_layers("", 30) == [7, 15, 22]



def test_cli_a_missing_index_is_one_line_and_exit_status_2(tmp_path):
    out = script("tda.py", "query", "--index", str(tmp_path / "none.safetensors"), "--prompt", "[RIYA] hi\\n[FRIEND]")
    assert out.returncode == 2 and out.stderr.startswith("error: --index") and len(out.stderr.splitlines()) == 1


def test_cli_query_samples_a_reply_and_lists_examples_per_layer(indexed):
    opts, *_ = indexed
    out = script("tda.py", "query", "--index", opts.index, "--prompt", "[RIYA] you coming?\\n[FRIEND]", "--k", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[FRIEND] ") and lines[0].endswith("(sampled)")
    assert "resid.1 (act, mean pooling)" in lines and "resid.3 (act, mean pooling)" in lines
    assert len([l for l in lines if l.lstrip().startswith(("1 ", "2 "))]) == 4  # 2 examples x 2 layers


def test_cli_lens_prints_every_layer_and_draws_the_heatmap(tiny_chat_dir, tmp_path):
    out = script("tda.py", "lens", "--base", "--model", str(tiny_chat_dir), "--prompt", "[RIYA] you coming?\\n[FRIEND]",
              "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()[1:5]] == ["resid.0", "resid.1", "resid.2", "resid.3"]
    assert (tmp_path / "lens.png").stat().st_size > 10_000
