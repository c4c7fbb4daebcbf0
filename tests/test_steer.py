"""steer.py and sample.py --steer: the concept score follows the sign of alpha, zero steering changes
nothing, the coherence bounds reject an absurd push, steered cached decoding equals a steered full
forward, vector files round-trip and drive the CLI, and the probe finds a planted direction."""
import json
import math

import pytest
import torch

import sample
import steer
from model import BadInput, KVCache, load_checkpoint, load_tokenizer
from conftest import ROOT, script

PAIRS = ROOT / "data" / "steer" / "happy.json"
LAYER = 15  # the middle of SmolLM2's 30 layers


@pytest.fixture(scope="module")
def happy(smol):
    """The shipped pairs, their vectors at resid.LAYER of SmolLM2, and `unit`: the alpha that pushes along
    v_pos - v_neg by the stream's whole norm there (the search's r = 1)."""
    model, tok = smol
    data = steer.read_pairs(PAIRS)
    v_pos, v_neg = (v[LAYER] for v in steer.contrast_vectors(model, tok, data["pairs"])["mean"])
    norm = steer.pooled_streams(model, tok, data["prompts"][:4])["norm"][LAYER].mean()
    return data, v_pos, v_neg, (norm / (v_pos - v_neg).norm()).item()


def steering(v_pos, v_neg, alpha_pos, alpha_neg=None):
    alpha_neg = alpha_pos if alpha_neg is None else alpha_neg
    return {f"resid.{LAYER}": sample.steering_hook(v_pos, v_neg, alpha_pos, alpha_neg)}


def test_positive_alpha_raises_and_negative_alpha_lowers_the_concept_score(smol, happy):
    model, tok = smol
    data, v_pos, v_neg, unit = happy
    prompts, words = data["prompts"][:6], steer.concept_words(tok, data)
    unsteered = steer.concept_score(model, tok, prompts, words)
    happier = steer.concept_score(model, tok, prompts, words, steering(v_pos, v_neg, 0.2 * unit))
    sadder = steer.concept_score(model, tok, prompts, words, steering(v_pos, v_neg, -0.2 * unit))
    assert sadder < unsteered - 1 and happier > unsteered + 1


def test_alpha_zero_and_a_zero_vector_change_nothing(smol, happy):
    model, tok = smol
    data, v_pos, v_neg, unit = happy
    tokens = torch.tensor([tok.encode(data["prompts"][0])])
    plain = model(tokens)
    zero = torch.zeros_like(v_pos)
    assert torch.equal(model(tokens, hooks=steering(v_pos, v_neg, 0.0)), plain)
    assert torch.equal(model(tokens, hooks=steering(zero, zero, 3.0)), plain)
    assert not torch.equal(model(tokens, hooks=steering(v_pos, v_neg, 0.1 * unit)), plain)  # the hook does run


def friend_examples(tok, n=4):
    """A few training examples whose reply is the friend's, from the start of the shipped chats."""
    from prep import build_examples, load_pair

    messages, _ = load_pair(ROOT / "data" / "convos.jsonl")
    train, _ = build_examples(messages[:300], tok, context_messages=3)
    return [e for e in train if e.text[: e.cut].endswith("\n[FRIEND]")][:n]


def test_the_coherence_bounds_reject_an_absurd_alpha(smol, happy):
    model, tok = smol
    data, v_pos, v_neg, unit = happy
    data = {**data, "prompts": data["prompts"][:4], "neutral": data["neutral"][:6], "cost": friend_examples(tok)}
    opts = steer.Options(sample_tokens=8)
    ref = steer.unsteered(model, tok, data, opts)
    gentle = steer.score(model, tok, data, ref, steering(v_pos, v_neg, 0.02 * unit), opts)
    absurd = steer.score(model, tok, data, ref, steering(v_pos, v_neg, 50 * unit), opts)
    assert gentle["ok"] and gentle["kl"] < opts.max_kl
    assert not absurd["ok"] and absurd["kl"] > opts.max_kl and absurd["ppl_ratio"] is None
    # and the perplexity bound on its own, with the KL bound lifted: its replies are not chat
    lifted = steer.Options(sample_tokens=8, max_kl=float("inf"))
    absurd = steer.score(model, tok, data, ref, steering(v_pos, v_neg, 50 * unit), lifted)
    assert not absurd["ok"] and absurd["ppl_ratio"] > lifted.max_ppl_ratio and absurd["nll_rise"] is None
    # and the cost to the person on its own: the friend's real messages get less likely
    only_nll = steer.Options(sample_tokens=8, max_kl=float("inf"), max_ppl_ratio=float("inf"))
    absurd = steer.score(model, tok, data, ref, steering(v_pos, v_neg, 50 * unit), only_nll)
    assert not absurd["ok"] and absurd["nll_rise"] > only_nll.max_nll_rise
    assert gentle["nll_rise"] <= opts.max_nll_rise


