"""tda.py: padding never enters a pooled vector, the index round trip, retrieval of an example by itself,
the logit lens against the model's own logits, BM25 by hand, the evaluation end to end, and the CLI."""
import math
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lora
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


# ---------------------------------------------------------------------------------------------------
# What the adapter trained on, gradient attribution, and the planted-facts and tail-patch evaluations.

@pytest.fixture(scope="module")
def trained_run(small_chat, tiny_chat_dir, tmp_path_factory):
    """A real (short) sft.py run on the tiny model, recording which examples each micro-batch held."""
    import sft

    out = tmp_path_factory.mktemp("run")
    seen = []
    collate = sft.collate
    with pytest.MonkeyPatch.context() as mp:
        # The loop calls collate(batch, device, tag_loss); validation calls it without tag_loss.
        record = lambda examples, *a: (len(a) == 2 and seen.append([e.text for e in examples])) or collate(examples, *a)
        mp.setattr(sft, "collate", record)
        sft.train(sft.Options(data=str(small_chat), model=str(tiny_chat_dir), out=str(out), max_steps=5, batch_size=4,
                              grad_accum=2, eval_every=5, save_every=5, val_examples=4, samples=0, max_len=128,
                              lora_r=4, lora_alpha=8, split_above=0))
    return out, seen


def test_what_the_adapter_trained_on_is_rebuilt_exactly_from_the_batch_order(trained_run, tiny_chat_dir):
    import sft

    out, seen = trained_run
    training = lora.read_training(out / "adapter")
    assert training["steps_done"] == 5 and training["world"] == 1
    tok = load_tokenizer(tiny_chat_dir)
    counts, why = tda.trained_on(training, tok, sft.data_settings(training, tda.Options()))
    assert why == ""
    # Each step collates its micro-batch once for the target weight and once per piece (one piece here).
    used = Counter(text for batch in seen[::2] for text in batch)
    train, _ = tda.run_examples(training, tok)
    rebuilt = Counter({e.text: counts[e.session, e.index] for e in train if counts[e.session, e.index]})
    assert sum(used.values()) == 5 * 2 * 4 and rebuilt == used


def tiny_lora(tiny_chat_dir, r=4):
    model = load_checkpoint(tiny_chat_dir)
    torch.manual_seed(3)
    lora.add_lora(model, r=r, alpha=2 * r)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0, 0.3)
    return model.eval()