def test_steering_in_cached_decoding_equals_steering_in_a_full_forward(tiny, smol, happy):
    # The oracle on the tiny model (sliding window 4, shorter than the sequence): on SmolLM2's 30 layers
    # cached and full forwards differ by ~5e-5 in the logits with or without steering, float32 noise.
    g = torch.Generator().manual_seed(0)
    v_pos, v_neg = torch.randn(2, tiny.cfg.dim, generator=g)
    hooks = {"resid.1": sample.steering_hook(v_pos, v_neg, 1.0, 0.5)}  # unequal alphas: the common part too
    tokens = torch.randint(0, tiny.cfg.vocab_size, (2, 12), generator=g)
    full = tiny(tokens, hooks=hooks)  # (B, T, V)
    assert not torch.allclose(full, tiny(tokens), atol=1e-2)
    cache = KVCache(tiny.cfg, 2, 12)
    steps = [tiny(tokens[:, :5], cache=cache, hooks=hooks)]  # prefill, then one token at a time
    steps += [tiny(tokens[:, t : t + 1], cache=cache, hooks=hooks) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # sample.generate steers its prefill and every decoding step: its greedy reply on SmolLM2 is the one
    # that steered full forwards over the growing sequence choose.
    model, tok = smol
    data, v_pos, v_neg, unit = happy
    hooks = steering(v_pos, v_neg, 0.2 * unit)
    prompt = data["prompts"][0]
    ids = tok.encode(prompt)
    for _ in range(8):
        ids.append(model(torch.tensor([ids]), hooks=hooks)[0, -1].argmax().item())
    opts = sample.Options(temperature=0, repetition_penalty=1.0, max_new_tokens=8)
    reply = sample.generate(model, tok, [prompt], opts, hooks=hooks)[0]
    assert reply and reply == " ".join(tok.decode(ids)[len(prompt) :].split("\n")[0].split())
    assert reply != sample.generate(model, tok, [prompt], opts)[0]


def test_perplexity_through_a_shared_prompt_cache_equals_scoring_each_row_alone(smol):
    model, tok = smol
    prompts = ["[RIYA] how was your day?\n[FRIEND]", "[RIYA] hi\n[FRIEND] hey\n[RIYA] what's up with you lately?\n[FRIEND]"]
    asked = [prompts[0], prompts[1], prompts[0], prompts[1], prompts[0]]
    replies = ["great thanks", "not much, work mostly and you?", "", "ok", "tired but good, you"]
    nll, count = 0.0, 0
    for p, r in zip(asked, replies):  # the oracle: one unpadded forward over prompt + reply per row
        if r:
            prompt, reply = tok.encode(p), tok.encode(" " + r, start=False)
            tokens = torch.tensor([prompt + reply])
            scored = torch.tensor([[False] * len(prompt) + [True] * len(reply)])
            lp = steer.scored_logprobs(model, tokens, scored)
            nll, count = nll - lp.sum().item(), count + len(lp)
    direct = torch.tensor(nll / count).exp().item()
    assert steer.perplexity(model, tok, asked, replies, chunk=3) == pytest.approx(direct, rel=1e-4)
    assert steer.perplexity(model, tok, asked[:1], [""]) == float("inf")


def test_alphas_push_by_r_along_the_contrast_and_t_along_the_common_mean():
    v_pos, v_neg = torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(0))
    vectors, norms = {"mean": (v_pos, v_neg)}, torch.tensor([7.0])
    a_pos, a_neg = steer.alphas(steer.Setting(0, 0, "mean", r=0.3, t=-0.1), vectors, norms)
    assert abs((a_pos + a_neg) / 2 * (v_pos - v_neg).norm() - 0.3 * 7) < 1e-4
    assert abs((a_pos - a_neg) * ((v_pos + v_neg) / 2).norm() + 0.1 * 7) < 1e-4
    assert steer.alphas(steer.Setting(0, 0, "mean", r=0.3, t=0.0), vectors, norms)[0] == \
        steer.alphas(steer.Setting(0, 0, "mean", r=0.3, t=0.0), vectors, norms)[1]


def test_each_setting_is_scaled_along_its_own_direction_to_just_under_the_cost_bound():
    bound = 0.03
    # A cost that grows as r^2 (the first step assumes r^1.5, the next fits the power from two measures)
    # and one that grows as r^1.2: both land in [AIM^2 * bound, bound] within the measures allowed.
    for k in (2.0, 1.2):
        measured = []
        rise_of = lambda s, measured=measured, k=k: measured.append(s) or 0.5 * s.r ** k
        s, rise, tried = steer.to_the_bound(steer.Setting(20, 20, "mean", 0.3, 0.06), rise_of, bound)
        assert steer.AIM ** 2 * bound <= rise <= bound and rise == pytest.approx(0.5 * s.r ** k)
        assert s.t / s.r == pytest.approx(0.06 / 0.3, rel=1e-3) and (s.extract, s.steer, s.pooling) == (20, 20, "mean")
        assert [x.r for x in measured] == [r for r, _ in tried] and len(tried) <= 3
    # already within: measured once, unchanged
    s0 = steer.Setting(10, 11, "last", 0.1, 0.0)
    assert steer.to_the_bound(s0, lambda s: 0.028, bound) == (s0, 0.028, [[0.1, 0.028]])
    # a push that costs nothing grows by at most MAX_SCALE per measure; one whose cost cannot get
    # under the bound comes back over it, for the bound to reject
    s, rise, tried = steer.to_the_bound(s0, lambda s: 0.0, bound)
    assert s.r == pytest.approx(0.1 * steer.MAX_SCALE ** 2) and rise == 0.0 and len(tried) == 3
    s, rise, tried = steer.to_the_bound(s0, lambda s: 1.0, bound)
    assert rise > bound and len(tried) == 3


def test_random_settings_keep_the_steering_layer_near_the_extraction_layer():
    tried = steer.settings(n_layers=30, trials=200, max_distance=3, seed=0)
    assert len(tried) == 3 + 200 and tried == steer.settings(30, 200, 3, 0)
    assert all(1 <= s.extract <= 29 and 1 <= s.steer <= 29 and abs(s.steer - s.extract) <= 3 for s in tried)
    assert {s.pooling for s in tried} == {"mean", "last"} and any(s.t != 0 for s in tried)


def test_the_probe_recovers_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(32, generator=g)
    w_true /= w_true.norm()
    X = 4 + torch.randn(400, 32, generator=g)  # an offset, as a residual stream has
    rating = (1 + 4 * torch.sigmoid(3 * (X - 4) @ w_true)).round()
    w, b = steer.train_probe(X[:300], (rating[:300] - 1) / 4, l2=1e-2)
    assert torch.nn.functional.cosine_similarity(w, w_true, dim=0) > 0.9
    held_out = steer.probe_metrics(X[300:] @ w + b, rating[300:])
    assert held_out["accuracy"] > 0.9 and held_out["correlation"] > 0.8


def test_a_saved_vector_round_trips_with_its_metadata(tmp_path):
    v_pos, v_neg = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "happy.safetensors"
    steer.save_vector(path, v_pos, v_neg, {"model": "smollm2-135m", "adapter": "", "steer_layer": 12,
                                           "alpha_pos": 1.25, "alpha_neg": 0.75, "kl": 0.1})
    p, n, meta = sample.read_steering(path)
    assert torch.equal(p, v_pos) and torch.equal(n, v_neg)
    assert meta == {"model": "smollm2-135m", "adapter": "", "steer_layer": 12, "alpha_pos": 1.25,
                    "alpha_neg": 0.75, "kl": "0.1"}
    assert list(tmp_path.iterdir()) == [path]  # written through a temporary file, renamed


def tiny_vector(path, tiny_chat_dir, tiny_adapter, dim=64, layer=1):
    # Norm ~4,000: the tiny adapter's large random weights make a stream of norm ~1,000 to 10,000.
    v_pos, v_neg = 500 * torch.randn(2, dim, generator=torch.Generator().manual_seed(0))
    steer.save_vector(path, v_pos, v_neg, {
        "model": str(tiny_chat_dir), "adapter": str(tiny_adapter), "steer_layer": layer, "alpha_pos": 1.0,
        "alpha_neg": 0.5})
    return path