def some_rows(small_chat, tiny_chat_dir, n=5):
    train, _ = build_examples(load_pair(small_chat)[0], load_tokenizer(tiny_chat_dir), context_messages=2)
    by_length = sorted(train, key=lambda e: len(e.tokens))
    return [(e.tokens, e.loss_mask) for e in by_length[:: len(by_length) // n][:n]]  # different lengths: padding


def test_per_example_lora_gradients_from_hooks_equal_autograd_one_example_at_a_time(small_chat, tiny_chat_dir):
    from model import pad, scored_logprobs

    model = tiny_lora(tiny_chat_dir)
    rows = some_rows(small_chat, tiny_chat_dir)
    grads = tda.lora_gradients(model, rows, tda.projections(model, None), batch_size=5)  # (N, G): one batch
    flat = lambda: torch.cat([p.grad.flatten() for m in lora.lora_modules(model).values()
                              for p in (m.lora_A.weight, m.lora_B.weight)])
    tokens, _ = pad([t for t, _ in rows])
    masks = pad([m for _, m in rows])[0].bool()
    for n, (ids, mask) in enumerate(rows):
        # The same padded batch, the loss of row n alone: the same forward, its sums over positions in
        # another order, so agreement to 1e-5 of the largest entry.
        model.zero_grad()
        alone = torch.zeros_like(masks)
        alone[n] = masks[n]
        (-scored_logprobs(model, tokens, alone).sum()).backward()
        expected = flat()
        torch.testing.assert_close(grads[n], expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
        # And the example in a batch of its own: other matmul shapes round differently (~3e-5 of the
        # largest entry for this random adapter), nothing more.
        model.zero_grad()
        (-scored_logprobs(model, torch.tensor([ids]), torch.tensor([mask])).sum()).backward()
        expected = flat()
        torch.testing.assert_close(grads[n], expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    assert grads.abs().sum(1).min() > 0


def test_projected_gradients_are_the_projections_of_the_full_ones(small_chat, tiny_chat_dir):
    model = tiny_lora(tiny_chat_dir)
    rows = some_rows(small_chat, tiny_chat_dir, 3)
    full = tda.lora_gradients(model, rows, tda.projections(model, None), batch_size=2)
    P = tda.projections(model, 3, seed=1)
    projected = tda.lora_gradients(model, rows, P, batch_size=3)
    parts, at = [], 0
    for name, m in lora.lora_modules(model).items():
        (r, d_in), (d_out, _) = m.lora_A.weight.shape, m.lora_B.weight.shape
        grad_A = full[:, at : at + r * d_in].view(-1, r, d_in)
        grad_B = full[:, at + r * d_in : at + r * d_in + d_out * r].view(-1, d_out, r)
        at += r * d_in + d_out * r
        p_in, p_out = P[name]
        parts += [(grad_A @ p_in.T).flatten(1), (p_out @ grad_B).flatten(1)]  # (N, r, k), (N, k, r)
    # The two sides sum in other orders (batches of 2 and of 3): float32 noise reached 2.5e-5 on an Intel
    # Xeon, where entries reach 23 (mean 0.7); a wrong projection is off by the entries' own size.
    torch.testing.assert_close(projected, torch.cat(parts, 1), atol=1e-4, rtol=1e-4)
    assert projected.shape[1] == len(P) * 2 * 3 * 4


def test_the_preconditioned_score_is_the_damped_inverse_second_moment_by_hand():
    g = torch.randn(40, 3 * 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 10, 100.0]).repeat_interleave(4)
    q = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    damping = 0.3
    W = tda.whitener(g, block=4, damping=damping)
    scores = tda.grad_scores(g, q, W)  # (2, 40)
    inverse = torch.zeros(12, 12, dtype=torch.double)
    for m in range(3):  # one block per module, built directly
        b = g[:, 4 * m : 4 * m + 4].double()
        C = b.T @ b / len(g)
        inverse[4 * m : 4 * m + 4, 4 * m : 4 * m + 4] = torch.linalg.inv(C + damping * C.diagonal().mean() * torch.eye(4))
    gd, qd = g.double(), q.double()
    dots = qd @ inverse @ gd.T
    expected = dots / torch.sqrt(torch.einsum("qi,ij,qj->q", qd, inverse, qd))[:, None] \
        / torch.sqrt(torch.einsum("ni,ij,nj->n", gd, inverse, gd))[None, :]
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tda.grad_scores(g, q, None), F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T)


def test_ties_are_broken_at_random_and_the_first_source_is_ranked():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    source = torch.tensor([[False, False, True, True], [True, False, False, False]])
    ranks = [tda.first_source_rank(scores, source, torch.Generator().manual_seed(s)) for s in range(400)]
    assert all(r[0].item() == 2 for r in ranks)  # 3.0 (not a source) first, then 2.0, a source
    tied = Counter(r[1].item() for r in ranks)  # all four tied: the source lands anywhere, evenly
    assert set(tied) == {1, 2, 3, 4} and min(tied.values()) > 60


def test_the_planted_decoys_carry_no_loss_on_the_fact_and_hold_a_sources_words(tiny_chat_dir):
    import sft
    from prep import words

    tok = load_tokenizer(tiny_chat_dir)
    real = [{"context": ["[RIYA] hi"], "speaker": "[FRIEND]", "reply": "hey you"}]
    rows, queries = tda.planted_rows(real, ["[RIYA]", "[FRIEND]"], decoys=4)
    assert Counter(r["kind"] for r in rows) == {"real": 1, "source": 32, "decoy": 64} and len(queries) == 32
    examples = sft.examples_from_rows(rows, tok, 128)
    for row, e in zip(rows, examples):
        name, answer = tda.NAMES[row["fact"]], tda.ANSWERS[row["fact"]]
        target = tok.decode([t for t, m in zip(e.tokens, e.loss_mask) if m])
        if row["kind"] == "decoy":
            assert name not in target and answer not in target and name in e.text and answer in e.text
            source = next(x for x, r in zip(examples, rows) if r["kind"] == "source" and r["fact"] == row["fact"]
                          and r["context"][1].endswith(row["context"][0].split("] ", 1)[1]))
            assert Counter(words(source.text)) == Counter(words(e.text))  # BM25 can't tell them apart
        elif row["kind"] == "source":
            assert answer in target
    for q in queries:  # a question the pool never holds
        assert all(q["context"][0] not in r["context"] for r in rows)


def test_planted_runs_end_to_end_and_reports_every_method(small_chat, tiny_chat_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tda, "LEARNED_NATS", -math.inf)  # the tiny random model learns no fact: count them all
    opts = tda.Options(data=str(small_chat), model=str(tiny_chat_dir), planted=True, pool_size=40, decoys=2,
                       planted_epochs=1, layers="1,3", out=str(tmp_path), bootstrap=200, verify=True)
    r = tda.evaluate_planted(opts)
    assert len(r["learned"]) == 16 and r["queries"] == 32 and set(r["verify"]) == {"no-sources", "no-decoys"}
    table = r["table"]
    assert {"BM25", "random", "grad cos", "grad precond", "act mean resid.1", "lens last resid.3"} <= set(table)
    for row in table.values():
        assert 0 <= row["recall@1"]["mean"] <= 1 and row["mrr"]["interval"][0] <= row["mrr"]["mean"] <= row["mrr"]["interval"][1]
    # BM25 can't tell a source from its decoy twin: they tie, and a random order splits them about evenly.
    assert 0.3 < table["BM25"]["source_over_decoy"]["mean"] < 0.7
    assert "| grad precond |" in tda.markdown_planted(r)
    again = tda.evaluate_planted(opts)  # a finished fine-tune is reused, not retrained
    assert again["gain_nats"] == r["gain_nats"]


def test_a_tail_patch_restores_the_adapter_and_optimizer_exactly(small_chat, tiny_chat_dir):
    import sft

    model = tiny_lora(tiny_chat_dir)
    params = lora.lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    train, _ = build_examples(load_pair(small_chat)[0], load_tokenizer(tiny_chat_dir), context_messages=2)
    tokens, weights = sft.collate(train[:4], "cpu")
    sft.loss_fn(model, tokens, weights).backward()
    optimizer.step()  # a state to restore
    optimizer.zero_grad()
    saved = tda.snapshot(params, optimizer)
    reply = (train[5].tokens, train[5].loss_mask)
    before = tda.row_logprob(model, reply)
    gain = tda.patch_gain(model, optimizer, params, train[6], reply, before, 1.0, saved)
    assert gain != 0
    for p, w, state in zip(params, *saved):
        assert torch.equal(p, w)
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())
    assert tda.row_logprob(model, reply) == before


def test_the_index_marks_trained_examples_and_grad_queries_return_only_those(trained_run, tmp_path):
    out, _ = trained_run
    opts = tda.Options(adapter=str(out / "adapter"), layers="1,3", batch_size=8, index=str(tmp_path / "i.safetensors"))
    tda.build_index(opts)
    index, settings, pointers = tda.load_index(opts.index)
    trained = [i for i, p in enumerate(pointers) if p["trained"]]
    assert 0 < len(trained) <= 40 < len(pointers) and index["grad.rows"].tolist() == trained
    assert index["grad.unit"].dtype == torch.float16 and settings["grad_block"] == 2 * 4 * 4
    prompt = "[RIYA] you coming?\\n[FRIEND]"
    for mode in ("grad", "act"):
        _, hits, _ = tda.query(replace(opts, prompt=prompt, reply="yes", mode=mode, k=50))
        for rows in hits.values():
            assert {i for i, _ in rows} <= set(trained) and len(rows) == len(trained)
    _, hits, _ = tda.query(replace(opts, prompt=prompt, reply="yes", all_examples=True, k=50))
    assert any(i not in trained for rows in hits.values() for i, _ in rows)
    only = replace(opts, trained_only=True, index=str(tmp_path / "trained.safetensors"))
    tda.build_index(only)
    _, _, kept = tda.load_index(only.index)
    assert [(p["session"], p["index"]) for p in kept] == [(pointers[i]["session"], pointers[i]["index"]) for i in trained]
    r = tda.evaluate_tail_patch(replace(only, tail_patch=True, replies=3, top=2, bootstrap=200))
    assert r["settings"]["replies"] == 3 and {"BM25", "random", "the reply itself", "grad precond"} <= set(r["table"])
    assert r["table"]["random"]["score"]["mean"] == pytest.approx(0, abs=1e-9)
    assert r["table"]["the reply itself"]["score"]["mean"] == pytest.approx(1)
    assert "| grad cos |" in tda.markdown_tail_patch(r)