def test_steer_specs_add_up_and_alpha_zero_is_no_steering(tiny_chat_dir, tiny_adapter, tmp_path, capsys):
    model, tok = load_checkpoint(tiny_chat_dir), load_tokenizer(tiny_chat_dir)
    a = tiny_vector(tmp_path / "a.safetensors", tiny_chat_dir, tiny_adapter)
    b = tiny_vector(tmp_path / "b.safetensors", tiny_chat_dir, tiny_adapter, layer=2)
    made_on = {"model": str(tiny_chat_dir), "adapter": str(tiny_adapter)}
    tokens = torch.tensor([tok.encode("[RIYA] hi\n[FRIEND]")])
    logits = lambda spec: model(tokens, hooks=sample.steering_hooks(spec, model, made_on))
    torch.testing.assert_close(logits(f"{a}:1,{a}:1"), logits(f"{a}:2"))  # one site, summed
    assert sorted(sample.steering_hooks(f"{a}:1,{b}:-1", model, made_on)) == ["resid.1", "resid.2"]
    assert torch.equal(logits(f"{a}:0"), model(tokens)) and not torch.equal(logits(f"{a}:1"), model(tokens))
    assert capsys.readouterr().err == ""  # made on this model and adapter: no warning
    sample.steering_hooks(f"{a}:1", model, {"model": "smollm2-135m", "adapter": ""})
    assert capsys.readouterr().err.startswith("warning: --steer ")
    wrong = tiny_vector(tmp_path / "wide.safetensors", tiny_chat_dir, tiny_adapter, dim=65)
    with pytest.raises(BadInput, match="65,.*64 dimensions"):
        sample.steering_hooks(f"{wrong}:1", model, made_on)
    with pytest.raises(BadInput, match="expected NAME:ALPHA"):
        sample.steering_hooks(f"{a}:lots", model, made_on)



def test_cli_steer_changes_the_replies_with_the_same_seed(tiny_chat_dir, tiny_adapter, tmp_path):
    vector = tiny_vector(tmp_path / "v.safetensors", tiny_chat_dir, tiny_adapter)
    args = ["--adapter", str(tiny_adapter), "--prompt", "[RIYA] hi", "--n", "3", "--max-new-tokens", "6"]
    plain, steered = script("sample.py", *args), script("sample.py", *args, "--steer", f"{vector}:2")
    assert plain.returncode == 0 and steered.returncode == 0, steered.stderr
    assert len(steered.stdout.splitlines()) == 3 and steered.stdout != plain.stdout


@pytest.mark.parametrize("spec, says", [
    ("happy", "error: --steer 'happy': expected NAME:ALPHA"),
    ("no_such_vector:1", "error: --steer no_such_vector: no steering vector at out/steer/no_such_vector.safetensors"),
])
def test_cli_bad_steer_is_one_line_and_exit_status_2(tiny_adapter, spec, says):
    out = script("sample.py", "--adapter", str(tiny_adapter), "--prompt", "[RIYA] hi", "--steer", spec)
    assert out.returncode == 2 and out.stderr.startswith(says) and out.stderr.count("\n") == 1


def test_a_missing_or_malformed_pairs_file_names_itself(tmp_path):
    with pytest.raises(BadInput, match="--pairs nowhere.json: no such file"):
        steer.read_pairs("nowhere.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"concept": "happy", "pairs": [')
    with pytest.raises(BadInput, match=f"--pairs {bad}: not valid JSON"):
        steer.read_pairs(bad)
    bad.write_text(json.dumps({**json.loads(PAIRS.read_text()), "prompts": ["[RIYA] hi"]}))
    with pytest.raises(BadInput, match="does not end with the replier's tag"):
        steer.read_pairs(bad)


# ---------------------------------------------------------------------------------------------------
# eval: whole replies, judged, against controls.

def test_vader_and_the_local_judge_read_fixed_strings_the_right_way_round(smol):
    model, tok = smol
    happy_texts = ["omg yay i got the job!! so happy", "this is the best day ever, love you guys"]
    sad_texts = ["ugh everything is awful and i hate it", "i'm so sad, my dog died today"]
    v = steer.vader(happy_texts + sad_texts + [""])
    assert (v[:2] > 0.5).all() and (v[2:4] < -0.5).all() and v[4] == 0
    judged = steer.judge_scores(model, tok, happy_texts + sad_texts)
    assert judged[:2].min() > judged[2:].max()


def test_spearman_is_pearson_of_the_ranks_with_ties_averaged():
    assert steer.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert steer.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # By hand: ranks of [1, 1, 2] are [0.5, 0.5, 2], of [3, 1, 2] are [2, 0, 1].
    a, b = torch.tensor([0.5, 0.5, 2.0]), torch.tensor([2.0, 0.0, 1.0])
    expected = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert steer.spearman([1, 1, 2], [3, 1, 2]) == pytest.approx(expected)


def test_the_prompt_split_is_seeded_disjoint_and_covers_every_prompt():
    prompts = [f"[RIYA] q{i}\n[FRIEND]" for i in range(16)]
    selection, test = steer.split_prompts(prompts, 0)
    assert (selection, test) == steer.split_prompts(prompts, 0) and not set(selection) & set(test)
    assert sorted(selection + test) == sorted(prompts) and len(selection) == len(test) == 8


def test_the_search_never_sees_the_test_prompts(smol, monkeypatch, tmp_path):
    calls = []  # the prompts of each sampling call
    generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda m, t, prompts, *a, **k: calls.append(set(prompts)) or generate(m, t, prompts, *a, **k))
    monkeypatch.setattr(steer, "settings", lambda *a: [steer.Setting(10, 10, "mean", 0.1, 0.0)])
    monkeypatch.chdir(tmp_path)  # the vector lands in tmp_path/out/steer
    (tmp_path / "data").symlink_to(ROOT / "data")  # --base reads sft's default data/convos.jsonl
    opts = steer.Options(pairs=str(PAIRS), base=True, sample_tokens=4, max_kl=1e9, max_ppl_ratio=1e9, max_nll_rise=1e9,
                         cost_messages=2)
    result = steer.search(opts)
    selection, test = (set(x) for x in steer.split_prompts(steer.read_pairs(PAIRS)["prompts"], 0))
    import sft

    tuned = sft.load_tuned(base=True)
    trained = {e.text[: e.cut] for e in steer.replier_examples(tuned, "[FRIEND]", False, opts)}
    held_out = {e.text[: e.cut] for e in steer.replier_examples(tuned, "[FRIEND]", True, opts)}
    # Choosing: the unsteered replies and the one setting's, on the selection half and real contexts
    # from training sessions; then the chosen setting and the unsteered model on the test half,
    # recorded only; then samples to print, from the selection half.
    # The screen, then the re-score of its best (unsteered and the setting), on the same prompts.
    contexts = calls[0] - selection
    assert calls[0] == calls[1] == calls[2] == calls[3] and selection <= calls[0] and len(contexts) == opts.contexts
    assert contexts <= trained and not contexts & held_out and not calls[0] & test
    assert calls[4] == calls[5] == test
    assert all(c <= selection for c in calls[6:])
    _, _, meta = sample.read_steering(result["path"])
    assert {"selection_reply_score", "test_reply_score", "unsteered_test_reply_score"} <= set(meta)
    assert float(meta["selection_reply_score"]) == result["best"]["reply_score"]
    assert float(meta["rescored_reply_score"]) == result["best"]["rescored"]


def test_the_rescore_of_the_screens_best_few_chooses():
    rows = [{"name": n, "reply_score": screen} for n, screen in (("a", 0.5), ("b", 0.4), ("c", 0.3), ("d", 0.2))]
    again = {"a": 0.1, "b": 0.3, "c": 0.2, "d": 0.9}  # d would win, but the screen ranks it out of the top 3
    asked = []
    best = steer.choose(rows, lambda r: asked.append(r["name"]) or again[r["name"]], 3)
    assert best["name"] == "b" and sorted(asked) == ["a", "b", "c"] and rows[0]["rescored"] == 0.1
    assert steer.choose(rows, lambda r: 1 / 0, 0)["name"] == "a"  # 0: the screen chooses, nothing re-scored


def test_the_searchs_cost_messages_come_from_training_sessions_and_evals_from_held_out_ones(tiny_adapter, monkeypatch):
    import sft

    monkeypatch.chdir(ROOT)
    tuned = sft.load_tuned(str(tiny_adapter), "", False)
    opts = steer.Options(pairs=str(PAIRS))
    train, held_out = (steer.replier_examples(tuned, "[FRIEND]", h, opts) for h in (False, True))
    assert train and held_out and all(e.text[: e.cut].endswith("[FRIEND]") for e in train + held_out)
    assert not {e.text for e in train} & {e.text for e in held_out}


def test_each_messages_nll_is_its_own_and_the_cost_interval_pairs_them(tiny_adapter):
    """message_nlls batches messages sorted by length; each example still gets its own reply's summed NLL
    (as scored alone), held_out_nll is their per-token mean, and eval's cost interval (eval.contrast over
    the messages, paired) is zero for a condition against itself and brackets a push's change."""
    import eval as ev
    import sft

    tuned = sft.load_tuned(str(tiny_adapter), "", False)
    model, tok = tuned.model, tuned.tok
    examples = steer.spread(steer.replier_examples(tuned, "[FRIEND]", True, steer.Options(pairs=str(PAIRS))), 20)
    assert len({len(e.tokens) for e in examples}) > 1  # lengths differ, so the batches reorder them
    scores = steer.message_nlls(model, tok, examples)
    for k in (0, len(examples) // 2, len(examples) - 1):
        alone = steer.message_nlls(model, tok, [examples[k]]).nll[0]
        assert scores.nll[k][1] == alone[1] == len(examples[k].tokens) - examples[k].loss_mask.index(True)
        assert scores.nll[k][0] == pytest.approx(alone[0], rel=1e-4)
    nll, tokens = (sum(v[j] for v in scores.nll.values()) for j in (0, 1))
    assert steer.held_out_nll(model, tok, examples) == pytest.approx(nll / tokens, rel=1e-6)
    same = ev.contrast(scores, scores, "token", 200, 0)
    assert same["difference"] == same["low"] == same["high"] == 0
    push = torch.randn(model.cfg.dim, generator=torch.Generator().manual_seed(0))
    pushed = steer.message_nlls(model, tok, examples, {"resid.1": steer.add(200 * push / push.norm())})
    c = ev.contrast(pushed, scores, "token", 200, 0)
    assert c["low"] < c["difference"] < c["high"] and c["difference"] == pytest.approx(
        steer.per_token(pushed) - steer.per_token(scores), abs=1e-9)


def test_the_random_control_has_the_vectors_norm_and_site_and_the_prompt_changes_only_the_prompt(happy):
    data, v_pos, v_neg, unit = happy
    meta = {"alpha_pos": 0.3 * unit, "alpha_neg": 0.2 * unit, "steer_layer": LAYER}
    rows = steer.conditions(meta, v_pos, v_neg, [-1, 0, 0.5, 2], data, "[FRIEND]", seed=0)
    push = meta["alpha_pos"] * v_pos - meta["alpha_neg"] * v_neg
    x = torch.zeros(1, 2, push.shape[0])
    for r in rows:
        if r["condition"] in ("vector", "random"):
            (site, hook), = r["hooks"].items()
            moved = hook(x)[0, 0]  # what it adds
            assert site == f"resid.{LAYER}" and r["line"] == ""
            assert moved.norm().item() == pytest.approx(abs(r["alpha"]) * push.norm().item(), rel=1e-5)
            if r["condition"] == "vector":
                torch.testing.assert_close(moved, r["alpha"] * push)
            else:
                assert abs(torch.nn.functional.cosine_similarity(moved, push, dim=0)) < 0.2
        elif r["condition"] == "prompt":
            assert r["hooks"] is None and r["line"].startswith("[FRIEND] ")
            assert len(r["line"].splitlines()) == abs(r["alpha"])
    assert sorted(r["alpha"] for r in rows if r["condition"] == "prompt") == [-1, 1, 2]
    assert sorted(r["alpha"] for r in rows if r["condition"] == "random") == [-1, 2]  # |alpha| >= 1 only
    assert sorted(r["alpha"] for r in rows if r["condition"] == "vector") == [-1, 0.5, 2]
    assert [r["condition"] for r in rows].count("unsteered") == 1
    prompt = "[RIYA] hi\n[RIYA] how was your day?\n[FRIEND]"
    assert steer.with_line(prompt, "[FRIEND] today was great") == \
        "[RIYA] hi\n[RIYA] how was your day?\n[FRIEND] today was great\n[FRIEND]"
    assert steer.with_line("[FRIEND]", "[FRIEND] yay") == "[FRIEND] yay\n[FRIEND]"


def test_eval_runs_end_to_end_on_a_vector_and_writes_its_table(tiny_chat_dir, tiny_adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "v.safetensors"
    g = torch.Generator().manual_seed(0)
    steer.save_vector(path, torch.randn(64, generator=g), torch.randn(64, generator=g),
                      {"model": str(tiny_chat_dir), "adapter": str(tiny_adapter), "steer_layer": 2, "alpha_pos": 1.0,
                       "alpha_neg": 1.0})
    opts = steer.Options(pairs=str(PAIRS), adapter=str(tiny_adapter), name=str(path), replies=2, contexts=3, held_out=8,
                         sample_tokens=4, alphas="-1,0,1", bootstrap=200, tilt_samples=3)
    r = steer.evaluate(opts)
    tilt = r["tilt"]
    assert tilt["samples_per_context"] == 3 and len(tilt["nll_change"]) == len(steer.TILT_LAMBDAS)
    assert abs(tilt["vader_change"][0]) < 1e-12 and all(b >= a - 1e-12 for a, b in zip(tilt["vader_change"], tilt["vader_change"][1:]))
    kinds = sorted((x["condition"], x["alpha"]) for x in r["rows"])
    assert kinds == [("prompt", -1), ("prompt", 1), ("random", -1), ("random", 1), ("unsteered", 0), ("vector", -1),
                     ("vector", 1)]
    assert r["settings"]["prompts"] == 8 + 3 and r["settings"]["held_out_messages"] == 8
    for x in r["rows"]:
        assert len(x["vader_per_prompt"]) == 11 and x["vader"]["interval"][0] <= x["vader"]["mean"] <= x["vader"]["interval"][1]
    unsteered = next(x for x in r["rows"] if x["condition"] == "unsteered")
    assert unsteered["nll_change"] == 0 and unsteered["vader_change"]["mean"] == 0
    assert unsteered["nll_change_interval"] == [0, 0] and unsteered["positive_change"]["interval"] == [0, 0]
    for x in r["rows"]:
        low, high = x["nll_change_interval"]
        assert len(x["message_nll"]) == 8 and low - 1e-12 <= x["nll_change"] <= high + 1e-12
        assert x["positive_change"]["mean"] == pytest.approx(x["positive_share"] - unsteered["positive_share"])
    table = steer.eval_markdown(r)
    assert "| vector | +1 |" in table and "Verdict:" in table
    steer.plot_eval(r, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_the_ideal_tilt_is_computed_as_by_hand():
    """tilt_curves: at lam 0 nothing changes; at lam 1 the tilted mean of each prompt's replies, the
    positive share, and the held-out cost log Z_c(1) - VADER(real), over tokens, by hand; tilt_at reads
    the first lam that reaches a value."""
    S = torch.tensor([[0.5, -0.5], [0.0, 0.0]], dtype=torch.float64)  # 2 prompts x 2 replies
    C = torch.tensor([[1.0, 0.0], [0.2, 0.2], [-0.4, 0.6]], dtype=torch.float64)  # 3 held-out contexts
    real = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64)
    tokens = torch.tensor([4.0, 2.0, 10.0], dtype=torch.float64)
    t = steer.tilt_curves(S, C, real, tokens)
    k = t["lambda"].index(1.0)
    assert t["lambda"][0] == 0 and t["vader_change"][0] == 0 and t["positive_change"][0] == 0 and t["nll_change"][0] == 0
    w = math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5))
    assert t["vader_change"][k] == pytest.approx((0.5 * w - 0.5 * (1 - w)) / 2)  # the second prompt cannot move
    assert t["positive_change"][k] == pytest.approx((w - 0.5) / 2)
    log_z = [math.log((math.exp(1) + 1) / 2), 0.2, math.log((math.exp(-0.4) + math.exp(0.6)) / 2)]
    assert t["nll_change"][k] == pytest.approx(sum(z - r for z, r in zip(log_z, [0.0, 0.5, -1.0])) / 16)
    assert all(b >= a for a, b in zip(t["vader_change"], t["vader_change"][1:]))  # happier with lam
    assert steer.tilt_at(t, "vader_change", t["vader_change"][k], "lambda") == pytest.approx(1.0)
    assert steer.tilt_at(t, "vader_change", 0.9, "nll_change") is None  # beyond what these replies can reach


def test_the_ideal_tilts_interval_resamples_prompts_and_messages():
    """tilt_gain_intervals: where every prompt and every held-out message is alike, a resample is the
    sample itself and the interval shrinks to the point; otherwise it holds the point; a cost no
    resample's curve reaches has none."""
    S = torch.tensor([[0.5, -0.5]] * 4, dtype=torch.float64)
    C = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    real, tokens = torch.zeros(3, dtype=torch.float64), torch.full((3,), 4.0, dtype=torch.float64)
    arrays = {"prompt_vader": S.tolist(), "context_vader": C.tolist(), "real_vader_each": real.tolist(),
              "real_tokens": tokens.tolist()}
    t = {**steer.tilt_curves(S, C, real, tokens), **arrays}
    cost = t["nll_change"][50]
    (low, high), none = steer.tilt_gain_intervals(t, [cost, 10.0], 50, 0)
    assert low == pytest.approx(t["vader_change"][50]) and high == pytest.approx(t["vader_change"][50]) and none is None
    g = torch.Generator().manual_seed(0)
    S, C = torch.rand(6, 8, generator=g, dtype=torch.float64) * 2 - 1, torch.rand(5, 8, generator=g, dtype=torch.float64) * 2 - 1
    real, tokens = -torch.rand(5, generator=g, dtype=torch.float64), torch.full((5,), 3.0, dtype=torch.float64)  # less upbeat, as real ones are
    t = {**steer.tilt_curves(S, C, real, tokens), "prompt_vader": S.tolist(), "context_vader": C.tolist(),
         "real_vader_each": real.tolist(), "real_tokens": tokens.tolist()}
    cost = t["nll_change"][50]  # lam 1's
    (low, high), = steer.tilt_gain_intervals(t, [cost], 300, 0)
    assert low < t["vader_change"][50] < high and high - low > 0.01



def test_the_importance_gain_is_zero_unpushed_and_its_gradient_there_is_the_policy_gradient():
    """importance_gain by hand: weights 2/3, 1/3 on V = (1, 0) give 2/3 - 1/2; at lp = lp0 it is 0 and its
    gradient in each reply's log-prob is (V_i - mean V) / n, the policy gradient with the mean as baseline."""
    V = torch.tensor([1.0, 0.0])
    assert steer.importance_gain(torch.tensor([math.log(2), 0.0]), torch.zeros(2), V).item() == pytest.approx(1 / 6)
    V = torch.tensor([0.5, -0.2, 0.9, 0.0])
    lp0 = torch.tensor([-3.0, -7.0, -1.5, -4.0])
    lp = lp0.clone().requires_grad_(True)
    gain = steer.importance_gain(lp, lp0, V)
    gain.backward()
    assert gain.item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(lp.grad, (V - V.mean()) / 4)


def test_reply_logprobs_and_their_gradient_equal_one_forward_over_prompt_and_reply(tiny):
    """The shared-prefill path (each distinct prompt once, its KV cache copied to its replies' rows) gives
    each reply's summed log-prob and the gradient in the push what a plain forward over prompt + reply gives."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, tiny.cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 7, 7, 3)]
    prompts[2] = prompts[1]  # two replies after one prompt share its prefill
    replies = [torch.randint(0, tiny.cfg.vocab_size, (n,), generator=g).tolist() for n in (4, 2, 5, 1)]
    w = torch.randn(4, generator=g)
    push = torch.randn(tiny.cfg.dim, generator=g)
    got, want = [], []
    for fn, out in ((lambda h: steer.reply_logprobs(tiny, list(zip(prompts, replies)), h), got),
                    (lambda h: torch.stack([steer.scored_logprobs(tiny, torch.tensor([p + r]), torch.tensor(
                        [[False] * len(p) + [True] * len(r)]), hooks=h).sum() for p, r in zip(prompts, replies)]), want)):
        d = push.clone().requires_grad_(True)
        with torch.enable_grad():
            lp = fn({"resid.1": lambda x: x + d})
            (lp * w).sum().backward()
        out += [lp.detach(), d.grad]
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


def test_the_nll_gradient_matches_a_finite_difference_and_a_strength_scales_to_the_bound(tiny_adapter):
    import sft
    tuned = sft.load_tuned(str(tiny_adapter), "", False)
    model, tok = tuned.model, tuned.tok
    opts = steer.Options(pairs=str(PAIRS), adapter=str(tiny_adapter))
    examples = steer.spread(steer.replier_examples(tuned, "[FRIEND]", False, opts), 6)
    g = steer.nll_gradient(model, tok, examples, "resid.1")
    u = torch.randn(model.cfg.dim, generator=torch.Generator().manual_seed(0))
    eps = 0.1  # the tiny model's stream has a norm of ~4,000 at resid.1: a push of 0.1 is in the linear range
    for d in (g / g.norm(), u / u.norm()):  # along the gradient the slope is its norm; across, its share
        nll = lambda x: steer.held_out_nll(model, tok, examples, {"resid.1": steer.add(x * d)})
        assert (nll(eps) - nll(-eps)) / (2 * eps) == pytest.approx((g @ d).item(), rel=2e-2, abs=0.05 * g.norm().item())
    s, rise, tried = steer.to_the_bound(steer.Strength(1.0), lambda x: 0.5 * x.r ** 2, 0.03, measures=6)
    assert steer.AIM ** 2 * 0.03 <= rise <= 0.03 and rise == pytest.approx(0.5 * s.r ** 2) and len(tried) <= 6


def test_learn_saves_a_push_that_eval_and_sample_read(tiny_chat_dir, tiny_adapter, tmp_path, monkeypatch):
    """End to end on the tiny model: a push at the chosen site, scaled to (at most) the cost bound on the
    search's cost messages, in the vector format: v_neg zero, alphas 1 and 0, read back by sample.py."""
    monkeypatch.chdir(tmp_path)
    opts = steer.Options(pairs=str(PAIRS), adapter=str(tiny_adapter), layer=1, learn_contexts=3, learn_replies=3,
                         learn_steps=3, sample_tokens=4, cost_messages=6, max_nll_rise=0.05, lr=1.0)
    r = steer.learn(opts)
    assert r["site"] == "resid.1" and r["contexts"] == 3 and r["nll_rise"] <= 0.05
    v_pos, v_neg, meta = sample.read_steering(r["path"])
    assert r["path"] == steer.Path("out/steer/happy_learned.safetensors")
    assert meta["steer_layer"] == 1 and meta["alpha_pos"] == 1.0 and meta["alpha_neg"] == 0.0 and meta["kind"] == "learned"
    assert not v_neg.any() and v_pos.norm().item() == pytest.approx(r["norm"], rel=1e-5)
    with pytest.raises(BadInput, match="--layer"):
        steer.learn(steer.Options(pairs=str(PAIRS), adapter=str(tiny_adapter), layer=99))
